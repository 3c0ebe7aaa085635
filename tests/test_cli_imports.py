"""Commands pay only for what they use: `validate` and `nodes` never import the diffusion stack.

Each command runs in a fresh interpreter (this one has torch and diffusers loaded by other tests), which then
lists the heavy modules it holds. Timings live in bench/cold.py, not here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
PROBE = """
import json, sys
from nodegraph.cli import main
code = main(sys.argv[1:])
heavy = ("torch", "diffusers", "transformers", "peft", "accelerate")
print(json.dumps({"code": code, "heavy": sorted(m for m in heavy if m in sys.modules)}))
"""


def loaded_by(*args: str) -> tuple[int, list[str], str]:
    """(exit code, the heavy modules loaded, stdout) of `nodegraph ARGS` in a fresh interpreter."""
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
    *printed, last = done.stdout.splitlines() or [""]
    assert last.startswith("{"), done.stderr
    result = json.loads(last)
    return result["code"], result["heavy"], "\n".join(printed)


def test_validating_a_lora_workflow_imports_no_diffusion_library(demo_dir: Path) -> None:
    workflow = str(ROOT / "workflows" / "lora.json")
    code, heavy, out = loaded_by("validate", workflow, "--models-dir", str(demo_dir))
    assert code == 0 and out.endswith("valid"), out
    assert not {"diffusers", "transformers", "peft", "accelerate"} & set(heavy)
    code, heavy, _ = loaded_by("validate", workflow, "--models-dir", str(demo_dir), "--device", "cpu")
    assert code == 0 and heavy == []  # nor torch, when the device is the CPU


def test_nor_does_comfyuis_graph_on_a_single_file_once_its_configs_are_derived(demo_dir: Path) -> None:
    workflow = str(ROOT / "workflows" / "comfyui" / "txt2img_lora.json")  # tiny-sd15.safetensors + a LoRA
    loaded_by("validate", workflow, "--models-dir", str(demo_dir))  # derives the config folder, once per file
    code, heavy, out = loaded_by("validate", workflow, "--models-dir", str(demo_dir), "--device", "cpu")
    assert code == 0 and out.endswith("valid") and heavy == [], out


def test_listing_the_nodes_imports_none_of_them() -> None:
    code, heavy, out = loaded_by("nodes")
    assert code == 0 and "LoadLoRA" in out and heavy == []
