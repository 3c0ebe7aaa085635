"""The sweep (an XY plot): run one workflow once per value of a literal input, then grid the images.

    nodegraph run workflows/lora.json --sweep 2.lora=tiny-sd15-style.safetensors,tiny-sd15-kohya.safetensors

The first axis is X (columns), an optional second one Y (rows); every combination is one job.
All jobs run on one executor, so they share its cache and its model manager: what does not depend
on the swept inputs runs once, and a LoRA sweep changes the resident pipeline in place instead of
reloading it. Every job's workflow is validated before the first one runs, so a bad value costs
no time. A job that fails is reported and the others still run; a cancelled one stops the sweep.
Afterwards the images each job wrote are laid out in a labelled grid, `sweep_NNNNN_.png` in the
output folder, which carries the base workflow and the axes in its text chunks.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from nodegraph import events as ev
from nodegraph.comfy_ui_format import Lookup, to_api, to_ui
from nodegraph.context import CancelToken, NodeFailure
from nodegraph.executor import Executor, RunResult
from nodegraph.naming import create_numbered, next_counter
from nodegraph.registry import Registry
from nodegraph.schema import describe
from nodegraph.validate import MAX_SHOWN, Graph, Problem, validate
from nodegraph.workflow import OWN_CHUNK

if TYPE_CHECKING:
    from PIL import Image

MAX_AXES = 2
GRID_NAME = "sweep"
LABEL_CHARS = 40  # a swept prompt would make a very wide column header
PAD = 4
# Values ending like these are model or image files; their labels show only the stem.
FILE_SUFFIXES = frozenset({".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".png", ".jpg", ".jpeg",
                           ".webp", ".json"})


@dataclass(frozen=True)
class Axis:
    """One swept input: node id, input name and the values, in the order they are laid out."""

    node_id: str
    input: str
    values: tuple[Any, ...]

    @property
    def name(self) -> str:
        return f"{self.node_id}.{self.input}"

    def label(self, value: Any) -> str:
        return f"{self.name}={short_value(value)}"

    def to_json(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "input": self.input, "values": list(self.values)}


@dataclass
class Job:
    """One cell of the sweep: the swept values, where it goes in the grid, and what came of it."""

    values: dict[str, Any]  # "NODE_ID.INPUT" -> this job's value
    column: int
    row: int
    graph: Graph | None = None
    result: RunResult | None = None
    seconds: float = 0.0

    @property
    def status(self) -> str:
        return self.result.status if self.result is not None else "not_run"

    def counts(self) -> dict[str, int]:
        """How many nodes ran and how many came from the cache."""
        statuses = [r.status for r in self.result.nodes.values()] if self.result else []
        return {"ran": statuses.count("ran"), "cached": statuses.count("cached")}

    def to_json(self) -> dict[str, Any]:
        return {"values": self.values, "status": self.status, "seconds": round(self.seconds, 6),
                "files": self.result.files if self.result else [],
                "errors": [p.to_json() for p in self.result.errors] if self.result else []}


@dataclass
class SweepResult:
    status: str  # ok | error | interrupted | invalid
    axes: list[Axis]
    jobs: list[Job] = field(default_factory=list)
    errors: list[Problem] = field(default_factory=list)  # of the sweep itself: invalid, grid not written
    grid: Path | None = None

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "jobs": [job.to_json() for job in self.jobs],
                "grid": str(self.grid) if self.grid else None, "errors": [p.to_json() for p in self.errors]}


def run_sweep(executor: Executor, workflow: Any, axes: Sequence[Axis], emit: ev.EventSink = ev.ignore,
              cancel: CancelToken | None = None, on_job: Callable[[Job], None] | None = None) -> SweepResult:
    """Validate every job, run them one after the other on `executor`, then write the grid.

    `on_job` is called after each job (for a progress line). A job that fails does not stop the
    sweep; one that is cancelled (or a KeyboardInterrupt) does, and then no grid is written.
    """
    axes = list(axes)
    jobs, problems = plan_sweep(workflow, axes, executor.registry, executor.settings)
    if problems:
        return SweepResult("invalid", axes, errors=problems)
    cancel = cancel or CancelToken()
    result = SweepResult("ok", axes, jobs=[])
    for job in jobs:
        assert job.graph is not None
        started = time.perf_counter()
        try:
            job.result = executor.execute(job.graph, emit, cancel, uuid.uuid4().hex)
        except KeyboardInterrupt:  # a second Ctrl-C: stop at once, but still report what ran
            job.result = RunResult("", "interrupted")
        job.seconds = time.perf_counter() - started
        result.jobs.append(job)
        if on_job is not None:
            on_job(job)
        if job.status == "interrupted" or cancel.cancelled:
            result.status = "interrupted"
            return result
    if any(job.status != "ok" for job in jobs):
        result.status = "error"
    try:
        result.grid = write_grid(workflow, axes, jobs, executor.settings.output_dir, executor.registry.get)
    except OSError as exc:
        result.errors.append(Problem(None, None, "write_failed", f"cannot write the sweep grid: {exc}"))
        result.status = "error"
    return result


def plan_sweep(workflow: Any, axes: Sequence[Axis], registry: Registry,
               settings: Any) -> tuple[list[Job], list[Problem]]:
    """One validated job per combination of values (X varies fastest), or every problem at once."""
    problems = _axis_problems(workflow, axes, registry, settings)
    if problems:
        return [], problems
    x_axis, y_axis = axes[0], axes[1] if len(axes) > 1 else None
    jobs = [Job({x_axis.name: x, **({y_axis.name: y} if y_axis else {})}, column, row)
            for row, y in enumerate(y_axis.values if y_axis else [None])
            for column, x in enumerate(x_axis.values)]
    problems = _validate_jobs(workflow, axes, jobs, {}, registry, settings)
    if problems:
        return [], problems
    overrides, problems = _prepare(axes, jobs[0], registry, settings)
    if not problems and overrides:
        problems = _validate_jobs(workflow, axes, jobs, overrides, registry, settings)
    return ([], problems) if problems else (jobs, [])


def _axis_problems(workflow: Any, axes: Sequence[Axis], registry: Registry, settings: Any) -> list[Problem]:
    nodes = workflow.get("nodes") if isinstance(workflow, dict) else None
    if not isinstance(nodes, dict):
        return validate(workflow, registry, settings)[1]  # not a workflow at all: say why
    problems: list[Problem] = []
    if not axes:
        problems.append(Problem(None, None, "bad_sweep", "a sweep needs at least one axis"))
    if len(axes) > MAX_AXES:
        problems.append(Problem(None, None, "bad_sweep",
                                f"a sweep has at most {MAX_AXES} axes (X and Y), got {len(axes)}"))
    seen: set[str] = set()
    for axis in axes:
        entry = nodes.get(axis.node_id)
        cls = registry.get(entry.get("type")) if isinstance(entry, dict) else None
        if entry is None:
            problems.append(Problem(axis.node_id, axis.input, "missing_node",
                                    f"--sweep: there is no node {describe(axis.node_id)}"))
        elif cls is not None and axis.input not in {spec.name for spec in cls.inputs}:
            problems.append(Problem(axis.node_id, axis.input, "unknown_input",
                                    f"--sweep: {cls.type} has no input {describe(axis.input)}"))
        if not axis.values:
            problems.append(Problem(axis.node_id, axis.input, "bad_sweep", f"--sweep {axis.name}: no values"))
        if axis.name in seen:
            problems.append(Problem(axis.node_id, axis.input, "bad_sweep", f"--sweep {axis.name} is given twice"))
        seen.add(axis.name)
    return problems


def _validate_jobs(workflow: dict[str, Any], axes: Sequence[Axis], jobs: list[Job],
                   overrides: dict[str, dict[str, Any]], registry: Registry, settings: Any) -> list[Problem]:
    problems: dict[Problem, None] = {}  # the same bad value shows up in every row: report it once
    for job in jobs:
        literals = {node_id: dict(values) for node_id, values in overrides.items()}
        for axis in axes:
            literals.setdefault(axis.node_id, {})[axis.input] = job.values[axis.name]
        job.graph, found = validate(job_workflow(workflow, literals), registry, settings)
        problems.update(dict.fromkeys(found))
    return list(problems)[:MAX_SHOWN]


def job_workflow(workflow: dict[str, Any], literals: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A copy of `workflow` with literal inputs set per node; what is not changed is shared, not copied."""
    nodes = dict(workflow["nodes"])
    for node_id, values in literals.items():
        entry = nodes.get(node_id)
        if isinstance(entry, dict) and isinstance(entry.get("inputs", {}), dict):
            nodes[node_id] = {**entry, "inputs": {**entry.get("inputs", {}), **values}}
    return {**workflow, "nodes": nodes}


