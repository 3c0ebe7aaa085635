"""The resident LoRA cache: LoRA files read once and kept as slot-ready tensors, so a switch is a copy.

Two kinds of entries share one byte budget and one LRU order:
- a file's tensors and diffusers' adapter metadata, as read from disk (`read`), keyed by path + fingerprint
  (size and mtime: a file changed on disk is a new key, so it is re-read). The reconciler's loads convert
  these (`converted`), so a file is read from disk once, and `prewarm` reads files on a background thread
  ahead of the sampler that needs them.
- a file converted for one hot-swap slot (`slot_ready`): diffusers' key conversion, PEFT's naming, padded to
  the slot's rank, in the slot's dtype on its device, with the per-layer scaling PEFT's hot-swap would write.
  A switch to it is one batched `torch._foreach_copy_` into the slot's existing padded lora_A/lora_B
  tensors (`copy_into`). Its key adds the conversion's inputs (family, UNet config), the slot's PEFT name,
  rank, dtype and device.

Entries are built the way `load_lora_into_unet(..., hotswap=True)` builds its state dict and `LoraConfig`
(diffusers' `load_lora_adapter`, PEFT's `hotswap_adapter_from_state_dict`), from the same converted state
dict the reconciler's loads use, so a format conversion added there is cached here too. Files whose
converted layers are anything but plain lora_A/lora_B weights (DoRA magnitudes, LoRA biases, LoKr) get no
slot-ready entry (`None`): the reconciler swaps those through diffusers.

Memory: attached to the model manager (`attach`, done by `materialize`), the cache is one of its pools: its
bytes count in the same RAM and VRAM budgets as models (`nodegraph models status` lists them), an entry is kept
only in room that models leave, and the manager drops the least recently used entries before evicting any
model. For a slot on a CUDA GPU, a slot-ready entry is kept on the GPU when the VRAM budget has room (a switch is
then a GPU→GPU copy), else in pinned CPU memory (copies at full speed that do not wait for the GPU). Files as
read stay in pageable memory: they are converted, never copied to a GPU as they are. Without a manager
(benchmarks, tests) the cache keeps to `DEFAULT_BYTES`; NODEGRAPH_LORA_CACHE_MB caps it in either case.
"""

from __future__ import annotations

import math
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from nodegraph.models import device_kind

DEFAULT_BYTES = 1 << 30  # the cap without a model manager


@dataclass(frozen=True)
class FileData:
    """A LoRA file as read: its tensors (CPU) and diffusers' adapter metadata from its header (or None)."""

    state: dict[str, torch.Tensor]
    metadata: dict[str, Any] | None


@dataclass(frozen=True)
class SlotReady:
    """A file converted for one slot: module -> (lora_A, lora_B) padded to the slot's shapes, and scalings."""

    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scaling: dict[str, float]  # module -> alpha/r as PEFT's hot-swap computes it
    config: Any  # the LoraConfig diffusers would build, for PEFT's hot-swap compatibility check


