"""Cold checkpoint loads: `load_pipeline` against the raw safetensors read of the same files, and the GPU round trip.

    python bench/load.py                          # makes ≈13 GB of checkpoints in a temp dir (≈1 min), 5 rounds
    python bench/load.py --keep /tmp/loadbench    # makes them there once and reuses them on later runs

A run is ≈25 min on a 2-core machine: 5 rounds of 10 fresh processes, each ≈10 s of imports and warm-up
before its timed load.

Options: `--repeats N` rounds (default 5); `--keep DIR` keeps the generated checkpoints in DIR (default: a temp
dir, removed at the end); `--warm` leaves the page cache alone instead of evicting the files before each run;
`--first-in-process` drops the warm-up load (see below); `--threads N` torch threads (default 1, see
bench/common.py).

Checkpoints (bench/load_models.py): one full-size SD1.5-architecture pipeline with random weights (UNet ≈860 M
parameters, SD VAE, CLIP ViT-L/14 text tower with the real 49408-token vocabulary: every tensor the size of the
released checkpoint's), stored four ways: a diffusers folder and a single ldm-layout `.safetensors` file, each in
float32 (4.3 GB) and float16 (2.1 GB). Every one is loaded as float32, on the CPU.

Cases, each run in a fresh child process, the cases of a checkpoint taking turns in every round (order rotating):
  raw    `safetensors.torch.load_file` of every weights file of the checkpoint, then one read per 4 KiB page of
         every tensor: the bytes really read, the least any load must do.
  cast   (float16 files only) raw, plus `.to(torch.float32)` of every tensor: the least a float32 load of
         float16 files must do (it needs 4.3 GB of new memory, written once).
  ours   `nodes.engine.checkpoints.load_pipeline(path, torch.float32)`, then the same page reads over every parameter
         and buffer of the UNet, VAE and text encoder. diffusers memory-maps safetensors, so `load_pipeline`
         returns before most bytes are read ("returns" column); the page reads finish the load, as a first
         sampling step would.
Before timing, each child imports the libraries and warms the process up with the same kind of work on the tiny
demo models (so that one-time per-process costs, lazy imports and regex compilation in transformers, are not
counted: a runtime pays them once), then evicts the checkpoint's files from the page cache
(`posix_fadvise(DONTNEED)`; `fincore` confirms it when installed). Single files need a config folder derived from
their header; it is cached by header hash across processes, built once before the rounds.
Seconds are medians; × is the median of per-round ratios. Peak RSS is the child's VmHWM (file pages of
memory-mapped weights count; not `ru_maxrss`, which Linux carries over from the parent process); anon is the
child's private memory (RssAnon) after the load: what it holds beyond the page cache.
Target: ours ≤ 1.5 × raw for each checkpoint whose file dtype is the load dtype; for float16 files loaded as
float32 the conversion's own floor is `cast`, and ours is checked against that too.

GPU round trip (only when `torch.cuda.is_available()`): the float16 folder loaded as float16 and moved to the GPU,
then evicted to the CPU and brought back, as the model manager does: `pipe.to("cpu")` / `pipe.to("cuda")`, and
with pinned host buffers allocated once (copies `non_blocking`, one synchronize per direction), against one flat
pinned copy of the same number of bytes each way (the link's floor). Weights are checked unchanged afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import common
import load_models
from common import median, require, table, verdict

TARGET = 1.5
REPEATS = 5
PAGE = 4096
CHECKPOINTS = {  # name: (storage dtype, layout)
    "fp32 folder": ("fp32", "folder"),
    "fp32 single file": ("fp32", "file"),
    "fp16 folder": ("fp16", "folder"),
    "fp16 single file": ("fp16", "file"),
}


def checkpoint_path(root: Path, name: str) -> Path:
    storage, layout = CHECKPOINTS[name]
    return load_models.folder(root, storage) if layout == "folder" else load_models.single_file(root, storage)


def config_cache(root: Path) -> Path:
    return root / "single-file-configs"


# ---------------------------------------------------------------------------------------------- child


def touch(tensors: list[Any]) -> float:
    """Read one element in every 4 KiB page of each tensor (distinct storages once): the bytes come in from
    disk or the page cache, and nothing is copied."""
    import torch

    seen: set[int] = set()
    total = 0.0
    with torch.no_grad():
        for tensor in tensors:
            if tensor.device.type != "cpu" or not tensor.numel() or tensor.data_ptr() in seen:
                continue
            seen.add(tensor.data_ptr())
            flat = tensor.detach().reshape(-1)
            total += float(flat[:: max(1, PAGE // flat.element_size())].float().sum())
    return total


def model_tensors(pipe: Any) -> list[Any]:
    return [t for m in (pipe.unet, pipe.vae, pipe.text_encoder) for t in (*m.parameters(), *m.buffers())]


def run_case(case: str, path: Path, cache_dir: Path) -> tuple[list[Any], Callable[[], int]]:
    """Do one case's load; return the tensors it produced and how to count the elements it loaded (untimed)."""
    import torch
    from safetensors.torch import load_file

    from nodes.engine.checkpoints import load_pipeline

    if case == "ours":
        pipe = load_pipeline(path, torch.float32, cache_dir=cache_dir)
        # CLIP's position ids are a buffer that no file stores; count only what a file holds.
        return model_tensors(pipe), lambda: sum(
            v.numel() for m in (pipe.unet, pipe.vae, pipe.text_encoder) for k, v in m.state_dict().items()
            if not k.endswith("position_ids")
        )
    tensors = [t for f in load_models.weight_files(path) for t in load_file(f).values()]
    if case == "cast":
        tensors = [t.to(torch.float32) for t in tensors]
    return tensors, lambda: sum(t.numel() for t in tensors)