def _prepare(axes: Sequence[Axis], first: Job, registry: Registry,
             settings: Any) -> tuple[dict[str, dict[str, Any]], list[Problem]]:
    """Each swept node's `prepare_sweep` overrides, keyed by node id."""
    assert first.graph is not None
    overrides: dict[str, dict[str, Any]] = {}
    problems: list[Problem] = []
    for axis in axes:
        step = first.graph.steps[axis.node_id]
        literals = {k: v for k, v in step.literals.items() if k != axis.input}
        try:
            found = step.cls.prepare_sweep(axis.input, list(axis.values), literals, settings)
        except NodeFailure as exc:
            problems.append(Problem(axis.node_id, exc.input or axis.input, exc.code, str(exc)))
            continue
        except Exception as exc:
            problems.append(Problem(axis.node_id, axis.input, "exception",
                                    f"{step.cls.type}.prepare_sweep: {type(exc).__name__}: {exc}"))
            continue
        if not isinstance(found, dict) or not all(isinstance(k, str) for k in found):
            problems.append(Problem(axis.node_id, axis.input, "exception",
                                    f"{step.cls.type}.prepare_sweep returned {describe(found)}, not a dict"))
            continue
        overrides.setdefault(axis.node_id, {}).update(found)
    return overrides, problems


