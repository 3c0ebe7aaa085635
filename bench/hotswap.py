"""Hot-swap, compile and per-step scales through our reconciler, against the ways around them and the floor.

    python bench/hotswap.py                       # tiny demo SD1.5, all four parts: ≈3-5 min (cold compile 1-2 min)
    python bench/hotswap.py --size sd15           # full-size SD1.5 architecture, random weights: ≈4 min + build
    python bench/hotswap.py --size sd15 --compile # the same plus part 3 (a cold full-size compile: minutes more)
    python bench/hotswap.py --device cuda         # the same with the pipelines on a GPU (timings synchronize)

Options: `--repeats N` rounds (default 20 tiny, 6 sd15); `--models-dir DIR` keeps the generated models there and
reuses them (default: a temp dir, removed at the end; sd15 writes ≈4 GB and takes ≈1-2 min to build);
`--threads N` torch threads (default 1, see bench/common.py); `--no-compile` skips part 3 on tiny;
`--inductor-cache DIR` compiles with that inductor cache (default: a fresh temp dir, so the first call is a
cold compile); `--device` where the pipelines live (default cpu; cuda, cuda:1, …): the LoRA cache is counted in a
model manager for that device with the default budgets, as a server's is; `--json` prints the figures as one JSON
object on the last line.

Models: the size's checkpoint and attention LoRA from bench/common.py (tiny: tiny-sd15 + tiny-sd15-style,
rank 4; sd15: the random full-size SD1.5 + a rank-8 LoRA on all 128 attention projections), and a second
LoRA of the same layers, rank and alpha (other random tensors, `common.attention_lora` with another seed),
written next to it. Pipelines come from `nodes.engine.checkpoints.load_pipeline` (fp32, on `--device`) and are held as
reconciler `Resident`s; recipes are built by our LoadCheckpoint and LoadLoRA nodes, then
`recipe.prepared_for_hotswap(rank)` (what HotswapLoRA and CompileModel do).

1. LoRA switch, slot `s` alternating between the two files (each call a real change, the file in the page
   cache), the cases taking turns in one process (order rotating each round):
   hotswap      `reconcile` between prepared recipes differing only in the slot's file: actions asserted to be
                exactly `hotswap:s, scales` on every call.
   delete+load  the same recipes, not prepared, on another resident: asserted `delete:s, load:s, scales`.
   reload       `load_pipeline` of the checkpoint + `reconcile` from the bare recipe (`load:s, scales`), the
                previous pipeline dropped first. diffusers memory-maps safetensors, so page-ins move to the
                first forward (not timed here; with the files in the page cache it measured no slower, sd15).
   scales       (for information) a strength change 1.0 ↔ 0.5 on the hot-swap resident: the `scales` part alone.
   diffusers    (for information) `load_lora_weights(file, adapter_name, hotswap=True)` on a third pipeline
                prepared by hand (`enable_lora_hotswap`): the library's own swap, without the reconciler.
   uncached     (parts 1-2) the hot-swap with an empty LoRA cache (nodes/engine/lora_cache.py): read, convert, copy.
2. The floors, in the same rounds: a `torch._foreach_copy_` of the cached slot-ready tensors into the slot's
   lora_A/lora_B weights (a cached switch's floor); `safetensors.torch.load_file` of the file + that copy (an
   uncached switch's); `load_file` alone.
   Before timing, one UNet forward checks that the hot-swapped UNet equals the delete+load one (within float
   noise: hot-swap pads to the target rank) and the reloaded one, and that the two LoRAs differ.
3. Compile (tiny by default; sd15 only with --compile): a recipe with `compile=Compile()` and hot-swap prepared
   (CompileModel), one CFG-batch UNet forward under `inference_mode` after each of a series of hot-swaps,
   strength changes and scheduled steps (`Resident.set_step`); recompiles counted as deltas of
   `torch._dynamo.utils.counters["stats"]["unique_graphs"]` (0 expected after the first call), each output
   checked against the eager prepared resident with the same recipe.
4. Scale schedule vs constant scale: Sample-like calls (`pipe(…, callback_on_step_end=…)`, Euler, CFG 7,
   latents out) of N steps. ours: the delete+load resident with the constant recipe, and with
   `schedules=((s, ramp_hold spec),)`, `set_step(0)` before the call and `set_step(i + 1)` in the callback,
   as nodes/sampling.py Sample does; diffusers: a plain pipeline with the same LoRA, constant, and with
   `set_adapters` per step in the callback (diffusers' LoRA guide). ms per step from the callback timestamps
   (steps 1…N-1, so prompt encoding is left out), the callback's own cost timed inside it, and the scheduled
   latents checked against the set_adapters ones.
ms are medians; × and differences are medians of per-round ratios / differences.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import common
import torch
from common import Models, interleaved, median, ms, require, table

SLOT = "s"
DEVICE = "cpu"  # --device
STRENGTHS = (1.0, 0.5)
GUIDANCE = 7.0
PROMPT = "a red fox in the snow, watercolor"


@dataclass(frozen=True)
class Size:
    repeats: int
    steps: int  # part 4
    pixels: int  # part 4 image side
    latent: int  # parts 2-3 probe / compiled forward latent side
    changes: int  # part 3: hot-swaps and strength changes after the first compile
    schedule_repeats: int  # part 4 rounds


SIZES = {
    "tiny": Size(repeats=20, steps=20, pixels=64, latent=32, changes=12, schedule_repeats=8),
    "sd15": Size(repeats=6, steps=5, pixels=128, latent=16, changes=6, schedule_repeats=3),
}


# ---------------------------------------------------------------------------------------------- setup


def swap_lora(models: Models) -> Path:
    """A second LoRA with the same layers, rank and alpha as `models.lora`, other random tensors (made once)."""
    from safetensors.torch import save_file

    from nodes.engine.checkpoints import load_pipeline
    from nodes.engine.lora_files import inspect

    path = models.lora_path.with_name(models.lora_path.stem + "-swap.safetensors")
    if path.is_file():
        return path
    info = inspect(models.lora_path)
    rank = info.max_rank
    pipe = load_pipeline(models.checkpoint_path, torch.float32)
    # The demo LoRAs move each weight by 1.5× its spread (nodes.engine.demo_models); the sd15 one by 1×.
    strength = 1.5 if models.checkpoint == common.TINY_FOLDER else 1.0
    tensors, metadata = common.attention_lora(pipe, rank=rank, alpha=float(rank), seed=1, relative_strength=strength)
    # nodes.engine.checkpoints.read_header refuses a file whose first byte is 0x80 (pickle's opcode), which is also
    # any safetensors file whose header length is 128 mod 256: pad the metadata until it is not.
    for pad in range(8):
        save_file(tensors, path, metadata={**metadata, "pad": " " * pad})
        if path.read_bytes()[:1] != b"\x80":
            break
    require(inspect(path).ranks.keys() == info.ranks.keys(), "the swap LoRA targets other layers than the first")
    return path


@dataclass
class Setup:
    models: Models
    files: tuple[str, str]  # LoRA names under loras/
    bare: Any  # ModelRecipe
    plain: dict[str, Any]  # file -> recipe with the LoRA in SLOT at strength 1.0
    prepared: dict[str, Any]  # file -> the same, prepared for hot-swap
    rank: int
    hot: Any = None  # Resident prepared for hot-swap
    cold: Any = None  # Resident not prepared

    @classmethod
    def build(cls, models: Models, swap: Path) -> Setup:
        from nodegraph.context import Context
        from nodegraph.settings import Settings
        from nodes.engine.lora_files import inspect
        from nodes.loaders import LoadCheckpoint
        from nodes.lora import LoadLoRA

        ctx = Context("bench", "bench", Settings(models_dirs=(models.root,)))
        bare = LoadCheckpoint().run(ctx, models.checkpoint, "fp32")["model"]
        files = (models.lora, swap.name)
        plain = {f: LoadLoRA().run(ctx, bare, f, 1.0, 1.0, SLOT, "")["model"] for f in files}
        # LoadLoRA leaves Adapter.rank at 0, so the rank is named here (as HotswapLoRA's hotswap_rank would).
        rank = max(inspect(models.root / "loras" / f).max_rank for f in files)
        prepared = {f: r.prepared_for_hotswap(rank) for f, r in plain.items()}
        require(len({p.hotswap_rank for p in prepared.values()}) == 1, "the prepared recipes differ in rank")
        return cls(models, files, bare, plain, prepared, rank)

    def path(self, name: str) -> str:
        return str(self.models.root / "loras" / name)

    def resident(self) -> Any:
        from nodes.engine.checkpoints import load_pipeline
        from nodes.engine.resident import Resident

        pipe = load_pipeline(self.models.checkpoint_path, torch.float32)
        pipe.set_progress_bar_config(disable=True)
        made = Resident.fresh(pipe, self.bare, scheduler_config=dict(pipe.scheduler.config))
        if DEVICE != "cpu":
            made.move(DEVICE)
        return made

    def other(self, resident: Any) -> str:
        """The file not in the resident's slot now."""
        current = Path(resident.applied.live()[SLOT].path).name
        return self.files[1] if current == self.files[0] else self.files[0]


