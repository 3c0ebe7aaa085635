"""The model-file checks every loader shares: a name resolved to its file, a LoRA's fit to the checkpoint it is
loaded on (from the files' headers, before anything runs; `fit_hint` orders a choice list by it), adapter slot
names, and the tokenizers a checkpoint needs."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nodegraph.cache import file_fingerprint
from nodegraph.context import NodeFailure
from nodegraph.schema import Upstream
from nodegraph.settings import FitHint, Settings
from nodes.engine import lora_files
from nodes.engine.recipe import Adapter, ModelRecipe

_SLOT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


def slot_problems(slot: str) -> list[tuple[str | None, str]]:
    """A slot name is empty (automatic) or a PEFT-safe name: letters, digits and _."""
    if slot and not _SLOT.match(slot):
        return [("slot", f"{slot[:40]!r} is not a slot name (letters, digits and _, up to 64)")]
    return []


def lora_file(settings: Settings, name: str) -> tuple[Path, lora_files.LoraInfo]:
    """A LoRA from the models folder and what its header says, or a node error on `lora`."""
    path = model_file(settings, "loras", name, "lora")
    try:
        return path, lora_files.inspect(path)
    except lora_files.LoraFileError as exc:
        raise NodeFailure(str(exc), "lora", "bad_lora") from None


def fit_problem(checkpoint: str, fingerprint: str, path: Path, lora_fingerprint: str, block_scales: str = "",
                lora_input: str = "lora") -> tuple[str, str, str] | None:
    """(input, code, message) if the LoRA file's layers or the block scales do not exist in the checkpoint."""
    from nodes.engine import lora_match

    try:
        problem = lora_match.mismatch(str(path), lora_fingerprint, checkpoint, fingerprint)
    except lora_files.LoraFileError as exc:
        return lora_input, "bad_lora", str(exc)
    if problem:
        return lora_input, "wrong_model", f"{path.name} does not fit this model (a LoRA for another model?): {problem}"
    problem = lora_match.block_scales_mismatch(block_scales, checkpoint, fingerprint)
    return ("block_scales", "invalid_value", problem) if problem else None


def check_fits(model: ModelRecipe, path: Path, fingerprint: str, block_scales: str = "",
               lora_input: str = "lora") -> None:
    """A node error unless the file's layers and the blocks exist in the model (see `fit_problem`)."""
    problem = fit_problem(model.checkpoint, model.fingerprint, path, fingerprint, block_scales, lora_input)
    if problem:
        raise NodeFailure(problem[2], problem[0], problem[1])


def fit_upstream(literals: dict[str, Any], upstream: Callable[[str], Upstream | None], settings: Any,
                 lora_input: str, block_scales: str = "") -> list[tuple[str | None, str, str]]:
    """`fit_problem` at validation, when the checkpoint the MODEL or CLIP comes from is written in the workflow."""
    name = literals.get(lora_input)
    if settings is None or not isinstance(name, str):
        return []
    try:
        ckpt = upstream_checkpoint(settings, upstream)
        if ckpt is None:
            return []
        path = settings.resolve_model("loras", name)
        problem = fit_problem(str(ckpt), file_fingerprint(ckpt), path, file_fingerprint(path), block_scales,
                              lora_input)
    except Exception:  # a missing or unreadable file: the literal checks and the loader report it
        return []
    return [problem] if problem else []


def upstream_checkpoint(settings: Settings, upstream: Callable[[str], Upstream | None]) -> Path | None:
    """The checkpoint file the MODEL or CLIP comes from, when its loader is written in the workflow (or an error)."""
    source = upstream("model") or upstream("clip")
    for _ in range(256):  # back through the MODEL/CLIP chain to its checkpoint loader
        if source is None or source.type in ("LoadCheckpoint", "CheckpointLoaderSimple", "UNETLoader"):
            break
        source = source.input("model") or source.input("clip")
    if source is None:
        return None
    checkpoint = source.literals.get("checkpoint", source.literals.get("ckpt_name", source.literals.get("unet_name")))
    return settings.resolve_model("diffusion_models" if source.type == "UNETLoader" else "checkpoints", checkpoint)


MAX_FIT_HINTS = 256  # files checked against the model for a misspelt name's message; more: listed unsorted


def fit_hint(kind: str, fits: Callable[[Path, str, Path], bool]) -> FitHint:
    """A `ModelChoices` hint: which files of `kind` fit the checkpoint the node's MODEL (or CLIP) comes from, by
    `fits(checkpoint, its fingerprint, file)`, and its family; so a misspelt name lists the files for that model
    first. Headers only, and on the error path alone."""

    def hint(settings: Settings | None, upstream: Callable[[str], Upstream | None],
             ) -> tuple[Callable[[str], bool], str] | None:
        from nodes.engine.checkpoints import detect_family

        if settings is None or len(settings.model_files(kind)) > MAX_FIT_HINTS:
            return None
        try:
            ckpt = upstream_checkpoint(settings, upstream)
            if ckpt is None:
                return None
            family, fingerprint = detect_family(ckpt), file_fingerprint(ckpt)
        except Exception:  # a missing or unreadable checkpoint: its own loader reports it
            return None

        def check(name: str) -> bool:
            try:
                return fits(ckpt, fingerprint, settings.resolve_model(kind, name))
            except Exception:  # an unreadable file fits nothing
                return False

        return check, family

    return hint


def lora_fits(checkpoint: Path, fingerprint: str, path: Path) -> bool:
    return fit_problem(str(checkpoint), fingerprint, path, file_fingerprint(path)) is None


def tokenizer_problems(settings: Any, kind: str, names: dict[str, Any]) -> list[tuple[str | None, str, str]]:
    """At validation: a `missing_tokenizer` error on each input naming a model file whose text encoders have no
    tokenizer offline (the file by name, not its path); files that cannot be resolved are the literal checks'."""
    from nodes.engine.clip_tokenizers import missing_tokenizer

    problems: list[tuple[str | None, str, str]] = []
    for input_name, name in names.items():
        if settings is None or not isinstance(name, str):
            continue
        try:
            message = missing_tokenizer(settings.resolve_model(kind, name))
        except Exception:  # a missing or unreadable file: reported by the literal checks and the loader
            continue
        if message:
            problems.append((input_name, "missing_tokenizer", message))
    return problems


def checkpoint_code(exc: Exception) -> str:
    """The node-error code of a checkpoint that cannot load: its own for a missing tokenizer."""
    from nodes.engine.checkpoints import MissingTokenizerError

    return "missing_tokenizer" if isinstance(exc, MissingTokenizerError) else "bad_checkpoint"


def model_file(settings: Settings, kind: str, name: str, input_name: str) -> Path:
    try:
        return settings.resolve_model(kind, name)
    except FileNotFoundError as exc:  # ModelNameError (a name no file can have) too: its code is bad_name
        raise NodeFailure(str(exc), input_name, getattr(exc, "code", "file_not_found")) from None



def free_slot(stem: str, live: dict[str, Adapter]) -> str:
    slot, n = stem or "lora", 2
    while slot in live:
        slot, n = f"{stem}_{n}", n + 1
    return slot