def evict(files: list[Path]) -> None:
    """Drop the files' pages from the page cache (clean pages that no process maps; no privileges needed)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_bytes(files: list[Path]) -> int | None:
    """How much of the files is in the page cache, from util-linux `fincore` (None where it is missing)."""
    if shutil.which("fincore") is None:
        return None
    done = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", *map(str, files)],
                          capture_output=True, text=True)
    return sum(int(line) for line in done.stdout.split()) if done.returncode == 0 else None


def status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def warm_up(case: str, tiny: Path, cache_dir: Path) -> None:
    """The same kind of work on the tiny demo models, so that per-process first-call costs are paid before timing."""
    import torch
    from safetensors.torch import load_file

    from nodes.engine.checkpoints import load_pipeline

    if case == "ours":
        for name in ("tiny-sd15", "tiny-sd15.safetensors"):
            touch(model_tensors(load_pipeline(tiny / name, torch.float32, cache_dir=cache_dir)))
    else:
        for f in load_models.weight_files(tiny / "tiny-sd15"):
            touch([t.to(torch.float32) for t in load_file(f).values()])


def child(case: str, name: str, root: Path, cold: bool, warm_up_first: bool) -> dict[str, Any]:
    # Everything a runtime has imported before it loads a checkpoint.
    import diffusers  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

    import nodes.engine.checkpoints  # noqa: F401

    path = checkpoint_path(root, name)
    files = load_models.weight_files(path)
    if warm_up_first:
        warm_up(case, root / "demo" / "checkpoints", config_cache(root))
    if cold:
        evict(files)
    resident = resident_bytes(files)
    rss_before = status_kib("VmRSS")
    started = time.perf_counter()
    tensors, elements = run_case(case, path, config_cache(root))
    returned = time.perf_counter()
    touch(tensors)
    finished = time.perf_counter()
    return {
        "seconds": finished - started,
        "returns": returned - started,
        "elements": elements(),
        "resident_before": resident,
        "rss_before_gib": rss_before / 2**20,
        "peak_rss_gib": status_kib("VmHWM") / 2**20,
        "anon_gib": status_kib("RssAnon") / 2**20,
    }


# ---------------------------------------------------------------------------------------------- parent


@dataclass
class Row:
    name: str
    runs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def seconds(self, case: str, key: str = "seconds") -> float:
        return median([r[key] for r in self.runs[case]])

    def ratio(self, case: str, baseline: str) -> float:
        pairs = zip(self.runs[case], self.runs[baseline], strict=True)
        return median([o["seconds"] / b["seconds"] for o, b in pairs])

    def gib(self, case: str, key: str) -> str:
        return f"{median([r[key] for r in self.runs[case]]):.2f}"


def run_child(case: str, name: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", case, "--checkpoint", name, "--keep", str(root),
               "--threads", str(args.threads)]
    command += ["--warm"] * args.warm + ["--first-in-process"] * args.first_in_process
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    require(done.returncode == 0, f"{case} load of {name} failed:\n{done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def cases_for(name: str) -> list[str]:
    return ["raw", "cast", "ours"] if CHECKPOINTS[name][0] == "fp16" else ["raw", "ours"]


def measure(args: argparse.Namespace, root: Path) -> list[Row]:
    rows = {name: Row(name, {case: [] for case in cases_for(name)}) for name in CHECKPOINTS}
    for round_ in range(args.repeats):
        for name, row in rows.items():
            cases = cases_for(name)
            for case in cases[round_ % len(cases) :] + cases[: round_ % len(cases)]:
                result = run_child(case, name, args, root)
                row.runs[case].append(result)
        done = ", ".join(f"{n} {r.runs['ours'][-1]['seconds']:.1f}/{r.runs['raw'][-1]['seconds']:.1f} s"
                         for n, r in rows.items())
        print(f"  round {round_ + 1}/{args.repeats}: ours/raw {done}", flush=True)
    for row in rows.values():
        counts = {r["elements"] for runs in row.runs.values() for r in runs}
        require(len(counts) == 1, f"{row.name}: the cases loaded different numbers of elements: {counts}")
    return list(rows.values())


def report(rows: list[Row], args: argparse.Namespace) -> bool:
    print()
    print(table([
        ("checkpoint → float32", "raw s", "cast s", "ours s", "ours returns s", "× raw", "× cast",
         "raw peak GiB", "ours peak GiB", "ours anon GiB"),
        *[(
            r.name, f"{r.seconds('raw'):.2f}", f"{r.seconds('cast'):.2f}" if "cast" in r.runs else "",
            f"{r.seconds('ours'):.2f}", f"{r.seconds('ours', 'returns'):.2f}", f"{r.ratio('ours', 'raw'):.2f}×",
            f"{r.ratio('ours', 'cast'):.2f}×" if "cast" in r.runs else "",
            r.gib("raw", "peak_rss_gib"), r.gib("ours", "peak_rss_gib"), r.gib("ours", "anon_gib"),
        ) for r in rows],
    ]))
    before = [r["rss_before_gib"] for row in rows for r in row.runs["ours"]]
    print(f"(RSS before each timed load: ≈{median(before):.2f} GiB of libraries and interpreter, in every column)")
    resident = [r["resident_before"] for row in rows for runs in row.runs.values() for r in runs]
    if all(value is not None for value in resident):
        print(f"page cache before each timed load: at most {max(resident) / 2**20:.1f} MiB of the weights resident")
    print()
    ok = True
    for r in rows:
        if "cast" in r.runs:
            x = r.ratio("ours", "cast")
            print(f"{r.name}: ours ≤ {TARGET:g} × (raw read + cast): {verdict(x <= TARGET)} ({x:.2f}×; "
                  f"{r.ratio('ours', 'raw'):.2f}× the raw read of half as many bytes)")
        else:
            x = r.ratio("ours", "raw")
            print(f"{r.name}: ours ≤ {TARGET:g} × raw read: {verdict(x <= TARGET)} ({x:.2f}×)")
        ok = ok and x <= TARGET
    return ok


# ---------------------------------------------------------------------------------------------- GPU


def gpu_round_trip(root: Path, repeats: int) -> None:
    import torch

    if not torch.cuda.is_available():
        print("GPU round trip: skipped (no CUDA device; torch.cuda.is_available() is False)")
        return
    from nodes.engine.checkpoints import load_pipeline

    pipe = load_pipeline(load_models.folder(root, "fp16"), torch.float16, cache_dir=config_cache(root))
    pipe.to("cuda")

    def weights() -> list[Any]:
        # Collected afresh each time: `.to()` keeps parameter objects but replaces buffers with new tensors.
        return [t for m in (pipe.unet, pipe.vae, pipe.text_encoder) for t in (*m.parameters(), *m.buffers())]

    start = weights()
    count, nbytes = len(start), sum(t.numel() * t.element_size() for t in start)
    probe = {i: start[i].detach().cpu().clone() for i in range(0, count, max(1, count // 64))}
    host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in start]  # allocated once, reused
    del start

    def synced(fn: Any) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    def pinned_out() -> None:
        tensors = weights()
        for t, h in zip(tensors, host, strict=True):
            h.copy_(t.data, non_blocking=True)
        torch.cuda.synchronize()  # the copies must land before the device memory is let go
        for t, h in zip(tensors, host, strict=True):
            t.data = h

    def pinned_in() -> None:
        for t, h in zip(weights(), host, strict=True):
            t.data = h.to("cuda", non_blocking=True)

    flat_host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    flat_device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    times: dict[str, list[float]] = {k: [] for k in ("plain out", "plain in", "pinned out", "pinned in",
                                                     "floor out", "floor in")}
    for _ in range(repeats):
        times["plain out"].append(synced(lambda: pipe.to("cpu")))
        times["plain in"].append(synced(lambda: pipe.to("cuda")))
        times["pinned out"].append(synced(pinned_out))
        times["pinned in"].append(synced(pinned_in))
        times["floor out"].append(synced(lambda: flat_host.copy_(flat_device, non_blocking=True)))
        times["floor in"].append(synced(lambda: flat_device.copy_(flat_host, non_blocking=True)))
    tensors = weights()
    require(all(t.device.type == "cuda" for t in tensors), "round trip left weights off the GPU")
    require(all(torch.equal(tensors[i].cpu(), before) for i, before in probe.items()), "round trip changed weights")

    def cell(key: str) -> tuple[str, str]:
        s = median(times[key])
        return f"{s * 1e3:.0f}", f"{nbytes / s / 1e9:.1f}"

    print(f"GPU round trip of the evicted fp16 pipeline ({nbytes / 2**30:.2f} GiB, {count} tensors), "
          f"{torch.cuda.get_device_name()}, median of {repeats}:")
    lines = [("way", "GPU → CPU ms", "GB/s", "CPU → GPU ms", "GB/s", "round trip ×floor")]
    floor = median(times["floor out"]) + median(times["floor in"])
    for way in ("plain", "pinned", "floor"):
        out, back = cell(f"{way} out"), cell(f"{way} in")
        trip = median(times[f"{way} out"]) + median(times[f"{way} in"])
        lines.append((way, *out, *back, f"{trip / floor:.2f}×"))
    print(table(lines))


# ---------------------------------------------------------------------------------------------- main


@contextmanager
def bench_root(keep: str | None) -> Iterator[Path]:
    if keep is not None:
        yield Path(keep)
        return
    with tempfile.TemporaryDirectory(prefix="nodegraph-load-") as tmp:
        yield Path(tmp)


def prepare(root: Path) -> None:
    """Make the checkpoints and the tiny demo models, and derive the single files' config folders once."""
    import torch

    from nodes.engine.checkpoints import load_pipeline
    from nodes.engine.demo_models import make_demo_models

    load_models.make(root)
    make_demo_models(root / "demo")
    for name in CHECKPOINTS:
        if CHECKPOINTS[name][1] == "file":
            started = time.perf_counter()
            load_pipeline(checkpoint_path(root, name), torch.float32, cache_dir=config_cache(root))
            print(f"  {name}: config folder ready ({time.perf_counter() - started:.1f} s, first load included)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--keep", default=None, help="make the checkpoints in this dir once and reuse them")
    parser.add_argument("--warm", action="store_true", help="leave the files in the page cache")
    parser.add_argument("--first-in-process", action="store_true", help="no warm-up load in the child process")
    parser.add_argument("--child", choices=("raw", "cast", "ours"), help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", choices=tuple(CHECKPOINTS), help=argparse.SUPPRESS)
    common.add_threads_option(parser)
    args = parser.parse_args()
    common.set_threads(args.threads)

    if args.child:
        os.environ["NODEGRAPH_CLIP_BPE"] = str(load_models.bpe_path(Path(args.keep)).resolve())
        result = child(args.child, args.checkpoint, Path(args.keep), not args.warm, not args.first_in_process)
        print(json.dumps(result))
        return 0

    with bench_root(args.keep) as root:
        os.environ["NODEGRAPH_CLIP_BPE"] = str(load_models.bpe_path(root).resolve())
        prepare(root)
        print(f"{args.repeats} rounds, each case in a fresh process, "
              f"page cache {'warm' if args.warm else 'evicted before each timed load'}", flush=True)
        rows = measure(args, root)
        print()
        print(f"nodegraph checkpoint loads, {'page cache warm' if args.warm else 'cold (page cache evicted)'} — "
              "full-size SD1.5 architecture, random weights, loaded as float32 on the CPU")
        print(common.machine())
        print(f"{args.repeats} rounds; seconds are medians, × the median of per-round ratios; "
              f"{'first load in each process' if args.first_in_process else 'process warmed up on tiny models'}")
        ok = report(rows, args)
        print()
        gpu_round_trip(root, args.repeats)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