def reconcile(resident: Any, target: Any, expected: list[str]) -> None:
    from nodes.engine.reconcile import reconcile as run

    actions = run(resident, target)
    require(actions == expected, f"reconcile took {actions}, expected {expected}")


def with_strength(recipe: Any, strength: float) -> Any:
    from nodes.engine.recipe import Adapter

    ops = tuple(replace(op, strength=strength) if isinstance(op, Adapter) and op.slot == SLOT else op
                for op in recipe.ops)
    return replace(recipe, ops=ops)


def probe(pipe: Any, latent: int, batch: int = 1) -> torch.Tensor:
    """One UNet forward on fixed inputs (the shapes a CFG sample at `latent`² uses when batch is 2)."""
    unet = pipe.unet
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, unet.config.in_channels, latent, latent, generator=generator).to(unet.device)
    text = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=generator).to(unet.device)
    with torch.inference_mode():
        out: torch.Tensor = unet(latents, torch.tensor(500.0, device=unet.device), encoder_hidden_states=text).sample
    return out.cpu()  # (on a GPU: waits for it)


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> float:
    """Max abs difference relative to b's spread; `require`s it below `rel`."""
    err = float((a - b).abs().max() / b.std())
    require(err < rel, f"outputs differ by {err:.2e} of their spread")
    return err


