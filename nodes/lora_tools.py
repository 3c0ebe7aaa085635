"""LoRA tools on MODEL recipes: MergeLoRA (several slots into one new adapter), SaveLoRA (a slot as a file) and
SaveCheckpoint (the model with its fused LoRAs as a new checkpoint).

MergeLoRA computes the merge with PEFT's weighted-adapter arithmetic (nodes/engine/lora_merge.py) on the
LoRA layers alone (the checkpoint's models are built on the meta device), writes it once as a
content-addressed file, and returns a recipe where that file is an ordinary adapter in place of its
sources: strength, schedules, fuse and hot-swap work on it as on any slot, and the reconciler rebuilds it
from scratch like any file.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from nodegraph.cache import file_fingerprint
from nodegraph.context import Context, NodeFailure
from nodegraph.schema import Input, Node, Output
from nodes.engine import lora_files
from nodes.engine.recipe import Adapter, Fuse, ModelRecipe
from nodes.model_files import slot_problems
from nodes.output import prefix_problem

# PEFT's add_weighted_adapter methods; nodes/engine/lora_merge.py (imported when a node runs: it needs torch,
# and node modules load with the CLI, which must start fast).
METHODS = ("linear", "cat", "ties", "dare_linear", "dare_ties", "svd")


class MergeLoRA(Node):
    type = "MergeLoRA"
    version = "1.0.0"
    category = "lora"
    description = ("Merges the LoRAs in several slots into one new adapter slot with PEFT's add_weighted_adapter "
                   "(linear, cat, ties, dare_linear, dare_ties, svd). Ranks that differ are re-factorised by SVD "
                   "(or concatenated with cat).")
    inputs = (Input("model", "MODEL"),
              Input("slots", "STRING", default="", description="comma-separated slots to merge; empty: all active"),
              Input("weights", "STRING", default="",
                    description="comma-separated weights; empty: each slot's strength"),
              Input("method", "COMBO", default="linear", choices=METHODS),
              Input("density", "FLOAT", default=0.5, min=0.01, max=1.0, step=0.01,
                    description="ties/dare: the fraction of each LoRA's values kept"),
              Input("rank", "INT", default=0, min=0, max=1024,
                    description="rank of the merge (SVD); 0: the sources' rank, or their largest if they differ"),
              Input("seed", "INT", default=0, min=0, max=2**31 - 1, description="dare: the random drops"),
              Input("slot", "STRING", default="merged", description="the new adapter slot"))
    outputs = (Output("model", "MODEL"),)

    @classmethod
    def check(cls, literals: dict[str, Any], settings: Any) -> list[tuple[str | None, str]]:
        problems = slot_problems(literals.get("slot", "merged")) or ([] if literals.get("slot", "merged") else
                                                                     [("slot", "name the new slot")])
        text = literals.get("weights", "")
        if isinstance(text, str) and text.strip():
            try:
                [float(w) for w in text.split(",")]
            except ValueError:
                problems.append(("weights", f"{text[:40]!r} is not a comma-separated list of numbers"))
        return problems

    def run(self, ctx: Context, model: ModelRecipe, slots: str, weights: str, method: str, density: float,
            rank: int, seed: int, slot: str) -> dict[str, Any]:
        for name, problem in self.check({"slot": slot, "weights": weights}, ctx.settings):
            raise NodeFailure(problem, name, "invalid_value")
        live = model.live()
        chosen = list(dict.fromkeys(s.strip() for s in slots.split(",") if s.strip())) or list(live)
        unknown = [s for s in chosen if s not in live]
        if not chosen or unknown:
            raise NodeFailure(f"no active adapter in slot(s) {', '.join(unknown) or '(none given)'}; "
                              f"active: {', '.join(live) or 'none'}", "slots", "unknown_slot")
        values = [float(w) for w in weights.split(",")] if weights.strip() else [live[s].strength for s in chosen]
        if len(values) != len(chosen):
            raise NodeFailure(f"{len(values)} weights for {len(chosen)} slots ({', '.join(chosen)})", "weights",
                              "invalid_value")
        from nodes.engine import lora_merge

        if slot in live and slot not in chosen:
            raise NodeFailure(f"slot {slot!r} already holds {Path(live[slot].path).name}", "slot", "slot_taken")
        _refuse_dora([live[s] for s in chosen], "slots", "PEFT's weighted-adapter arithmetic has none for DoRA "
                     "magnitudes")
        sources = [lora_merge.Source(live[s].path, live[s].fingerprint, w) for s, w in zip(chosen, values, strict=True)]
        path = _merged_file(ctx, model, sources, method, density, rank, seed)
        info = lora_files.inspect(path)
        adapter = Adapter(slot, str(path), file_fingerprint(path), 1.0, 1.0, "", tuple(sorted(info.components)),
                          info.max_rank)
        return {"model": without_slots(model, set(chosen)).then(adapter)}


def _merged_file(ctx: Context, model: ModelRecipe, sources: list[Any], method: str, density: float,
                 rank: int, seed: int) -> Path:
    from nodes.engine import lora_merge, merged_files

    cache = merged_files.folder(ctx.settings.models_dirs[0])
    path = lora_merge.merged_path(cache, sources, method, density, rank, seed, model.fingerprint)
    ctx.needs_file(path)  # pruned later: a cached output of this node is not reused, the merge runs again
    if path.exists():
        merged_files.touch(path)
        return path
    try:
        models = lora_merge.adapter_layers(model.checkpoint, model.family, [s.path for s in sources])
        layers = lora_merge.merge(models, [s.weight for s in sources], method, density, rank, seed)
        tensors, metadata = lora_merge.layers_to_state(layers)
    except ValueError as exc:  # PEFT's own checks (e.g. a density it refuses)
        raise NodeFailure(f"PEFT cannot merge these LoRAs with {method}: {exc}", "method", "invalid_value") from None
    try:
        lora_merge.write_lora(path, tensors, metadata)
    except FileExistsError:
        pass  # another run wrote the same merge meanwhile: same inputs, same file
    merged_files.prune(cache, merged_files.in_use(ctx.models) | {str(path)}, *merged_files.limits())
    return path


def _refuse_dora(adapters: list[Adapter], input_name: str, why: str) -> None:
    for adapter in adapters:
        if lora_files.inspect(Path(adapter.path)).dora:
            raise NodeFailure(f"slot {adapter.slot!r} holds {Path(adapter.path).name}, a DoRA LoRA, which this node "
                              f"cannot use: {why}", input_name, "unsupported_format")


def without_slots(model: ModelRecipe, slots: set[str]) -> ModelRecipe:
    """The recipe without the live adapters of these slots (their loads after any fuse that baked them in)."""
    pending, dropped = set(slots), set()
    for index in range(len(model.ops) - 1, -1, -1):
        op = model.ops[index]
        if isinstance(op, Fuse):
            pending -= set(op.slots)
        elif op.slot in pending:
            dropped.add(index)
    ops = tuple(op for index, op in enumerate(model.ops) if index not in dropped)
    return replace(model, ops=ops, schedules=tuple((s, v) for s, v in model.schedules if s not in slots))


# The old exact-name input: a validation error that says what to write instead (SaveImage's numbering now).
_RENAMED = {"filename": ("filename_prefix", "saved files are numbered now and never overwritten, as SaveImage's: "
                                            "'x' writes x_00001_.safetensors, then x_00002_…")}


def prefix_target(settings: Any, kind: str, prefix: str) -> tuple[Path, str]:
    """The folder and the name stem that `prefix` names in the first models folder's `kind/` (checkpoints, loras),
    or a NodeFailure. As ComfyUI's CheckpointSave and LoraSave prefixes, which are relative to its output folder
    and begin with `checkpoints/` or `loras/`: here that first folder may be written or left out."""
    problem = _prefix_problem(settings, kind, prefix)
    if problem is not None:
        raise NodeFailure(problem, "filename_prefix", "invalid_value")
    *folders, name = _inside(kind, prefix).split("/")
    return Path(settings.models_dirs[0], kind, *folders), name


def _inside(kind: str, prefix: str) -> str:
    prefix = prefix.replace("\\", "/")
    return prefix[len(kind) + 1:] if prefix.startswith(f"{kind}/") else prefix


def _prefix_problem(settings: Any, kind: str, prefix: Any) -> str | None:
    if not isinstance(prefix, str):  # linked: checked when it runs
        return None
    root = Path(settings.models_dirs[0], kind) if settings is not None else None
    return prefix_problem(_inside(kind, prefix), root, f"the models folder's {kind}/")


def model_name(settings: Any, kind: str, path: Path) -> str:
    """The name LoadCheckpoint or LoadLoRA takes for a file just saved (a path relative to `kind/`)."""
    return path.relative_to(Path(settings.models_dirs[0], kind)).as_posix()


class SaveLoRA(Node):
    type = "SaveLoRA"
    version = "2.0.0"
    category = "lora"
    description = ("Saves the LoRA in a slot (a merge included) as a diffusers/PEFT .safetensors file in the models "
                   "folder's loras/, with its alphas in lora_adapter_metadata: {prefix}_00001_.safetensors, numbered "
                   "as SaveImage numbers PNGs. Never overwrites a file.")
    inputs = (Input("model", "MODEL"),
              Input("slot", "STRING", default="", description="the slot to save; empty: the only one"),
              Input("filename_prefix", "STRING", default="loras/nodegraph_lora",
                    description="file name start in loras/ (may include subfolders; a leading 'loras/' is optional)"),
              Input("dtype", "COMBO", default="fp32", choices=("fp32", "fp16", "bf16")))
    outputs = (Output("path", "STRING"), Output("name", "STRING", "the file's name as LoadLoRA takes it"))
    output_node = True
    renamed_inputs = _RENAMED

    @classmethod
    def check(cls, literals: dict[str, Any], settings: Any) -> list[tuple[str | None, str]]:
        problems = slot_problems(literals.get("slot", ""))
        problem = _prefix_problem(settings, "loras", literals.get("filename_prefix"))
        return problems + ([("filename_prefix", problem)] if problem else [])

    def run(self, ctx: Context, model: ModelRecipe, slot: str, filename_prefix: str, dtype: str) -> dict[str, Any]:
        for name, problem in slot_problems(slot):
            raise NodeFailure(problem, name, "invalid_value")
        folder, stem = prefix_target(ctx.settings, "loras", filename_prefix)
        live = model.live()
        if not slot:
            if len(live) != 1:
                raise NodeFailure(f"the model has {len(live)} adapters ({', '.join(live) or 'none'}); name the slot",
                                  "slot", "unknown_slot")
            slot = next(iter(live))
        if slot not in live:
            raise NodeFailure(f"no active adapter in slot {slot!r} (active: {', '.join(live) or 'none'})", "slot",
                              "unknown_slot")
        _refuse_dora([live[slot]], "slot", "only plain LoRA layers are written")
        import torch

        from nodes.engine import lora_merge

        models = lora_merge.adapter_layers(model.checkpoint, model.family, [live[slot].path])
        tensors, metadata = lora_merge.saved_state(models)
        path = lora_merge.write_numbered_lora(folder, stem, tensors, metadata, {
            "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype])
        ctx.needs_file(path)  # deleted later: a cached output naming it is not reused, the node saves again
        return {"path": str(path), "name": model_name(ctx.settings, "loras", path)}


class SaveCheckpoint(Node):
    type = "SaveCheckpoint"
    version = "2.0.0"
    category = "model"
    description = ("Saves the model with its fused LoRAs (FuseLoRA) as a new checkpoint in the models folder's "
                   "checkpoints/: one ldm-layout {prefix}_00001_.safetensors file or a diffusers folder "
                   "{prefix}_00001_, numbered as SaveImage numbers PNGs. Never overwrites.")
    inputs = (Input("model", "MODEL"),
              Input("clip", "CLIP", optional=True, description="the text encoders' recipe; empty: the model's"),
              Input("filename_prefix", "STRING", default="checkpoints/nodegraph",
                    description="name start in checkpoints/ (may include subfolders; a leading 'checkpoints/' "
                                "is optional)"),
              Input("format", "COMBO", default="single_file", choices=("single_file", "diffusers")),
              Input("dtype", "COMBO", default="fp16", choices=("fp16", "bf16", "fp32")))
    outputs = (Output("path", "STRING"), Output("name", "STRING", "the checkpoint's name as LoadCheckpoint takes it"))
    output_node = True
    renamed_inputs = _RENAMED

    @classmethod
    def check(cls, literals: dict[str, Any], settings: Any) -> list[tuple[str | None, str]]:
        problem = _prefix_problem(settings, "checkpoints", literals.get("filename_prefix"))
        return [("filename_prefix", problem)] if problem else []

    def run(self, ctx: Context, model: ModelRecipe, filename_prefix: str, format: str, dtype: str,
            clip: ModelRecipe | None = None) -> dict[str, Any]:
        from nodes.engine import checkpoint_save
        from nodes.engine.pipelines import materialize

        folder, stem = prefix_target(ctx.settings, "checkpoints", filename_prefix)
        clip = clip or model.clip()
        if clip.base != model.base:
            raise NodeFailure("the CLIP comes from another checkpoint than the MODEL", "clip", "invalid_value")
        for recipe, input_name in ((model, "model"), (clip, "clip")):
            if recipe.live():
                raise NodeFailure(f"the {input_name} has LoRAs that are not fused ({', '.join(recipe.live())}); "
                                  "fuse them with FuseLoRA first: a checkpoint holds fused weights only",
                                  input_name, "not_fused")
        with materialize(ctx, model, clip) as resident:
            save = checkpoint_save.save_folder if format == "diffusers" else checkpoint_save.save_single_file
            path = save(resident.pipe, folder, stem, dtype)
        ctx.needs_file(path)  # deleted later: a cached output naming it is not reused, the node saves again
        return {"path": str(path), "name": model_name(ctx.settings, "checkpoints", path)}


NODES: list[type[Node]] = [MergeLoRA, SaveLoRA, SaveCheckpoint]
