"""The cold path: a fresh process's first prompt on a full-size SD1.5 fp16 single file, against its floor.

    python bench/cold.py [--keep DIR] [--repeats N] [--json] [--comfy DIR --comfy-python PY [--comfy-pythonpath P]]
    python bench/cold.py --startup [--repeats N] [--base REV] [--json]   # validate / nodes / run start-up: startup.py

ComfyUI (GPL) is never part of this project: point --comfy at a checkout elsewhere, run by the Python of its own
environment (README, Benchmarks, says how it was set up for the figures there).

The checkpoint is bench/load_models.py's random full-size SD1.5 (860 M-parameter UNet, SD VAE, CLIP ViT-L text
tower), one ldm-layout file stored in float16 (2.1 GB), made once in `--keep DIR` (default: a temp dir). The
prompt is ComfyUI's text-to-image graph in its API format (CheckpointLoaderSimple, two CLIPTextEncode,
EmptyLatentImage, KSampler euler/normal 4 steps cfg 8 at 64×64, VAEDecode, SaveImage): the same file runs
unchanged here and in ComfyUI. Loads are float32 (this CPU has no bf16 units, so `auto` is float32 too).

Every measurement is a fresh child process (a real cold start of Python and its imports), the best of
`--repeats` (default 3) because the machine is shared; the page cache is left warm (the file was read before).
  floor      `import torch, safetensors`, `safetensors.torch.load_file` of the file and `.to(float32)` of every
             tensor, timed from the child's spawn: the least any float32 load of it must do.
  sampling   the prompt's own work on loaded models: the graph run through our executor once (loading), then
             again with fresh executors on the same resident pipeline (two encodes, 4 steps, one decode).
  run        `nodegraph run` of the graph, spawn to exit; "first ever": the derived config folder
             (checkpoints.build_once) absent; "after restart": present.
  serve      `nodegraph serve` spawned, ready (GET /api/jobs answers), then POST /api/jobs of the graph
             until the job is finished: sent at ready (start → first image, the warm-up included), and sent
             once the server logs its warm-up done (the first prompt of a started server, as ComfyUI's
             below, which imports everything before it is ready); "first ever" / "after restart" as for run.
  breakdown  one child timing its stages in order: imports (torch; diffusers + transformers; peft; the
             node registry), the config folder (read header, derive or find the configs and tokenizer),
             load_pipeline (meta build, name mapping, read + cast), and per node the first run against a
             second (the first forward's one-time costs). Also load_pipeline through diffusers'
             `from_single_file` (the path before nodes/engine/single_file.py), for comparison.
  comfy      (with --comfy) ComfyUI's `main.py --cpu` from DIR, run by PY (its own venv): ready
             (GET /system_stats), then POST /prompt until /history has the outputs.
Ratios: first prompt / (floor + sampling). Target (issue 16): ≤ 1.3×, and faster than ComfyUI's first prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TARGET = 1.3
FILE = "sd15-fp16.safetensors"


def workflow(seed: int = 42) -> dict[str, Any]:
    """ComfyUI's default text-to-image graph, in its API format, on the benchmark file."""
    return {
        "3": {"class_type": "KSampler", "inputs": {
            "seed": seed, "steps": 4, "cfg": 8.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": FILE}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a glass bottle on a beach", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "text, watermark", "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "cold", "images": ["8", 0]}},
    }


# ---------------------------------------------------------------------------------------------- children


def mark(marks: dict[str, float], name: str) -> None:
    marks[name] = time.time()


def child_floor(path: str, marks: dict[str, float]) -> None:
    import torch
    from safetensors.torch import load_file

    mark(marks, "imports")
    tensors = {k: v.to(torch.float32) for k, v in load_file(path).items()}
    mark(marks, "read + cast")
    assert sum(t.numel() for t in tensors.values()) > 10**9


def _executor(models_dir: str, out: str, manager: Any = None) -> Any:
    from nodegraph.executor import Executor
    from nodegraph.models import ModelManager
    from nodegraph.registry import load_registry
    from nodegraph.settings import Settings

    settings = Settings.from_args([models_dir], out, [], None)
    return Executor(load_registry(settings.nodes_dirs), settings, models=manager or ModelManager(device="cpu"))


def _run(executor: Any) -> dict[str, float]:
    from nodegraph import workflow as wf

    result = executor.run(wf.from_json(workflow()))
    assert result.status == "ok", result.errors
    return {f"{record.node_type} {node}": record.seconds for node, record in result.nodes.items()}


def child_sampling(models_dir: str, out: str, marks: dict[str, float]) -> dict[str, Any]:
    first = _executor(models_dir, out)
    _run(first)
    mark(marks, "loaded")
    best: dict[str, float] | None = None
    for _ in range(3):
        started = time.perf_counter()
        nodes = _run(_executor(models_dir, out, first.models))
        nodes["total"] = time.perf_counter() - started
        best = nodes if best is None or nodes["total"] < best["total"] else best
    return {"sampling": best}


def child_breakdown(path: str, models_dir: str, out: str, marks: dict[str, float], diffusers_path: bool) -> Any:
    import torch

    mark(marks, "import torch")
    import diffusers  # noqa: F401
    import transformers  # noqa: F401
    from diffusers import StableDiffusionPipeline  # noqa: F401

    mark(marks, "import diffusers, transformers")
    import peft  # noqa: F401

    mark(marks, "import peft")
    import nodes.engine.pipelines as pipelines
    from nodes.engine import checkpoints, single_file, single_file_configs

    executor = _executor(models_dir, out)
    mark(marks, "import nodegraph + nodes, registry")
    header = checkpoints.read_header(path)
    single_file_configs.single_file_config_dir(Path(path), header, "sd15")
    mark(marks, "config folder (header, configs, tokenizer)")
    if diffusers_path:
        single_file.load_sd15_file = lambda *args: None  # type: ignore[assignment]
    loads: list[float] = []
    original = pipelines.load_pipeline

    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        pipe = original(*args, **kwargs)
        loads.append(time.perf_counter() - started)
        return pipe

    pipelines.load_pipeline = timed  # type: ignore[assignment]
    first = _run(executor)
    mark(marks, "first run of the graph")
    second = _run(_executor(models_dir, out, executor.models))
    return {"load_pipeline": loads[0], "first": first, "second": second, "threads": torch.get_num_threads()}


def child_main(args: argparse.Namespace) -> None:
    marks: dict[str, float] = {}
    extra: Any = None
    if args.child == "floor":
        child_floor(args.path, marks)
    elif args.child == "sampling":
        extra = child_sampling(args.models_dir, args.out, marks)
    else:
        extra = child_breakdown(args.path, args.models_dir, args.out, marks, args.child == "breakdown-diffusers")
    print("RESULT " + json.dumps({"marks": marks, "extra": extra}), flush=True)


# ---------------------------------------------------------------------------------------------- parent


def environment(root: Path, cache: Path) -> dict[str, str]:
    import load_models

    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "XDG_CACHE_HOME": str(cache),
            "NODEGRAPH_CLIP_BPE": str(load_models.bpe_path(root)),
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")])}


def spawn_child(case: str, root: Path, cache: Path, out: Path) -> dict[str, Any]:
    models = root / "models"
    command = [sys.executable, str(HERE / "cold.py"), "--child", case, "--path", str(models / "checkpoints" / FILE),
               "--models-dir", str(models), "--out", str(out)]
    started = time.time()
    done = subprocess.run(command, env=environment(root, cache), capture_output=True, text=True, check=False)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if done.returncode or line is None:
        raise SystemExit(f"child {case} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    result = json.loads(line.removeprefix("RESULT "))
    result["marks"] = {k: v - started for k, v in result["marks"].items()}
    return dict(result)


def time_run(root: Path, cache: Path, out: Path, wf_path: Path) -> float:
    command = [sys.executable, "-m", "nodegraph.cli", "run", "--models-dir", str(root / "models"),
               "--output-dir", str(out), str(wf_path)]
    started = time.perf_counter()
    done = subprocess.run(command, env=environment(root, cache), capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"nodegraph run failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return time.perf_counter() - started


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(url: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(request, timeout=600) as answer:
        return json.loads(answer.read() or b"null")


def wait_ready(url: str, process: subprocess.Popen[bytes], started: float) -> float:
    while True:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode} before it was ready")
        try:
            http(url)
            return time.perf_counter() - started
        except OSError:
            time.sleep(0.02)


def time_server(command: list[str], env: dict[str, str], ready_path: str, port: int, submit: Any,
                finished: Any, log: Path, wait_for: str = "") -> tuple[float, float]:
    """(start → ready, POST → finished) for one fresh server process; with `wait_for`, the POST is sent once
    the server's log has that text."""
    base = f"http://127.0.0.1:{port}"
    with log.open("wb") as sink:
        started = time.perf_counter()
        process = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
        try:
            ready = wait_ready(base + ready_path, process, started)
            while wait_for and wait_for not in log.read_text(errors="replace"):
                time.sleep(0.05)
            posted = time.perf_counter()
            job = submit(base)
            while not finished(base, job):
                time.sleep(0.02)
            return ready, time.perf_counter() - posted
        finally:
            process.terminate()
            process.wait()


def time_serve(root: Path, cache: Path, out: Path, warm: bool) -> tuple[float, float, float]:
    """(start → ready, POST → finished, the warm-up's own seconds from the server's log)."""
    port = free_port()
    data = Path(tempfile.mkdtemp(prefix="cold-serve-"))
    command = [sys.executable, "-m", "nodegraph.cli", "serve", "--port", str(port), "--models-dir",
               str(root / "models"), "--output-dir", str(out), "--data-dir", str(data)]

    def submit(base: str) -> str:
        return str(http(base + "/api/jobs", {"workflow": workflow()})["job_id"])

    def finished(base: str, job: str) -> bool:
        status = http(f"{base}/api/jobs/{job}")["status"]
        if status in ("error", "interrupted", "cancelled"):
            raise SystemExit(f"job {job}: {status}")
        return bool(status == "ok")

    try:
        ready, prompt = time_server(command, environment(root, cache), "/api/jobs", port, submit, finished,
                                    out / "serve.log", "warmed up in" if warm else "")
        found = re.search(r"warmed up in ([\d.]+) s", (out / "serve.log").read_text(errors="replace"))
        return ready, prompt, float(found[1]) if found else float("nan")
    finally:
        shutil.rmtree(data, ignore_errors=True)


def time_comfy(comfy: Path, python: str, pythonpath: str, root: Path, out: Path) -> tuple[float, float]:
    port = free_port()
    paths = out / "extra_model_paths.yaml"
    paths.write_text(f"bench:\n  base_path: {root / 'models'}\n  checkpoints: checkpoints\n")
    command = [python, str(comfy / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--extra-model-paths-config", str(paths), "--output-directory", str(out / "comfy"),
               "--disable-auto-launch"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": pythonpath}

    def submit(base: str) -> str:
        return str(http(base + "/prompt", {"prompt": workflow(), "client_id": "cold"})["prompt_id"])

    def finished(base: str, job: str) -> bool:
        entry = http(f"{base}/history/{job}").get(job)
        if entry and entry.get("status", {}).get("status_str") == "error":
            raise SystemExit(f"ComfyUI failed the prompt: {entry['status']}")
        return bool(entry and entry.get("outputs"))

    return time_server(command, env, "/system_stats", port, submit, finished, out / "comfy.log")


def best(values: list[float]) -> float:
    return min(values)


def main() -> None:
    if "--startup" in sys.argv:
        import startup

        startup.main([arg for arg in sys.argv[1:] if arg != "--startup"])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=Path, help="make the checkpoint here once and reuse it")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--comfy", type=Path, help="a ComfyUI checkout (never part of this project)")
    parser.add_argument("--comfy-python", default="python", help="the Python of ComfyUI's own environment")
    parser.add_argument("--comfy-pythonpath", default="", help="PYTHONPATH for ComfyUI's process")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--models-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return
    import load_models

    root = args.keep or Path(tempfile.mkdtemp(prefix="coldbench-"))
    checkpoints = root / "models" / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    source = load_models.make_single_file(root, "fp16")
    if not (checkpoints / FILE).exists():
        os.symlink(source, checkpoints / FILE)
    out = Path(tempfile.mkdtemp(prefix="coldbench-out-"))
    wf_path = out / "workflow.json"
    wf_path.write_text(json.dumps(workflow()))
    cache = out / "cache"
    figures: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        figures.setdefault(name, []).append(value)

    breakdowns: dict[str, Any] = {}
    for round_ in range(args.repeats):
        print(f"round {round_ + 1}/{args.repeats} …", file=sys.stderr, flush=True)
        floor = spawn_child("floor", root, cache, out)["marks"]
        add("floor: imports", floor["imports"])
        add("floor: read + cast", floor["read + cast"] - floor["imports"])
        add("floor: spawn → read + cast", floor["read + cast"])
        add("sampling (loaded models)", spawn_child("sampling", root, cache, out)["extra"]["sampling"]["total"])
        shutil.rmtree(cache, ignore_errors=True)
        add("run, first ever", time_run(root, cache, out, wf_path))
        add("run, after restart", time_run(root, cache, out, wf_path))
        ready, prompt, _ = time_serve(root, cache, out, warm=False)
        add("serve: ready", ready)
        add("serve: first prompt sent at ready", prompt)
        add("serve: start → first image", ready + prompt)
        shutil.rmtree(cache, ignore_errors=True)
        add("serve, first ever: first prompt after warm-up", time_serve(root, cache, out, warm=True)[1])
        _, prompt, warm_up = time_serve(root, cache, out, warm=True)
        add("serve, after restart: first prompt after warm-up", prompt)
        add("serve: the warm-up itself (in the background)", warm_up)
        for case in ("breakdown", "breakdown-diffusers"):
            found = spawn_child(case, root, cache, out)
            if case not in breakdowns or found["extra"]["load_pipeline"] < breakdowns[case]["extra"]["load_pipeline"]:
                breakdowns[case] = found
        if args.comfy:
            ready, prompt = time_comfy(args.comfy, args.comfy_python, args.comfy_pythonpath, root, out)
            add("comfy: ready", ready)
            add("comfy: first prompt", prompt)
            add("comfy: start → first image", ready + prompt)
    shutil.rmtree(out, ignore_errors=True)
    report(figures, breakdowns, args.json)


def report(figures: dict[str, list[float]], breakdowns: dict[str, Any], as_json: bool) -> None:
    fig = {name: best(values) for name, values in figures.items()}
    floor = fig["floor: spawn → read + cast"] + fig["sampling (loaded models)"]
    fig["floor: spawn → read + cast + sampling"] = floor
    print("best of the rounds, seconds (× = / floor: spawn → read + cast + sampling)")
    for name, value in fig.items():
        print(f"  {name:42s} {value:7.2f} s  {value / floor:5.2f}×")
    for case, found in breakdowns.items():
        marks, extra = found["marks"], found["extra"]
        print(f"{case} (child spawned at 0):")
        previous = 0.0
        for name, at in marks.items():
            print(f"  {name:46s} +{at - previous:6.2f} s  (at {at:6.2f} s)")
            previous = at
        print(f"  {'of which load_pipeline':46s}  {extra['load_pipeline']:6.2f} s")
        for node in extra["first"]:
            print(f"  {node:46s}  first {extra['first'][node]:6.2f} s, second {extra['second'][node]:6.2f} s")
    comfy = fig.get("comfy: first prompt")
    ours = fig["serve, after restart: first prompt after warm-up"]
    print(f"first prompt of a started server / floor: {ours / floor:.2f}× (target ≤ {TARGET}×)"
          + (f"; ComfyUI's: {comfy:.2f} s (ours {ours / comfy:.2f}× of it)" if comfy else ""))
    if as_json:
        print(json.dumps({"figures": fig, "all": figures, "floor": floor, "ratio": ours / floor,
                          "breakdowns": breakdowns}))


if __name__ == "__main__":
    main()