# ---------------------------------------------------------------------------------------------- 1 + 2


@dataclass
class Switch:
    hotswap: list[float]
    delete_load: list[float]
    reload: list[float]
    read: list[float]
    scales: list[float]
    diffusers: list[float]
    uncached: list[float]  # the hot-swap with an empty LoRA cache
    copy: list[float]  # the floor of a cached switch: a foreach copy of the cached tensors into the slot
    read_copy: list[float]  # the floor of an uncached switch: load_file + foreach copy


def measure_switch(s: Setup, size: Size, repeats: int) -> Switch:
    from safetensors.torch import load_file

    a, b = s.files
    s.hot, s.cold = s.resident(), s.resident()
    reconcile(s.hot, s.prepared[a], [f"prepare_hotswap:{s.rank}", f"load:{SLOT}", "scales"])
    reconcile(s.cold, s.plain[a], [f"load:{SLOT}", "scales"])
    hot_a, cold_a = probe(s.hot.pipe, size.latent), probe(s.cold.pipe, size.latent)
    close(hot_a, cold_a)
    reconcile(s.hot, s.prepared[b], [f"hotswap:{SLOT}", "scales"])
    reconcile(s.cold, s.plain[b], [f"delete:{SLOT}", f"load:{SLOT}", "scales"])
    hot_b, cold_b = probe(s.hot.pipe, size.latent), probe(s.cold.pipe, size.latent)
    close(hot_b, cold_b)
    require(float((hot_a - hot_b).abs().max() / hot_b.std()) > 1e-2, "the two LoRAs give the same UNet")
    fresh = s.resident()
    reconcile(fresh, s.plain[b], [f"load:{SLOT}", "scales"])
    require(torch.equal(probe(fresh.pipe, size.latent), cold_b), "reload and delete+load give other UNets")
    del fresh

    raw = s.resident().pipe  # diffusers alone: prepared and hot-swapped by hand, no reconciler
    raw.enable_lora_hotswap(target_rank=s.rank)
    raw.load_lora_weights(s.path(a), adapter_name=SLOT)
    state: dict[str, Any] = {"reloaded": None, "strength": STRENGTHS[0], "read": a, "raw": a}

    def hotswap() -> None:
        reconcile(s.hot, with_strength(s.prepared[s.other(s.hot)], state["strength"]), [f"hotswap:{SLOT}", "scales"])

    def delete_load() -> None:
        reconcile(s.cold, s.plain[s.other(s.cold)], [f"delete:{SLOT}", f"load:{SLOT}", "scales"])

    def reload() -> None:
        previous = state["reloaded"]
        target = s.plain[a] if previous is None else s.plain[s.other(previous)]
        state["reloaded"] = None
        del previous  # dropped before the load, as the model manager would
        fresh = s.resident()
        reconcile(fresh, target, [f"load:{SLOT}", "scales"])
        state["reloaded"] = fresh

    def read() -> None:
        state["read"] = b if state["read"] == a else a
        load_file(s.path(state["read"]))

    def diffusers() -> None:
        state["raw"] = b if state["raw"] == a else a
        raw.load_lora_weights(s.path(state["raw"]), adapter_name=SLOT, hotswap=True)

    # The recipes a strength change goes between, built once (a node builds its recipe before the reconciler).
    at_strength = {(f, v): with_strength(s.prepared[f], v) for f in s.files for v in STRENGTHS}

    def scales() -> None:
        state["strength"] = STRENGTHS[1] if state["strength"] == STRENGTHS[0] else STRENGTHS[0]
        current = Path(s.hot.applied.live()[SLOT].path).name
        reconcile(s.hot, at_strength[current, state["strength"]], ["scales"])

    from nodes.engine import lora_cache

    cache = common.lora_cache_on(DEVICE, lora_cache.CACHE)
    reconcile(s.hot, s.prepared[s.other(s.hot)], [f"hotswap:{SLOT}", "scales"])  # both files now in the cache
    targets, sources, keys = common.switch_floor(s.hot, SLOT, [s.path(a), s.path(b)])

    def uncached() -> None:
        lora_cache.CACHE = common.lora_cache_on(DEVICE)  # empty; restored untimed after
        hotswap()

    def restore() -> None:
        lora_cache.CACHE = common.lora_cache_on(DEVICE, cache)

    def copy() -> None:
        state["copy"] = 1 - int(state.get("copy", 0))
        with torch.no_grad():
            torch._foreach_copy_(targets, sources[state["copy"]], non_blocking=True)

    def read_copy() -> None:
        state["read_copy"] = b if state.get("read_copy") == a else a
        tensors = load_file(s.path(state["read_copy"]))
        with torch.no_grad():
            torch._foreach_copy_(targets, [tensors[k] for k in keys])

    t = interleaved(common.synchronized({
        "hotswap": hotswap, "delete_load": delete_load, "reload": reload, "read": read, "scales": scales,
        "diffusers": diffusers, "uncached": uncached, "copy": copy, "read_copy": read_copy}, DEVICE), repeats,
        after={"uncached": restore})
    state["reloaded"] = None
    return Switch(t["hotswap"], t["delete_load"], t["reload"], t["read"], t["scales"], t["diffusers"],
                  t["uncached"], t["copy"], t["read_copy"])