def short_value(value: Any) -> str:
    """A value as a label: file names by their stem, long texts cut short."""
    if isinstance(value, str):
        path = PurePosixPath(value.replace("\\", "/"))
        text = path.stem if path.suffix.lower() in FILE_SUFFIXES else value
    else:
        text = json.dumps(value)
    text = " ".join(text.split())  # a multiline prompt on one line
    return text if len(text) <= LABEL_CHARS else text[:LABEL_CHARS - 3] + "..."


def job_images(job: Job) -> list[str]:
    """The PNGs of the first node of the job that wrote any (a batch is several)."""
    if job.result is None:
        return []
    for record in job.result.nodes.values():
        pngs = [f for f in record.files if f.lower().endswith(".png")]
        if pngs:
            return pngs
    return []


def compose_grid(axes: Sequence[Axis], jobs: Sequence[Job]) -> Image.Image | None:
    """The labelled grid: X values as column headers, Y values as row labels, one job per cell.

    Cells are as large as the largest job's images (and at least as wide as their header); a
    batch sits side by side in its cell. A job without images gets an empty cell saying why.
    None when no job has an image at all (a sweep of a workflow that writes none).
    """
    from PIL import Image, ImageDraw, ImageFont

    cells = {(job.column, job.row): _cell(job) for job in jobs}
    images = [cell for cell in cells.values() if cell is not None]
    if not images:
        return None
    font = ImageFont.load_default()
    x_axis, y_axis = axes[0], axes[1] if len(axes) > 1 else None
    columns = [_printable(x_axis.label(v), font) for v in x_axis.values]
    rows = [_printable(y_axis.label(v), font) for v in y_axis.values] if y_axis else []
    line = int(font.getbbox("Ag")[3])

    def width(text: str) -> int:
        return int(font.getbbox(text)[2])

    cell_w = max([image.width for image in images] + [width(text) + 2 * PAD for text in columns])
    cell_h = max(image.height for image in images)
    left = max(width(text) + 2 * PAD for text in rows) if rows else 0
    top = line + 2 * PAD
    grid = Image.new("RGB", (left + cell_w * len(columns), top + cell_h * max(1, len(rows))), "white")
    draw = ImageDraw.Draw(grid)
    for i, text in enumerate(columns):
        draw.text((left + i * cell_w + (cell_w - width(text)) // 2, PAD), text, fill="black", font=font)
    for j, text in enumerate(rows):
        draw.text((PAD, top + j * cell_h + (cell_h - line) // 2), text, fill="black", font=font)
    for job in jobs:
        x, y = left + job.column * cell_w, top + job.row * cell_h
        cell = cells[(job.column, job.row)]
        if cell is not None:
            grid.paste(cell, (x + (cell_w - cell.width) // 2, y + (cell_h - cell.height) // 2))
            continue
        draw.rectangle((x, y, x + cell_w - 1, y + cell_h - 1), fill=(224, 224, 224))
        text = "error" if job.status == "error" else "no image"
        draw.text((x + (cell_w - width(text)) // 2, y + (cell_h - line) // 2), text, fill=(200, 0, 0), font=font)
    return grid


def _cell(job: Job) -> Image.Image | None:
    """The job's images side by side; None when there are none or they cannot be read."""
    from PIL import Image

    images = []
    try:
        for path in job_images(job):
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
    except (OSError, ValueError):  # deleted since, or damaged: the cell says so
        return None
    if not images:
        return None
    cell = Image.new("RGB", (sum(i.width for i in images), max(i.height for i in images)), "white")
    x = 0
    for image in images:
        cell.paste(image, (x, 0))
        x += image.width
    return cell


def _printable(text: str, font: Any) -> str:
    from PIL import ImageFont

    # Pillow's bitmap fallback font (no FreeType) only has Latin-1 glyphs.
    return text if isinstance(font, ImageFont.FreeTypeFont) else text.encode("latin-1", "replace").decode("latin-1")


def write_grid(workflow: dict[str, Any], axes: Sequence[Axis], jobs: Sequence[Job], folder: Path,
               lookup: Lookup | None = None) -> Path | None:
    """Save the grid as `sweep_NNNNN_.png` in `folder`, with the base workflow and the axes embedded.

    As SaveImage's PNGs, the workflow is ours (`nodegraph`) and, with `lookup` (the node catalog's), ComfyUI's
    `prompt` and UI-format `workflow` too; without it, ours under `workflow` (as grids were written before).
    """
    from PIL.PngImagePlugin import PngInfo

    grid = compose_grid(axes, jobs)
    if grid is None:
        return None
    info = PngInfo()
    if lookup is None:
        info.add_text("workflow", json.dumps(workflow))
    else:
        info.add_text("prompt", json.dumps(to_api(workflow, lookup)))
        info.add_text("workflow", json.dumps(to_ui(workflow, lookup)))
        info.add_text(OWN_CHUNK, json.dumps(workflow))
    info.add_text("sweep", json.dumps({"axes": [axis.to_json() for axis in axes]}, default=str))
    folder.mkdir(parents=True, exist_ok=True)
    file, path, _ = create_numbered(folder, GRID_NAME, next_counter(folder, GRID_NAME))
    try:
        with file:
            grid.save(file, format="PNG", pnginfo=info, compress_level=4)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path
