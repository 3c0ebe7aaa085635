"""LoRA transitions through our reconciler, against the same change done the plain way and against the floor.

    python bench/lora.py                # tiny demo SD1.5 + its rank-4 attention LoRA: ≈1 min
    python bench/lora.py --size sd15    # full-size SD1.5 architecture, random weights, rank-8 attention LoRA: ≈3 min
    python bench/lora.py --device cuda  # the same with the pipelines on a GPU (timings synchronize)

Options: `--repeats N` rounds (default 30 tiny, 15 sd15); `--models-dir DIR` keeps the generated models there
and reuses them (default: a temp dir, removed at the end; sd15 writes ≈4 GB and takes ≈1 min to build);
`--threads N` torch threads (default 1, see bench/common.py); `--json`: the figures as one JSON object on the
last line.

One pipeline (`nodes.engine.checkpoints.load_pipeline`, fp32, CPU) held as a reconciler `Resident`; recipes are
built by our LoadCheckpoint and LoadLoRA nodes, exactly as a workflow builds them.

(a) strength change, 1.0 ↔ 0.5, each call a real change:
  ours     `reconcile(resident, recipe)` with a recipe differing only in strength: must be one action, new
           scales only (`set_adapters`, plus our per-layer scale write-back in the current reconciler).
  floor    diffusers' `set_adapters` alone: the library's own strength change, which ours builds on.
  reload   the same change done by `unload_lora_weights()` + `load_lora_weights(file)` + `set_adapters`.
(b) LoRA load into the resident pipeline:
  ours     `reconcile` from the bare recipe to one with the LoRA (`load_lora_weights` + scales);
           removing it again (`delete_adapters` + `unload_lora_weights`) runs untimed after each, and is
           timed separately for information.
  diffusers `load_lora_weights(file)` + `set_adapters` called directly (then `unload_lora_weights`, untimed).
  read     `safetensors.torch.load_file(file)`: reading the tensors, the floor of any load.
The file is in the page cache for all of them. The cases take turns in one process (order rotating each
round); figures are medians in ms, × the median of per-round ratios. Before timing, a UNet forward on a
fixed input checks that both ways of each change give bitwise the same model, that the change changes
it, and that removing the LoRA gives back the bare model.

(c) LoRA switch and strength change in a slot prepared for hot-swap (a second resident), the slot alternating
between the LoRA and a second file of the same layers and rank (`hotswap.swap_lora`):
  cached       `reconcile` to the other file, its slot-ready tensors in the LoRA cache (nodes/engine/lora_cache.py):
               asserted `hotswap:s, scales` on every call.
  copy floor   `torch._foreach_copy_` of the same cached tensors into the slot's lora_A/lora_B weights, alone.
  uncached     the same switch with an empty LoRA cache: read, convert, pad, copy.
  read+copy    its floor: `safetensors.torch.load_file` + `torch._foreach_copy_` of the file's tensors.
  diffusers    `load_lora_weights(file, hotswap=True)` on the first pipeline, prepared by hand (after (a), (b)).
  strength     `reconcile` 1.0 ↔ 0.5 in the prepared slot (`scales`); its floor: writing the slot's scaling
               tensors alone (the same batched write, the values precomputed).
Before timing, a UNet forward checks that a cached switch gives bitwise the UNet an uncached one gives.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from typing import Any

import common
import torch
from common import Models, interleaved, median, ms, require, table

SLOT = "style"
STRENGTHS = (1.0, 0.5)
SCALES = "scales"  # the reconciler's action for new strengths only
REPEATS = {"tiny": 30, "sd15": 15}


@dataclass
class Bench:
    """The resident pipeline, the recipes, and a probe that fingerprints what the UNet computes."""

    models: Models
    resident: Any  # nodes.engine.reconcile.Resident
    bare: Any  # ModelRecipe without the LoRA
    with_lora: dict[float, Any]  # strength -> ModelRecipe with the LoRA at that strength
    device: str = "cpu"

    @classmethod
    def build(cls, models: Models, device: str) -> Bench:
        from nodegraph.context import Context
        from nodegraph.settings import Settings
        from nodes.loaders import LoadCheckpoint
        from nodes.lora import LoadLoRA

        ctx = Context("bench", "bench", Settings(models_dirs=(models.root,)))
        bare = LoadCheckpoint().run(ctx, models.checkpoint, "fp32")["model"]
        with_lora = {
            s: LoadLoRA().run(ctx, bare, models.lora, s, 1.0, SLOT, "")["model"] for s in STRENGTHS
        }
        return cls(models, resident(models, bare, device), bare, with_lora, device)

    @property
    def pipe(self) -> Any:
        return self.resident.pipe

    @property
    def adapter_name(self) -> str:
        """The name the reconciler gives the slot's adapter in PEFT; the plain way uses it too, so that
        both act on the same adapter and the reconciler's books stay true."""
        from nodes.engine.reconcile import peft_name

        name: str = peft_name(SLOT)
        return name

    def reconcile(self, target: Any, expected: list[str]) -> None:
        reconcile(self.resident, target, expected)

    def diffusers_load(self, strength: float) -> None:
        """The plain way: load the file into the slot and activate it (the resident's books kept true)."""
        self.pipe.load_lora_weights(str(self.models.lora_path), adapter_name=self.adapter_name)
        adapter = self.with_lora[strength].live()[SLOT]
        self.pipe.set_adapters([self.adapter_name], [adapter.strength])  # a UNet-only LoRA
        self.resident.parts["unet"].applied = self.with_lora[strength]
        sync()

    def set_adapters(self, strength: float) -> None:
        """The least a strength change costs in diffusers: `set_adapters` alone (books kept true)."""
        adapter = self.with_lora[strength].live()[SLOT]
        self.pipe.set_adapters([self.adapter_name], [adapter.strength])  # a UNet-only LoRA
        self.resident.parts["unet"].applied = self.with_lora[strength]
        sync()

    def reload(self, strength: float) -> None:
        self.pipe.unload_lora_weights()
        self.diffusers_load(strength)

    def unload(self) -> None:
        self.pipe.unload_lora_weights()
        self.resident.parts["unet"].applied = self.bare

    def probe(self) -> torch.Tensor:
        return probe(self.pipe)