# ---------------------------------------------------------------------------------------------- 3


@dataclass
class Compiled:
    first_s: float
    first_graphs: int
    calls: list[tuple[str, int, float]] = field(default_factory=list)  # (what changed, new graphs, seconds)
    eager: list[float] = field(default_factory=list)  # eager forward seconds of the same recipes
    worst_err: float = 0.0


def measure_compile(s: Setup, size: Size) -> Compiled:
    from torch._dynamo.utils import counters

    from nodes.engine import schedules
    from nodes.engine.recipe import Compile

    a, b = s.files
    compiled = {f: replace(r, compile=Compile()) for f, r in s.prepared.items()}
    resident = s.resident()
    reconcile(resident, compiled[a], [f"prepare_hotswap:{s.rank}", f"load:{SLOT}", "scales", "compile"])

    def forward() -> tuple[torch.Tensor, int, float]:
        before = counters["stats"]["unique_graphs"]
        t0 = time.perf_counter()
        out = probe(resident.pipe, size.latent, batch=2)
        return out, counters["stats"]["unique_graphs"] - before, time.perf_counter() - t0

    def eager(recipe: Any, step: int | None = None) -> tuple[torch.Tensor, float]:
        """The same recipe, uncompiled, on the prepared eager resident (from part 1)."""
        from nodes.engine.reconcile import reconcile as run

        run(s.hot, replace(recipe, compile=None))
        if step is not None:
            s.hot.set_step(step)
        t0 = time.perf_counter()
        out = probe(s.hot.pipe, size.latent, batch=2)
        return out, time.perf_counter() - t0

    out, graphs, seconds = forward()
    result = Compiled(seconds, graphs)
    result.worst_err = close(out, eager(compiled[a])[0], rel=1e-3)
    strengths = (0.5, 1.3, 1.0, -0.7)
    for i in range(size.changes):
        if i % 2 == 0:  # a hot-swap (to the other file, at the current strength)
            current = resident.applied.live()[SLOT]
            target = with_strength(compiled[s.other(resident)], current.strength)
            what, expected = "hot-swap", [f"hotswap:{SLOT}", "scales"]
        else:  # a strength change
            target = with_strength(resident.applied, strengths[(i // 2) % len(strengths)])
            what, expected = "strength", ["scales"]
        reconcile(resident, target, expected)
        out, graphs, seconds = forward()
        want, eager_s = eager(target)
        result.worst_err = max(result.worst_err, close(out, want, rel=1e-3))
        result.calls.append((what, graphs, seconds))
        result.eager.append(eager_s)
    spec = schedules.spec("linear", 1.5, 0.2, 4, 0.0, "")
    scheduled = replace(resident.applied, schedules=((SLOT, spec),))
    reconcile(resident, scheduled, ["scales"])
    for step in range(4):
        resident.set_step(step)
        out, graphs, seconds = forward()
        want, eager_s = eager(scheduled, step)
        result.worst_err = max(result.worst_err, close(out, want, rel=1e-3))
        result.calls.append((f"set_step({step})", graphs, seconds))
        result.eager.append(eager_s)
    return result


# ---------------------------------------------------------------------------------------------- 4


@dataclass
class Run:
    per_step: float  # seconds per step, steps 1..N-1
    callback: float  # seconds per callback call (its own work)
    latents: torch.Tensor


def sample(pipe: Any, size: Size, before: Callable[[], None], each: Callable[[int], None]) -> Run:
    """A Sample-like call: `before()` right before it, `each(step)` in callback_on_step_end, latents out."""
    stamps: list[float] = []
    spent: list[float] = []

    def on_step(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        if DEVICE.startswith("cuda"):
            torch.cuda.synchronize()  # the step's work done: stamps measure it
        t0 = time.perf_counter()
        each(step)
        t1 = time.perf_counter()
        spent.append(t1 - t0)
        stamps.append(t1)
        return {}

    generator = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        before()
        latents = pipe(prompt=PROMPT, negative_prompt=None, num_inference_steps=size.steps, guidance_scale=GUIDANCE,
                       width=size.pixels, height=size.pixels, generator=generator, output_type="latent",
                       callback_on_step_end=on_step).images
    return Run((stamps[-1] - stamps[0]) / (len(stamps) - 1), median(spent), latents.clone())


def measure_schedule(s: Setup, size: Size) -> dict[str, list[Run]]:
    import diffusers

    from nodes.engine import schedules

    euler: Any = diffusers.EulerDiscreteScheduler  # as Sample's "euler"
    a = s.files[0]
    # diffusers' LoRA guide: linspace(1.5, 0.7) over the steps, then a hold (here: the ramp spans all steps).
    spec = schedules.spec("ramp_hold", 1.5, 0.7, size.steps, 0.2, "")
    constant, scheduled = s.plain[a], replace(s.plain[a], schedules=((SLOT, spec),))
    from nodes.engine.reconcile import reconcile as run

    run(s.cold, constant)
    s.cold.pipe.scheduler = euler.from_config(s.cold.scheduler_config)
    plain = s.resident().pipe
    plain.scheduler = euler.from_config(plain.scheduler.config)
    plain.load_lora_weights(s.path(a), adapter_name=SLOT)
    plain.set_adapters([SLOT], [1.0])

    def nothing(step: int = 0) -> None:
        return None

    def ours(recipe: Any) -> Run:
        run(s.cold, recipe)  # untimed: `scales` when the previous call used the other recipe
        if recipe.schedules:
            return sample(s.cold.pipe, size, lambda: s.cold.set_step(0), lambda i: s.cold.set_step(i + 1))
        return sample(s.cold.pipe, size, nothing, nothing)

    def per_step_set_adapters() -> Run:
        def at(step: int) -> None:
            plain.set_adapters([SLOT], [schedules.scale_at(spec, step)])

        try:
            return sample(plain, size, lambda: at(0), lambda i: at(i + 1))
        finally:
            plain.set_adapters([SLOT], [1.0])

    cases: dict[str, Callable[[], Run]] = {
        "ours constant": lambda: ours(constant),
        "ours schedule": lambda: ours(scheduled),
        "diffusers constant": lambda: sample(plain, size, nothing, nothing),
        "diffusers set_adapters": per_step_set_adapters,
    }
    runs: dict[str, list[Run]] = {name: [] for name in cases}
    names = list(cases)
    for name in names:  # warm-up, and the checks
        runs[name].append(cases[name]())
    close(runs["ours constant"][0].latents, runs["diffusers constant"][0].latents, rel=1e-4)
    close(runs["ours schedule"][0].latents, runs["diffusers set_adapters"][0].latents, rel=1e-4)
    moved = runs["ours schedule"][0].latents - runs["ours constant"][0].latents
    require(float(moved.abs().max() / runs["ours constant"][0].latents.std()) > 1e-2, "the schedule changed nothing")
    runs = {name: [] for name in cases}
    for round_ in range(size.schedule_repeats):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            runs[name].append(cases[name]())
    return runs


def set_step_alone(resident: Any, calls: int = 200) -> float:
    """Seconds per `Resident.set_step` on a resident whose recipe has a schedule."""
    t0 = time.perf_counter()
    for i in range(calls):
        resident.set_step(i)
    return (time.perf_counter() - t0) / calls


# ---------------------------------------------------------------------------------------------- main


def ratio(ours: list[float], reference: list[float]) -> float:
    return median([o / r for o, r in zip(ours, reference, strict=True)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=tuple(SIZES), default="tiny")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--models-dir", default=None, help="keep generated models here (default: a temp dir)")
    parser.add_argument("--compile", action="store_true", help="run part 3 (compile) on sd15 too")
    parser.add_argument("--no-compile", action="store_true", help="skip part 3 (compile) on tiny")
    parser.add_argument("--inductor-cache", default=None, help="inductor cache dir (default: a fresh temp dir)")
    parser.add_argument("--device", default="cpu", help="where the pipelines live: cpu (default), cuda, cuda:1, …")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object on the last line")
    common.add_threads_option(parser)
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    common.set_threads(args.threads)
    size = SIZES[args.size]
    repeats = args.repeats or size.repeats
    do_compile = (args.size == "tiny" or args.compile) and not args.no_compile
    cache = tempfile.TemporaryDirectory(prefix="nodegraph-inductor-") if args.inductor_cache is None else None
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = args.inductor_cache or (cache.name if cache else "")

    from nodes.engine import schedules
    from nodes.engine.lora_files import inspect

    started = time.perf_counter()
    compiled: Compiled | None = None
    with common.models(args.size, args.models_dir) as models:
        swap = swap_lora(models)
        info = inspect(models.lora_path)
        size_kb = models.lora_path.stat().st_size / 1024
        setup = Setup.build(models, swap)
        switch = measure_switch(setup, size, repeats)
        spec = schedules.spec("ramp_hold", 1.5, 0.7, 20, 0.2, "")
        from nodes.engine.reconcile import reconcile as run

        run(setup.hot, replace(setup.hot.applied, schedules=((SLOT, spec),)))
        hot_set_step = set_step_alone(setup.hot)
        run(setup.cold, replace(setup.cold.applied, schedules=((SLOT, spec),)))
        cold_set_step = set_step_alone(setup.cold)
        runs = measure_schedule(setup, size)
        if do_compile:
            compiled = measure_compile(setup, size)
    if cache is not None:
        cache.cleanup()
    total = time.perf_counter() - started

    print(f"nodegraph hot-swap — {args.size}: {models.checkpoint}, slot {SLOT!r} alternating {models.lora} ↔ "
          f"{swap.name} (rank {info.max_rank}, {len(info.ranks)} layers, {size_kb:,.0f} KiB each), fp32 {DEVICE}")
    print(common.machine())
    print(f"{repeats} interleaved rounds; ms are medians, × the median of per-round ratios; reconcile's actions "
          "asserted on every call; outputs checked before timing")
    print()
    print(f"1. LoRA switch (hot-swap rank {setup.rank})")
    print(table([
        ("way", "ms", "× hotswap"),
        (f"ours hotswap: reconcile → hotswap:{SLOT}, scales", ms(median(switch.hotswap)), "1×"),
        (f"delete+load: reconcile → delete:{SLOT}, load:{SLOT}, scales", ms(median(switch.delete_load)),
         f"{ratio(switch.delete_load, switch.hotswap):.2f}×"),
        (f"reload: load_pipeline + reconcile → load:{SLOT}, scales", ms(median(switch.reload)),
         f"{ratio(switch.reload, switch.hotswap):.1f}×"),
        ("(info) strength change on the hot-swap resident: scales", ms(median(switch.scales)),
         f"{ratio(switch.scales, switch.hotswap):.2f}×"),
        ("(info) diffusers alone: load_lora_weights(hotswap=True)", ms(median(switch.diffusers)),
         f"{ratio(switch.diffusers, switch.hotswap):.2f}×"),
    ]))
    print()
    print("2. Hot-swap against the floors (a cached file: the copy; an uncached one: the read + copy)")
    print(table([
        ("way", "ms", "× its floor", "× read"),
        ("ours hotswap, file in the LoRA cache", ms(median(switch.hotswap)),
         f"{ratio(switch.hotswap, switch.copy):.2f}×", f"{ratio(switch.hotswap, switch.read):.2f}×"),
        ("floor: foreach copy of the cached tensors into the slot", ms(median(switch.copy)), "1×", ""),
        ("ours hotswap, LoRA cache empty", ms(median(switch.uncached)),
         f"{ratio(switch.uncached, switch.read_copy):.2f}×", f"{ratio(switch.uncached, switch.read):.2f}×"),
        ("floor: load_file + foreach copy", ms(median(switch.read_copy)), "1×", ""),
        ("diffusers alone: load_lora_weights(hotswap=True)", ms(median(switch.diffusers)), "",
         f"{ratio(switch.diffusers, switch.read):.1f}×"),
        ("read: safetensors.torch.load_file", ms(median(switch.read)), "", "1×"),
    ]))
    print()
    print(f"3. Compiled UNet (CompileModel: compile=Compile(), hot-swap prepared), one CFG forward "
          f"(batch 2, {size.latent}×{size.latent} latents) after each change")
    if compiled is None:
        print("   skipped (sd15: add --compile; tiny: --no-compile was given)")
    else:
        recompiles = sum(g for _, g, _ in compiled.calls)
        print(f"   first call (compile, inductor cache {'fresh' if cache is not None else args.inductor_cache}): "
              f"{compiled.first_s:.1f} s, {compiled.first_graphs} graph(s)")
        counts: dict[str, list[int]] = {}
        for what, graphs, _ in compiled.calls:
            counts.setdefault(what.split("(")[0], []).append(graphs)
        print("   " + ", ".join(f"{len(g)} × {what}: {sum(g)} new graphs" for what, g in counts.items()))
        print(f"   recompiles after the first call: {recompiles} over {len(compiled.calls)} changed calls "
              f"({common.verdict(recompiles == 0)}); worst output difference to eager: "
              f"{compiled.worst_err:.1e} of the spread")
        later = [sec for _, _, sec in compiled.calls]
        print(f"   forward after a change: compiled {ms(median(later))} ms, eager (same recipe) "
              f"{ms(median(compiled.eager))} ms")
    print()
    print(f"4. Scale schedule vs constant scale: {size.steps} Euler steps, {size.pixels}×{size.pixels}, CFG "
          f"{GUIDANCE:g}, {size.schedule_repeats} rounds after one warm-up (ms/step: steps 1…{size.steps - 1})")

    def per_step(name: str) -> list[float]:
        return [r.per_step for r in runs[name]]

    def diff(name: str, reference: str) -> str:
        d = median([x - y for x, y in zip(per_step(name), per_step(reference), strict=True)])
        return f"{d * 1e3:+.2f}"

    rows: list[tuple[str, ...]] = [("way", "ms/step", "Δ ms/step vs constant", "callback ms/step")]
    for name, reference in (("ours constant", ""), ("ours schedule", "ours constant"),
                            ("diffusers constant", ""), ("diffusers set_adapters", "diffusers constant")):
        label = {"ours constant": "ours, constant strength",
                 "ours schedule": "ours, ScaleSchedule: set_step in the callback",
                 "diffusers constant": "diffusers, constant set_adapters",
                 "diffusers set_adapters": "diffusers, set_adapters in the callback (guide)"}[name]
        rows.append((label, f"{median(per_step(name)) * 1e3:.2f}", diff(name, reference) if reference else "",
                     f"{median([r.callback for r in runs[name]]) * 1e3:.3f}"))
    print(table(rows))
    print("   Δ is whole steps' per-round difference, within the machine's noise when that exceeds the callback "
          "column (the callback's own cost, timed inside it)")
    print(f"   set_step alone ({len(info.ranks)} layers): {cold_set_step * 1e6:.0f} µs (float scaling, "
          f"not prepared), {hot_set_step * 1e6:.0f} µs (tensor scaling, prepared: one batched write)")
    print()
    print(f"total {total:.0f} s")
    if args.json:
        figures: dict[str, Any] = {
            "size": args.size, "device": DEVICE, "repeats": repeats, "hotswap_rank": setup.rank,
            **{f"{name}_ms": median(getattr(switch, name)) * 1e3 for name in (
                "hotswap", "delete_load", "reload", "read", "scales", "diffusers", "uncached", "copy", "read_copy")},
            "hotswap_x_copy": ratio(switch.hotswap, switch.copy),
            "uncached_x_read_copy": ratio(switch.uncached, switch.read_copy),
            "recompiles": None if compiled is None else sum(g for _, g, _ in compiled.calls),
            "set_step_prepared_us": hot_set_step * 1e6, "set_step_unprepared_us": cold_set_step * 1e6,
            "total_s": total}
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
