"""ComfyUI's graph (CheckpointLoaderSimple → LoraLoader → CLIPTextEncode ×2 → EmptyLatentImage → KSampler →
VAEDecode) against a plain diffusers pipeline call doing the same work: same model, LoRA, size, steps, CFG.

    python bench/ksampler.py                # tiny demo SD1.5, 64×64, 8 Euler steps, CFG 7: ≈1 min
    python bench/ksampler.py --size sd15    # full-size SD1.5 architecture, random weights, 256×256, 2 steps
    python bench/ksampler.py --json         # one JSON object for machines

Options: `--repeats N`, `--models-dir DIR`, `--threads N` as in bench/sample.py.

baseline  `pipe(prompt, num_inference_steps, guidance_scale, height, width, generator, output_type="np")` with
          diffusers' Euler scheduler and the LoRA loaded once (`load_lora_weights` + `set_adapters`).
ours      `Executor.run(graph)` on one executor, its output cache cleared before every run so every node
          (both text encodes, the sampler and the decode) really runs; the pipeline stays resident.
The two do the same work (two text encodes, `steps` UNet calls on a batch of 2, one decode) but not the same
arithmetic (ComfyUI's `normal` schedule, noise from the CPU), so pixels are not compared. Rounds are
interleaved; × is the median of the per-round ratios ours/baseline. Target: ≤ 1.03×.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import common
import torch
from common import Models, interleaved, median, ms, require, table, verdict

TARGET = 1.03
SIZES = {"tiny": (64, 8, 15), "sd15": (256, 2, 3)}  # pixels, steps, rounds
PROMPT, GUIDANCE, STRENGTH, SEED = "a red fox in the snow, watercolor", 7.0, 0.8, 1


def graph(models: Models, pixels: int, steps: int) -> dict[str, Any]:
    return {"format": "nodegraph/1", "ui": {}, "nodes": {
        "ckpt": {"type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": models.checkpoint}},
        "lora": {"type": "LoraLoader", "inputs": {"model": ["ckpt", 0], "clip": ["ckpt", 1], "lora_name": models.lora,
                                                  "strength_model": STRENGTH, "strength_clip": STRENGTH}},
        "pos": {"type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["lora", 1]}},
        "neg": {"type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["lora", 1]}},
        "empty": {"type": "EmptyLatentImage", "inputs": {"width": pixels, "height": pixels, "batch_size": 1}},
        "sample": {"type": "KSampler", "inputs": {
            "model": ["lora", 0], "seed": SEED, "steps": steps, "cfg": GUIDANCE, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["empty", 0],
            "denoise": 1.0}},
        "decode": {"type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}},
        "show": {"type": "Show", "inputs": {"value": ["decode", 0]}}}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=tuple(SIZES), default="tiny")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--models-dir", default=None)
    parser.add_argument("--json", action="store_true")
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
        pipe.load_lora_weights(str(models.lora_path), adapter_name="style")
        pipe.set_adapters(["style"], [STRENGTH])
        executor = Executor(load_registry(), Settings(models_dirs=(models.root,)))
        wf = graph(models, pixels, steps)

        def baseline() -> None:
            pipe(prompt=PROMPT, num_inference_steps=steps, guidance_scale=GUIDANCE, height=pixels, width=pixels,
                 generator=torch.Generator().manual_seed(SEED), output_type="np")

        def ours() -> None:
            executor.cache.clear()
            result = executor.run(wf)
            require(result.status == "ok", f"our run failed: {result.errors}")

        baseline(), ours()  # warm-up: loads, first calls
        times = interleaved({"baseline": baseline, "ours": ours}, args.repeats or rounds)
    ratio = median([o / b for o, b in zip(times["ours"], times["baseline"], strict=True)])
    figures = {"size": args.size, "pixels": pixels, "steps": steps, "rounds": len(times["ours"]),
               "baseline_ms": median(times["baseline"]) * 1e3, "ours_ms": median(times["ours"]) * 1e3,
               "ratio": ratio, "target": TARGET, "ok": ratio <= TARGET}
    if args.json:
        print(json.dumps(figures))
        return 0
    print(f"ComfyUI graph (KSampler) vs plain diffusers — {args.size}: {pixels}×{pixels}, {steps} Euler steps, "
          f"CFG {GUIDANCE:g}, LoRA @{STRENGTH:g}, fp32 CPU")
    print(common.machine())
    row = (ms(median(times["baseline"])), ms(median(times["ours"])), f"{ratio:.3f}× {verdict(ratio <= TARGET)}")
    print(table([("baseline ms", "ours ms", "×"), row]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