def resident(models: Models, bare: Any, device: str) -> Any:
    from nodes.engine.checkpoints import load_pipeline
    from nodes.engine.resident import Resident

    pipe = load_pipeline(models.checkpoint_path, torch.float32)
    pipe.set_progress_bar_config(disable=True)
    made = Resident.fresh(pipe, bare, scheduler_config=dict(pipe.scheduler.config))
    if device != "cpu":
        made.move(device)
    return made


def reconcile(resident: Any, target: Any, expected: list[str]) -> None:
    """`reconcile`, requiring exactly the `expected` actions."""
    from nodes.engine.reconcile import reconcile as run

    actions = run(resident, target)
    sync()
    require(actions == expected, f"reconcile took {actions}, expected {expected}")


def probe(pipe: Any) -> torch.Tensor:
    unet = pipe.unet
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, unet.config.in_channels, 8, 8, generator=generator).to(unet.device)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator).to(unet.device)
    with torch.inference_mode():
        out: torch.Tensor = unet(latents, 500, encoder_hidden_states=text).sample
    return out.cpu()


def sync() -> None:
    """Wait for the GPU (nothing on the CPU), so that a case is timed to its end."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def check(bench: Bench) -> None:
    """Both ways of each change give bitwise the same UNet, the changes change it, removal restores it."""
    bare = bench.probe()
    load, strength = ["load:" + SLOT, SCALES], [SCALES]
    bench.reconcile(bench.with_lora[1.0], load)
    ours_full = bench.probe()
    bench.reconcile(bench.with_lora[0.5], strength)
    ours_half = bench.probe()
    bench.reload(1.0)
    reload_full = bench.probe()
    bench.reload(0.5)
    reload_half = bench.probe()
    bench.set_adapters(1.0)
    bench.set_adapters(0.5)
    plain_half = bench.probe()
    bench.reconcile(bench.bare, ["delete:" + SLOT])
    removed = bench.probe()
    bench.diffusers_load(1.0)
    plain_full = bench.probe()
    bench.unload()
    require(not torch.equal(bare, ours_full) and not torch.equal(ours_full, ours_half), "the LoRA changes nothing")
    require(torch.equal(ours_full, reload_full) and torch.equal(ours_full, plain_full), "strength 1: ways differ")
    require(torch.equal(ours_half, reload_half) and torch.equal(ours_half, plain_half), "strength 0.5: ways differ")
    require(torch.equal(removed, bare), "removing the LoRA did not restore the bare UNet")


@dataclass
class Results:
    scales: list[float]
    set_adapters: list[float]
    reload: list[float]
    load: list[float]
    diffusers: list[float]
    read: list[float]
    remove: list[float]


def measure(bench: Bench, repeats: int) -> Results:
    from safetensors.torch import load_file

    strength_load = ["load:" + SLOT, SCALES]
    state = {"strength": 1.0}

    def flip() -> float:
        state["strength"] = STRENGTHS[1] if state["strength"] == STRENGTHS[0] else STRENGTHS[0]
        return state["strength"]

    # (a) from a resident LoRA, each call moves to the other strength
    bench.reconcile(bench.with_lora[1.0], strength_load)
    a = interleaved(
        {
            "scales": lambda: bench.reconcile(bench.with_lora[flip()], [SCALES]),
            "set_adapters": lambda: bench.set_adapters(flip()),
            "reload": lambda: bench.reload(flip()),
        },
        repeats,
    )
    bench.reconcile(bench.bare, ["delete:" + SLOT])

    # (b) from the bare pipeline, each call loads the LoRA; undone untimed after
    remove: list[float] = []

    def unload_timed() -> None:
        t0 = time.perf_counter()
        bench.reconcile(bench.bare, ["delete:" + SLOT])
        remove.append(time.perf_counter() - t0)

    path = str(bench.models.lora_path)
    b = interleaved(
        {
            "load": lambda: bench.reconcile(bench.with_lora[1.0], strength_load),
            "diffusers": lambda: bench.diffusers_load(1.0),
            "read": lambda: load_file(path),
        },
        repeats,
        after={"load": unload_timed, "diffusers": bench.unload},
    )
    return Results(a["scales"], a["set_adapters"], a["reload"], b["load"], b["diffusers"], b["read"], remove)


@dataclass
class Switches:
    cached: list[float]
    copy: list[float]
    uncached: list[float]
    read_copy: list[float]
    diffusers: list[float]
    strength: list[float]
    write: list[float]


def measure_switches(bench: Bench, repeats: int) -> Switches:
    """(c): switches and strength changes in a prepared slot, against their floors and diffusers' hot-swap."""
    from hotswap import swap_lora
    from safetensors.torch import load_file

    from nodegraph.context import Context
    from nodegraph.settings import Settings
    from nodes.engine import in_place, lora_cache
    from nodes.engine.lora_files import inspect
    from nodes.lora import LoadLoRA

    models = bench.models
    files = (models.lora_path, swap_lora(models))
    rank = max(inspect(f).max_rank for f in files)
    ctx = Context("bench", "bench", Settings(models_dirs=(models.root,)))
    recipes = {(f.name, s): LoadLoRA().run(ctx, bench.bare, f.name, s, 1.0, SLOT, "")["model"]
               .prepared_for_hotswap(rank) for f in files for s in STRENGTHS}
    hot = resident(models, bench.bare, bench.device)
    cache = common.lora_cache_on(bench.device, lora_cache.CACHE)  # under a manager's budgets, as a server's
    swap = [f"hotswap:{SLOT}", SCALES]
    reconcile(hot, recipes[(files[0].name, 1.0)], [f"prepare_hotswap:{rank}", f"load:{SLOT}", SCALES])
    reconcile(hot, recipes[(files[1].name, 1.0)], swap)  # uncached: the cache is empty
    uncached_b = probe(hot.pipe)
    reconcile(hot, recipes[(files[0].name, 1.0)], swap)
    reconcile(hot, recipes[(files[1].name, 1.0)], swap)  # cached
    require(torch.equal(probe(hot.pipe), uncached_b), "a cached switch gives another UNet than an uncached one")

    targets, sources, file_keys = common.switch_floor(hot, SLOT, [str(f) for f in files])
    layout = in_place.slot_layout(hot, "unet", SLOT)

    name = bench.adapter_name
    raw = bench.pipe  # (a) and (b) are done: diffusers alone, prepared by hand
    raw.unload_lora_weights()
    raw.enable_lora_hotswap(target_rank=rank)
    raw.load_lora_weights(str(files[0]), adapter_name=name)
    scales = [t for t in layout.scales if t is not None]
    require(len(scales) == len(layout.scales), "the prepared slot's scalings are not tensors")
    state = {"at": 1, "raw": 0, "floor": 0, "read": 0, "write": 0}

    def flip(key: str) -> int:
        state[key] = 1 - state[key]
        return int(state[key])

    def cached() -> None:
        reconcile(hot, recipes[(files[flip("at")].name, 1.0)], swap)

    def uncached() -> None:
        lora_cache.CACHE = common.lora_cache_on(bench.device)  # empty (restored untimed after)
        cached()

    def restore() -> None:
        lora_cache.CACHE = common.lora_cache_on(bench.device, cache)

    def copy() -> None:
        with torch.no_grad():
            torch._foreach_copy_(targets, sources[flip("floor")], non_blocking=True)
        sync()

    def read_copy() -> None:
        state_dict = load_file(str(files[flip("read")]))
        with torch.no_grad():
            torch._foreach_copy_(targets, [state_dict[k] for k in file_keys])
        sync()

    def diffusers() -> None:
        raw.load_lora_weights(str(files[flip("raw")]), adapter_name=name, hotswap=True)
        sync()

    def strength() -> None:
        current = hot.applied.live()[SLOT]
        other = STRENGTHS[1] if current.strength == STRENGTHS[0] else STRENGTHS[0]
        reconcile(hot, recipes[(current.path.rsplit("/", 1)[-1], other)], [SCALES])

    values = [[float(t) * s for t in scales] for s in (0.5, 2.0)]  # (undone by the next call)

    def write() -> None:
        lora_cache.write_scales(scales, values[flip("write")])
        sync()

    t = interleaved({"cached": cached, "copy": copy, "uncached": uncached, "read_copy": read_copy,
                     "diffusers": diffusers, "strength": strength, "write": write}, repeats,
                    after={"uncached": restore})
    return Switches(t["cached"], t["copy"], t["uncached"], t["read_copy"], t["diffusers"], t["strength"], t["write"])


