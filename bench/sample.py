"""Sample and ComfyUI's graph against a plain diffusers pipeline call doing the same work.

    python bench/sample.py                # tiny demo SD1.5, 64×64, 8 Euler steps, CFG 7: ≈2 min
    python bench/sample.py --size sd15    # full-size SD1.5 architecture, random weights, 256×256, 2 steps
    python bench/sample.py --json         # the figures as one JSON object on the last line

Options: `--repeats N` rounds (default 15 tiny, 3 sd15); `--models-dir DIR` keeps the generated models there
and reuses them (default: a temp dir, removed at the end; sd15 writes ≈4 GB and takes ≈1 min to build);
`--threads N` torch threads (default 1, see bench/common.py).

Three sides, each with one LoRA at strength 0.8 and without:
  baseline  `pipe(prompt, num_inference_steps, guidance_scale, height, width, generator, output_type="np")` on one
            `StableDiffusionPipeline`, diffusers' Euler scheduler, the LoRA added once (`load_lora_weights` +
            `set_adapters`).
  Sample    `Executor.run` of LoadCheckpoint → [LoadLoRA] → Sample → Show.
  graph     `Executor.run` of CheckpointLoaderSimple → [LoraLoader] → CLIPTextEncode ×2 → EmptyLatentImage →
            KSampler → VAEDecode → Show.
Ours run on one executor whose output cache is cleared before every run (every node really runs) while the
pipeline stays resident, as in a server. All three do the same work (two text encodes, `steps` UNet calls on a
batch of 2, one decode); the baseline's arithmetic differs (diffusers' Euler schedule and noise scaling against
ComfyUI's `normal` schedule), so its pixels are not compared, but Sample's must equal the graph's on every run.
Rounds are interleaved (order rotating); × is the median of the per-round ratios against the baseline.
Target: ≤ 1.03×.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import common
import numpy as np
import torch
from common import Models, interleaved, median, ms, require, table, verdict

TARGET = 1.03
SIZES = {"tiny": (64, 8, 15), "sd15": (256, 2, 3)}  # pixels, steps, rounds
PROMPT, GUIDANCE, STRENGTH, SEED = "a red fox in the snow, watercolor", 7.0, 0.8, 1


def sample_graph(models: Models, pixels: int, steps: int, lora: bool) -> dict[str, Any]:
    nodes: dict[str, Any] = {"ckpt": {"type": "LoadCheckpoint", "inputs": {"checkpoint": models.checkpoint}}}
    model = ["ckpt", "model"]
    if lora:
        nodes["lora"] = {"type": "LoadLoRA", "inputs": {"model": model, "lora": models.lora, "strength": STRENGTH,
                                                         "text_encoder_strength": STRENGTH}}
        model = ["lora", "model"]
    nodes["out"] = {"type": "Sample", "inputs": {
        "model": model, "prompt": PROMPT, "negative_prompt": "", "seed": SEED, "steps": steps, "guidance": GUIDANCE,
        "width": pixels, "height": pixels, "sampler_name": "euler", "scheduler": "normal", "batch_size": 1}}
    nodes["show"] = {"type": "Show", "inputs": {"value": ["out", 0]}}
    return {"format": "nodegraph/1", "ui": {}, "nodes": nodes}


def comfy_graph(models: Models, pixels: int, steps: int, lora: bool) -> dict[str, Any]:
    nodes: dict[str, Any] = {"ckpt": {"type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": models.checkpoint}}}
    model, clip = ["ckpt", 0], ["ckpt", 1]
    if lora:
        nodes["lora"] = {"type": "LoraLoader", "inputs": {"model": model, "clip": clip, "lora_name": models.lora,
                                                          "strength_model": STRENGTH, "strength_clip": STRENGTH}}
        model, clip = ["lora", 0], ["lora", 1]
    nodes.update({
        "pos": {"type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": clip}},
        "neg": {"type": "CLIPTextEncode", "inputs": {"text": "", "clip": clip}},
        "empty": {"type": "EmptyLatentImage", "inputs": {"width": pixels, "height": pixels, "batch_size": 1}},
        "sample": {"type": "KSampler", "inputs": {
            "model": model, "seed": SEED, "steps": steps, "cfg": GUIDANCE, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["empty", 0],
            "denoise": 1.0}},
        "out": {"type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}},
        "show": {"type": "Show", "inputs": {"value": ["out", 0]}}})
    return {"format": "nodegraph/1", "ui": {}, "nodes": nodes}


def measure(models: Models, pipe: Any, executor: Any, pixels: int, steps: int, rounds: int,
            lora: bool) -> dict[str, list[float]]:
    workflows = {"Sample": sample_graph(models, pixels, steps, lora), "graph": comfy_graph(models, pixels, steps, lora)}
    last: dict[str, np.ndarray] = {}

    def ours(side: str) -> None:
        executor.cache.clear()
        result = executor.run(workflows[side])
        require(result.status == "ok", f"{side} failed: {result.errors}")
        last[side] = result.nodes["show"].outputs["value"].pixels
        other = last.get("graph" if side == "Sample" else "Sample")
        require(other is None or np.array_equal(last[side], other), "Sample's pixels differ from the graph's")

    def baseline() -> None:
        pipe(prompt=PROMPT, num_inference_steps=steps, guidance_scale=GUIDANCE, height=pixels, width=pixels,
             generator=torch.Generator().manual_seed(SEED), output_type="np")

    sides = {"baseline": baseline, "Sample": lambda: ours("Sample"), "graph": lambda: ours("graph")}
    for run in sides.values():
        run()  # warm-up: the reconciler loads or drops the LoRA here, not in the timed rounds
    return interleaved(sides, rounds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=tuple(SIZES), default="tiny")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--models-dir", default=None, help="keep generated models here (default: a temp dir)")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    common.add_threads_option(parser)
    args = parser.parse_args()
    common.set_threads(args.threads)
    pixels, steps, rounds = SIZES[args.size]

    with common.models(args.size, args.models_dir) as models:
        from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

        from nodegraph.executor import Executor
        from nodegraph.registry import load_registry
        from nodegraph.settings import Settings

        pipe = StableDiffusionPipeline.from_pretrained(models.checkpoint_path, dtype=torch.float32,
                                                       local_files_only=True, use_safetensors=True)
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        executor = Executor(load_registry(), Settings(models_dirs=(models.root,)))
        pipe.load_lora_weights(str(models.lora_path), adapter_name="style")
        pipe.set_adapters(["style"], [STRENGTH])
        variants = {"LoRA": measure(models, pipe, executor, pixels, steps, args.repeats or rounds, True)}
        pipe.unload_lora_weights()
        variants["no LoRA"] = measure(models, pipe, executor, pixels, steps, args.repeats or rounds, False)

    figures: dict[str, Any] = {"size": args.size, "pixels": pixels, "steps": steps, "target": TARGET}
    lines: list[tuple[str, ...]] = [("variant", "baseline ms", "Sample ms", "graph ms", "Sample ×", "graph ×")]
    for name, times in variants.items():
        ratios = {side: median([o / b for o, b in zip(times[side], times["baseline"], strict=True)])
                  for side in ("Sample", "graph")}
        figures[name] = {**{f"{side}_ms": median(t) * 1e3 for side, t in times.items()},
                         **{f"{side}_ratio": r for side, r in ratios.items()}}
        lines.append((name, *(ms(median(times[side])) for side in ("baseline", "Sample", "graph")),
                      *(f"{ratios[side]:.3f}× {verdict(ratios[side] <= TARGET)}" for side in ("Sample", "graph"))))
    figures["ok"] = all(figures[v][f"{s}_ratio"] <= TARGET for v in variants for s in ("Sample", "graph"))
    if args.json:
        print(json.dumps(figures))
        return 0
    print(f"Sample and ComfyUI's graph vs plain diffusers — {args.size}: {pixels}×{pixels}, {steps} Euler steps, "
          f"CFG {GUIDANCE:g}, LoRA @{STRENGTH:g}, fp32 CPU; {args.repeats or rounds} interleaved rounds")
    print(common.machine())
    print(table(lines))
    print(f"Sample's pixels equal the graph's on every run; target ≤ {TARGET:g}×: {verdict(figures['ok'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