Converted = tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any] | None]  # state, network alphas, metadata


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class LoraCache:
    """Byte-bounded LRU of read files and slot-ready conversions; thread-safe (prewarming reads in a thread).

    A model manager's pool (`nodegraph.models.Pool`) once attached: it never calls the manager while holding its
    own lock, so the manager may shrink it from any thread.
    """

    name = "lora"

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = max_bytes  # a cap of its own (NODEGRAPH_LORA_CACHE_MB); None: the budgets alone
        self._owner: weakref.ref[Any] | None = None
        self._entries: OrderedDict[tuple[Any, ...], tuple[Any, int, str]] = OrderedDict()  # value, bytes, device
        self._lock = threading.Lock()
        self._reading: dict[tuple[Any, ...], Future[FileData]] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._checked: set[tuple[str, str]] = set()  # (path, fingerprint) of files read and found finite
        self.reads = 0  # files read from disk (tests, benchmarks)
        self.conversions = 0  # slot-ready entries built

    def attach(self, manager: Any) -> None:
        """Count in `manager`'s budgets (a `nodegraph.models.ModelManager`), and no longer in a previous one's."""
        previous = self.owner
        if previous is not None and previous is not manager:
            previous.remove_pool(self)
        self._owner = weakref.ref(manager)
        if manager.add_pool(self):  # newly counted: entries kept before, back within the budgets
            for kind in {device_kind(device) for device in self.memory()}:
                manager.room(kind, 0)

    @property
    def owner(self) -> Any:
        return None if self._owner is None else self._owner()

    @property
    def bytes(self) -> int:
        return sum(self.memory().values())

    def memory(self) -> dict[str, int]:
        """Bytes held per device (the manager's budgets count them)."""
        totals: dict[str, int] = {}
        with self._lock:
            for _, size, device in self._entries.values():
                totals[device] = totals.get(device, 0) + size
        return {device: n for device, n in totals.items() if n}

    def count(self) -> int:
        with self._lock:
            return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def shrink(self, kind: str, size: int) -> None:
        """Drop least recently used entries on devices of `kind` ("cpu", "gpu") until `size` bytes are freed."""
        with self._lock:
            for key, (_, held, device) in list(self._entries.items()):
                if size <= 0:
                    return
                if held and device_kind(device) == kind:
                    del self._entries[key]
                    size -= held

    def _get(self, key: tuple[Any, ...]) -> Any:
        with self._lock:
            hit = self._entries.get(key)
            if hit is None:
                return None
            self._entries.move_to_end(key)
            return hit[0]

    def _fits(self, size: int, device: str) -> bool:
        """Room for `size` more bytes on `device`: under the manager's budget if attached (it may drop other
        entries of ours, never a model), and the cap. Asked without holding our lock (the manager takes it)."""
        cap = self._cap()
        if cap is not None and size > cap:
            return False
        owner = self.owner
        return owner is None or not size or owner.room(device_kind(device), size)

    def _put(self, key: tuple[Any, ...], value: Any, size: int, device: str = "cpu") -> None:
        if self._fits(size, device):  # else no room: used once, never kept
            self._store(key, value, size, device)

    def _cap(self) -> int | None:
        """The cap of its own: NODEGRAPH_LORA_CACHE_MB, else none under a manager (its budgets), else the default."""
        return self.max_bytes if self.max_bytes is not None else (None if self.owner else DEFAULT_BYTES)

    def _store(self, key: tuple[Any, ...], value: Any, size: int, device: str) -> None:
        cap = self._cap()
        with self._lock:
            self._entries[key] = (value, size, device)
            self._entries.move_to_end(key)
            total = sum(s for _, s, _ in self._entries.values())
            while cap is not None and total > cap:
                _, (_, dropped, _) = self._entries.popitem(last=False)
                total -= dropped

    def read(self, path: str, fingerprint: str) -> FileData:
        """The file's tensors and metadata, from the cache or disk (waiting for a prewarm already reading it).

        A file with a NaN or Inf tensor is a `lora_files.LoraFileError` naming it and its first such tensor."""
        key = ("file", path, fingerprint)
        hit = self._get(key)
        if hit is not None:
            return hit  # type: ignore[no-any-return]
        with self._lock:
            pending = self._reading.get(key)
        if pending is not None:
            return pending.result()
        return self._read(key, path)

    def _read(self, key: tuple[Any, ...], path: str) -> FileData:
        from diffusers.loaders.lora_base import _load_sft_state_dict_metadata
        from safetensors.torch import load_file

        from nodes.engine.finite import first_non_finite
        from nodes.engine.lora_files import LoraFileError

        state = load_file(path, device="cpu")
        bad = first_non_finite(state.items())  # one reduction per tensor, before anything is kept or loaded
        if bad is not None:
            raise LoraFileError(f"{os.path.basename(path)}: tensor {bad!r} holds NaN or Inf values (a damaged file, "
                                "or one saved from a diverged training run); it would sample black images")
        data = FileData(state, _load_sft_state_dict_metadata(path))
        self._checked.add((path, key[2]))
        self.reads += 1
        self._put(key, data, _nbytes(state.values()))
        return data

    def check(self, path: str, fingerprint: str) -> None:
        """Raise `read`'s error for a file with a NaN or Inf tensor; a file read (and found finite) once is not read
        again for this, even if its tensors have left the cache (a slot-ready entry of it may be all that is kept)."""
        if (path, fingerprint) not in self._checked:
            self.read(path, fingerprint)

    def prewarm(self, files: Iterable[tuple[str, str]]) -> list[Future[FileData]]:
        """Read (path, fingerprint) files into the cache on a background thread; returns their futures."""
        futures = []
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-prewarm")
            for path, fingerprint in files:
                key = ("file", path, fingerprint)
                if key in self._entries:
                    continue
                pending = self._reading.get(key)
                if pending is None:
                    pending = self._pool.submit(self._read_and_forget, key, path)
                    self._reading[key] = pending
                futures.append(pending)
        return futures

    def wait(self) -> None:
        """Until every prewarm read in flight has finished (tests, benchmarks)."""
        with self._lock:
            pending = list(self._reading.values())
        for future in pending:
            future.result()

    def _read_and_forget(self, key: tuple[Any, ...], path: str) -> FileData:
        try:
            return self._read(key, path)
        finally:
            with self._lock:
                self._reading.pop(key, None)

    def converted(self, pipeline: Any, path: str, fingerprint: str, own: bool = True, rewrite: str | None = None,
                  family: str = "sd15", **kwargs: Any) -> Converted:
        """`pipeline.lora_state_dict(path, ...)` as (state, network alphas, metadata), from the cached read.

        `own`: the tensors are copies the caller may keep (PEFT's loads assign them into the model, where a
        later hot-swap writes in place); False for a caller that only reads them. `rewrite` (a UNet config,
        JSON): first rewrite the formats diffusers does not load exactly (`lora_convert.convert`). `family`:
        SD3's conversion returns no alphas (it folds them in), Flux's returns them when asked.
        """
        from nodes.engine import lora_convert, lora_dora

        data = self.read(path, fingerprint)
        tensors = {k: v.clone() for k, v in data.state.items()} if own else dict(data.state)
        if rewrite is not None:
            tensors = lora_convert.convert(tensors, rewrite)
        # (diffusers' conversion pops keys from the dict it is given: never the cached one.)
        if family == "sd3":
            return pipeline.lora_state_dict(tensors, **kwargs), None, data.metadata
        if family == "flux":
            kwargs["return_alphas"] = True
        state, alphas = lora_dora.lora_state_dict(pipeline, tensors, **kwargs)
        return state, alphas, data.metadata

    def slot_ready(self, key: tuple[Any, ...]) -> SlotReady | None | bool:
        """A slot-ready entry (`slot_key`), None for a file that has none, False if not in the cache."""
        hit = self._get(key)
        return False if hit is None else (hit or None)

    def build_slot_ready(self, key: tuple[Any, ...], pipeline: Any, denoiser: str = "unet",
                         **kwargs: Any) -> SlotReady | None:
        """Convert the file of `key` for its slot in `denoiser` (reading it if needed) and keep it:
        on the slot's GPU when the VRAM budget has room, else in (pinned, for a GPU) CPU memory."""
        _, path, fingerprint, _, name, rank, dtype, device = key
        converted = self.converted(pipeline, path, fingerprint, own=False, **kwargs)
        ready = build_slot_ready(converted, name, rank, getattr(torch, dtype.removeprefix("torch.")), "cpu",
                                 denoiser)
        self.conversions += 1
        if ready is None:
            self._put(key, False, 0)
            return None
        size = _nbytes(t for pair in ready.tensors.values() for t in pair)
        if device_kind(device) == "gpu" and self._fits(size, device):
            ready = moved(ready, device)
            self._store(key, ready, size, device)
        else:
            ready = moved(ready, "cpu", pin=_pinnable(device))
            self._put(key, ready, size, "cpu")
        return ready