def ratio(ours: list[float], reference: list[float]) -> float:
    """Median of the per-round ratios: each pair ran in the same round, so slow spells cancel out."""
    return median([o / r for o, r in zip(ours, reference, strict=True)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=tuple(REPEATS), default="tiny")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--models-dir", default=None, help="keep generated models here (default: a temp dir)")
    parser.add_argument("--device", default="cpu", help="where the pipelines live: cpu (default), cuda, cuda:1, …")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object on the last line")
    common.add_threads_option(parser)
    args = parser.parse_args()
    common.set_threads(args.threads)
    repeats = args.repeats or REPEATS[args.size]

    from nodes.engine.lora_files import inspect

    with common.models(args.size, args.models_dir) as models:
        info = inspect(models.lora_path)
        size_kb = models.lora_path.stat().st_size / 1024
        bench = Bench.build(models, args.device)
        check(bench)
        r = measure(bench, repeats)
        w = measure_switches(bench, repeats)

    print(f"nodegraph LoRA transitions — {args.size}: {models.checkpoint} + {models.lora} "
          f"(rank {info.max_rank}, {len(info.ranks)} layers, {size_kb:,.0f} KiB), fp32 {args.device}")
    print(common.machine())
    print(f"{repeats} interleaved rounds; ms are medians, × the median of per-round ratios; "
          "reconcile's actions asserted on every call; outputs checked bitwise before timing")
    print()
    print("(a) strength change 1.0 ↔ 0.5")
    print(table([
        ("way", "ms", "× set_adapters", "× reload"),
        ("ours: reconcile → new scales only", ms(median(r.scales)), f"{ratio(r.scales, r.set_adapters):.2f}×",
         f"{ratio(r.scales, r.reload):.3f}×"),
        ("diffusers: set_adapters alone", ms(median(r.set_adapters)), "1×",
         f"{ratio(r.set_adapters, r.reload):.3f}×"),
        ("reload: unload + load + set_adapters", ms(median(r.reload)), "", "1×"),
    ]))
    speedup = median([b / a for a, b in zip(r.scales, r.reload, strict=True)])
    print(f"ours is {speedup:.0f}× faster than a reload")
    print()
    print("(b) LoRA load into the resident pipeline")
    print(table([
        ("way", "ms", "× read", "× diffusers"),
        ("ours: reconcile → load + scales", ms(median(r.load)), f"{ratio(r.load, r.read):.1f}×",
         f"{ratio(r.load, r.diffusers):.3f}×"),
        ("diffusers: load_lora_weights + set_adapters", ms(median(r.diffusers)), f"{ratio(r.diffusers, r.read):.1f}×",
         "1×"),
        ("read: safetensors load_file (the floor)", ms(median(r.read)), "1×", ""),
        ("ours: reconcile → remove (for information)", ms(median(r.remove)), "", ""),
    ]))
    print()
    print("(c) switch and strength change in a slot prepared for hot-swap")
    print(table([
        ("way", "ms", "× its floor", "× diffusers hot-swap"),
        ("ours: switch to a cached LoRA", ms(median(w.cached)), f"{ratio(w.cached, w.copy):.2f}×",
         f"{ratio(w.cached, w.diffusers):.3f}×"),
        ("floor: foreach copy of the cached tensors", ms(median(w.copy)), "1×", ""),
        ("ours: switch to an uncached LoRA", ms(median(w.uncached)), f"{ratio(w.uncached, w.read_copy):.2f}×",
         f"{ratio(w.uncached, w.diffusers):.3f}×"),
        ("floor: load_file + foreach copy", ms(median(w.read_copy)), "1×", ""),
        ("diffusers: load_lora_weights(hotswap=True)", ms(median(w.diffusers)), "", "1×"),
        ("ours: strength change", ms(median(w.strength)), f"{ratio(w.strength, w.write):.2f}×", ""),
        ("floor: write the slot's scalings", ms(median(w.write)), "1×", ""),
    ]))
    if args.json:
        figures = {"size": args.size, "device": args.device, "repeats": repeats,
                   "strength_ms": median(r.scales) * 1e3, "set_adapters_ms": median(r.set_adapters) * 1e3,
                   "reload_ms": median(r.reload) * 1e3, "load_ms": median(r.load) * 1e3,
                   "diffusers_load_ms": median(r.diffusers) * 1e3, "read_ms": median(r.read) * 1e3,
                   "switch_cached_ms": median(w.cached) * 1e3, "copy_floor_ms": median(w.copy) * 1e3,
                   "switch_cached_x_floor": ratio(w.cached, w.copy),
                   "switch_uncached_ms": median(w.uncached) * 1e3, "read_copy_floor_ms": median(w.read_copy) * 1e3,
                   "switch_uncached_x_floor": ratio(w.uncached, w.read_copy),
                   "diffusers_hotswap_ms": median(w.diffusers) * 1e3,
                   "prepared_strength_ms": median(w.strength) * 1e3, "write_scales_floor_ms": median(w.write) * 1e3,
                   "prepared_strength_x_floor": ratio(w.strength, w.write)}
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