def _pinnable(device: str) -> bool:
    """Host memory for copies to `device` is best pinned (a CUDA GPU, with CUDA present: a manager's device is
    only a name until used)."""
    return device.startswith("cuda") and torch.cuda.is_available()


def moved(ready: SlotReady, device: str, pin: bool = False) -> SlotReady:
    """`ready` with its tensors on `device` (pinned CPU memory with `pin`, for copies to a GPU at full speed)."""
    def place(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.to(device)
        return tensor.pin_memory() if pin else tensor

    tensors = {module: (place(down), place(up)) for module, (down, up) in ready.tensors.items()}
    return SlotReady(tensors, ready.scaling, ready.config)


def slot_key(path: str, fingerprint: str, conversion: tuple[Any, ...], name: str, rank: int, dtype: torch.dtype,
             device: torch.device | str) -> tuple[Any, ...]:
    """The cache key of a file converted for a slot: the file, what its conversion depends on (family, denoiser
    config), the slot's PEFT adapter name, its padded rank, dtype and device."""
    return ("slot", path, fingerprint, conversion, name, rank, str(dtype), str(device))


def build_slot_ready(converted: Converted, name: str, rank: int, dtype: torch.dtype, device: torch.device | str,
                     denoiser: str = "unet") -> SlotReady | None:
    """What diffusers' hot-swap into `denoiser` ("unet" or "transformer") would copy into slot `name` prepared
    to `rank`, ready to be copied there."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from diffusers.utils.peft_utils import _create_lora_config
    from peft.utils.other import get_pattern_key

    state, alphas, metadata = converted
    prefix = f"{denoiser}."
    # As diffusers' load_lora_adapter(prefix=denoiser) does, step by step.
    unet = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    if metadata is not None:
        metadata = {k.removeprefix(prefix): v for k, v in metadata.items() if k.startswith(prefix)}
    if not unet:
        return None
    if "lora_A" not in next(iter(unet)):
        unet = convert_unet_state_dict_to_peft(unet)
    if any(not k.endswith((".lora_A.weight", ".lora_B.weight")) for k in unet):
        return None  # DoRA magnitudes, LoRA biases, LoKr, SAI control-LoRA: diffusers' own path
    ranks = {f"^{k}": v.shape[1] for k, v in unet.items() if "lora_B" in k and v.ndim > 1}
    if alphas:
        alphas = {k.removeprefix(prefix): v for k, v in alphas.items() if k.startswith(prefix)}
    config = _create_lora_config(unet, alphas, metadata, ranks, model_state_dict=None, adapter_name=name)
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    scaling: dict[str, float] = {}
    for key, down in unet.items():
        module, sep, _ = key.partition(".lora_A.weight")
        if not sep:
            continue
        up = unet[f"{module}.lora_B.weight"]
        if down.shape[0] > rank or up.shape[1] > rank:
            return None  # larger than the slot: the reconciler never swaps it (see _swappable)
        # PEFT's hot-swap computes each layer's scaling from the key with the adapter name in it.
        swap_key = f"{module}.lora_A.{name}.weight"
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), swap_key), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), swap_key), config.lora_alpha)
        scaling[module] = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        tensors[module] = (_padded(down, 0, rank, dtype, device), _padded(up, 1, rank, dtype, device))
    return SlotReady(tensors, scaling, config)


def _padded(tensor: torch.Tensor, dim: int, rank: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Zero-padded along `dim` to `rank`, as PEFT pads a prepared slot and fills it on a smaller hot-swap."""
    if tensor.shape[dim] == rank:  # nothing to pad: the file's own tensor (already there: no copy)
        return tensor.to(device=device, dtype=dtype).contiguous()
    shape = list(tensor.shape)
    shape[dim] = rank
    out = torch.zeros(shape, dtype=dtype, device=device)
    out.narrow(dim, 0, tensor.shape[dim]).copy_(tensor)
    return out


def copy_into(targets: list[tuple[str, torch.Tensor, torch.Tensor]], ready: SlotReady) -> None:
    """Switch a slot to `ready`: batched copies into its (module, lora_A, lora_B) tensors, zeros where it has
    no layer (as PEFT's hot-swap zeroes the layers a smaller file lacks). From pinned CPU memory to a GPU the
    copies do not wait for the GPU (the pinned source stays alive: the cache or the caching allocator keeps it)."""
    sources, destinations, zeros = [], [], []
    for module, down, up in targets:
        pair = ready.tensors.get(module)
        if pair is None:
            zeros += (down, up)
        else:
            destinations += (down, up)
            sources += pair
    with torch.no_grad():
        if destinations:
            torch._foreach_copy_(destinations, sources, non_blocking=_pinned_to_gpu(sources[0], destinations[0]))
        if zeros:
            torch._foreach_zero_(zeros)


def _pinned_to_gpu(source: torch.Tensor, destination: torch.Tensor) -> bool:
    return source.is_pinned() and destination.device.type == "cuda"


def write_scales(tensors: list[torch.Tensor], values: list[float]) -> None:
    """Set each 0-d scaling tensor to its value in place, batched: one small host tensor, one foreach copy
    (bitwise what `fill_` writes; on a GPU two launches instead of one per layer, and from pinned memory the
    host does not wait for the sampling queued before)."""
    if tensors:
        gpu = tensors[0].device.type == "cuda"
        host = torch.tensor(values, dtype=tensors[0].dtype, pin_memory=gpu)
        source = host.to(tensors[0].device, non_blocking=gpu)
        with torch.no_grad():
            torch._foreach_copy_(tensors, source.unbind())


_CAP = os.environ.get("NODEGRAPH_LORA_CACHE_MB")
CACHE = LoraCache(None if _CAP is None else int(_CAP) << 20)
