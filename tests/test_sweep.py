"""The sweep (`nodegraph run --sweep`): one job per value on one executor, the grid, errors, exit codes."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from nodegraph import events as ev
from nodegraph import workflow as wf
from nodegraph.cli import main
from nodegraph.executor import Executor
from nodegraph.registry import Registry, load_registry
from nodegraph.settings import Settings
from nodegraph.sweep import Axis, SweepResult, run_sweep
from tests.conftest import PACKS, Recorder, workflow

ROOT = Path(__file__).parents[1]

# A node pack for these tests: Paint writes one small PNG per batch item (a colour from its inputs
# and a gradient, so a misplaced cell shows), Hooked adjusts its `top` input for a whole sweep.
PACK = '''
    import signal

    import numpy as np
    from PIL import Image

    from nodegraph.context import NodeFailure
    from nodegraph.schema import Input, Node, Output


    class Paint(Node):
        type = "Paint"
        version = "1.0.0"
        inputs = (Input("red", "INT", default=0, min=0, max=255), Input("green", "INT", default=0),
                  Input("width", "INT", default=40), Input("height", "INT", default=30),
                  Input("batch", "INT", default=1), Input("ctrl_c", "BOOLEAN", default=False))
        outputs = ()
        output_node = True

        def run(self, ctx, red, green, width, height, batch, ctrl_c):
            if ctrl_c:
                signal.raise_signal(signal.SIGINT)
                ctx.check_cancelled()
            if red == 13:
                raise NodeFailure("unlucky", "red", "unlucky")
            ctx.settings.output_dir.mkdir(parents=True, exist_ok=True)
            y, x = np.mgrid[0:height, 0:width]
            for i in range(batch):
                pixels = np.stack([np.full_like(x, red), np.full_like(x, green), (x * 5 + y * 3 + i * 60) % 256], -1)
                path = ctx.settings.output_dir / f"paint_{ctx.job_id}_{i}.png"
                Image.fromarray(pixels.astype(np.uint8)).save(path)
                ctx.add_file(path)
            return {}


    class Hooked(Node):
        type = "Hooked"
        version = "1.0.0"
        inputs = (Input("value", "INT"), Input("top", "INT", default=0))
        outputs = (Output("top", "INT"),)
        output_node = True

        @classmethod
        def prepare_sweep(cls, input_name, values, literals, settings):
            assert literals == {"top": 0}
            return {"top": max(values)} if input_name == "value" else {}

        def run(self, ctx, value, top):
            return {"top": top}


    NODES = [Paint, Hooked]
'''


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sweeppack")
    (folder / "sweeppack.py").write_text(textwrap.dedent(PACK))
    return folder


@pytest.fixture(scope="module")
def reg(pack: Path) -> Registry:
    return load_registry([PACKS, pack])


@pytest.fixture
def executor(reg: Registry, tmp_path: Path) -> Executor:
    return Executor(reg, Settings(models_dirs=(tmp_path / "models",), output_dir=tmp_path / "outputs"))


def paint(**inputs: Any) -> dict[str, Any]:
    """A Slow node (the part of the graph no sweep here changes) feeding Paint's green."""
    return workflow({"1": {"type": "Slow", "inputs": {"steps": 1}},
                     "2": {"type": "Paint", "inputs": {"green": ["1", "value"], **inputs}}})


def run_cli(capsys: pytest.CaptureFixture[str], pack: Path, tmp_path: Path, wf_: dict[str, Any],
            *args: str) -> tuple[int, Any, str]:
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(wf_))
    code = main(["run", str(path), "--nodes-dir", str(PACKS), "--nodes-dir", str(pack),
                 "--output-dir", str(tmp_path / "outputs"), *args])
    out, err = capsys.readouterr()
    return code, json.loads(out) if "--json" in args else out, err


def cells(grid: Image.Image, columns: int, rows: int, cell: tuple[int, int]) -> tuple[int, int]:
    """The grid's label margins (left, top), checking that the cells fill the rest exactly."""
    left, top = grid.width - columns * cell[0], grid.height - rows * cell[1]
    assert 0 <= left < 200 and 10 <= top < 40
    return left, top


def test_one_job_per_value_on_one_executor(executor: Executor) -> None:
    events = Recorder()
    result = run_sweep(executor, paint(), [Axis("2", "red", (10, 20, 30))], events)
    assert result.status == "ok" and [job.values for job in result.jobs] == [{"2.red": v} for v in (10, 20, 30)]
    assert events.ran() == ["1", "2", "2", "2"]  # the Slow node ran once: the executor's cache is shared
    assert [job.counts() for job in result.jobs] == [{"ran": 2, "cached": 0}] + [{"ran": 1, "cached": 1}] * 2
    for job, red in zip(result.jobs, (10, 20, 30), strict=True):
        [file] = job.result.files if job.result else []
        assert np.asarray(Image.open(file))[0, 0, 0] == red
    assert result.grid is not None and result.grid.name == "sweep_00001_.png"


def test_x_by_y_grid_has_every_cell_and_its_labels(executor: Executor) -> None:
    axes = [Axis("2", "red", (10, 20, 30)), Axis("2", "width", (80, 50))]
    result = run_sweep(executor, paint(height=30), axes)
    assert result.status == "ok" and len(result.jobs) == 6 and result.grid is not None
    grid = Image.open(result.grid)
    left, top = cells(grid, 3, 2, (80, 30))
    assert left > 0  # row labels
    pixels = np.asarray(grid.convert("RGB"))
    for job in result.jobs:
        assert job.result is not None
        image = np.asarray(Image.open(job.result.files[0]))
        height, width = image.shape[:2]
        x = left + job.column * 80 + (80 - width) // 2  # a narrower image sits in the middle of its cell
        y = top + job.row * 30
        assert np.array_equal(pixels[y:y + height, x:x + width], image)
    header, margin = pixels[:top, left:], pixels[top:, :left]
    for i in range(3):  # some dark text above each column and beside each row
        assert (header[:, i * 80:(i + 1) * 80] < 100).all(axis=-1).any()
    for j in range(2):
        assert (margin[j * 30:(j + 1) * 30] < 100).all(axis=-1).any()
    text = grid.text  # type: ignore[attr-defined]
    assert json.loads(text["nodegraph"]) == paint(height=30)
    assert json.loads(text["prompt"]).keys() == paint(height=30)["nodes"].keys()  # ComfyUI's formats beside it
    assert wf.load(result.grid) == paint(height=30)
    assert json.loads(text["sweep"])["axes"][1] == {"node_id": "2", "input": "width", "values": [80, 50]}
    assert json.loads(text["sweep"])["axes"][0]["values"] == [10, 20, 30]
    assert run_sweep(executor, paint(height=30), axes).grid == result.grid.with_name("sweep_00002_.png")


def test_a_batch_sits_side_by_side_and_labels_widen_narrow_cells(executor: Executor) -> None:
    result = run_sweep(executor, paint(batch=2, width=8, height=8), [Axis("2", "red", (1, 2))])
    assert result.grid is not None and result.jobs[0].result is not None
    grid = np.asarray(Image.open(result.grid).convert("RGB"))
    first, second = (np.asarray(Image.open(f)) for f in result.jobs[0].result.files)
    cell_w = grid.shape[1] // 2
    assert cell_w > 16  # "2.red=1" is wider than the two 8-pixel images
    top = grid.shape[0] - 8
    x = (cell_w - 16) // 2
    assert np.array_equal(grid[top:, x:x + 16], np.concatenate([first, second], axis=1))


def test_prepare_sweep_overrides_apply_to_every_job(executor: Executor) -> None:
    wf_ = workflow({"h": {"type": "Hooked", "inputs": {"value": 0}}})
    result = run_sweep(executor, wf_, [Axis("h", "value", (1, 5, 3))])
    assert result.status == "ok" and result.grid is None  # nothing wrote an image: no grid
    assert [job.result.nodes["h"].outputs["top"] for job in result.jobs if job.result] == [5, 5, 5]


def test_bad_values_are_reported_before_anything_runs(executor: Executor) -> None:
    events = Recorder()
    result = run_sweep(executor, paint(), [Axis("2", "red", (10, 300, "x")), Axis("2", "width", (8, 9))], events)
    assert result.status == "invalid" and not result.jobs and not events.of(ev.NodeStarted)
    assert [(p.node_id, p.input, p.code) for p in result.errors] == [("2", "red", "out_of_range"),
                                                                     ("2", "red", "wrong_type")]
    assert not (executor.settings.output_dir).exists()


def test_a_failing_job_does_not_stop_the_others(capsys: pytest.CaptureFixture[str], pack: Path,
                                                tmp_path: Path) -> None:
    code, out, err = run_cli(capsys, pack, tmp_path, paint(width=80), "--sweep", "2.red=10,13,20")
    assert code == 2
    lines = out.splitlines()
    assert lines[0].startswith("[1/3] 2.red=10: ok, ") and lines[0].endswith("(2 ran, 0 cached)")
    assert lines[1].startswith("[2/3] 2.red=13: error, ") and lines[2].startswith("[3/3] 2.red=20: ok, ")
    assert "error: node 2, input 'red': unlucky [unlucky]" in err
    grid_path = Path(lines[3].removeprefix("wrote "))
    grid = np.asarray(Image.open(grid_path).convert("RGB"))
    left, top = cells(Image.open(grid_path), 3, 1, (80, 30))
    failed = grid[top:, left + 80:left + 160]
    assert (failed == (224, 224, 224)).all(axis=-1).mean() > 0.8  # an empty cell…
    assert ((failed[..., 0] > 150) & (failed[..., 1] < 100)).any()  # …with a red "error" label
    code, result, _ = run_cli(capsys, pack, tmp_path, paint(), "--sweep", "2.red=13,20", "--json")
    assert code == 2 and result["status"] == "error" and result["grid"].endswith("sweep_00002_.png")
    assert [(j["values"], j["status"], len(j["files"])) for j in result["jobs"]] == [
        ({"2.red": 13}, "error", 0), ({"2.red": 20}, "ok", 1)]
    assert result["jobs"][0]["errors"][0]["code"] == "unlucky"


def test_values_parse_like_set_values(capsys: pytest.CaptureFixture[str], pack: Path, tmp_path: Path) -> None:
    wf_ = workflow({"1": {"type": "String"}, "2": {"type": "Show", "inputs": {"value": ["1", 0]}}})
    code, result, _ = run_cli(capsys, pack, tmp_path, wf_, "--json", "--sweep", '1.value=a cat\\, 4k,"5",x',
                              "--set", "1.value=ignored")
    assert code == 0 and [j["values"]["1.value"] for j in result["jobs"]] == ["a cat, 4k", "5", "x"]
    assert result["grid"] is None


@pytest.mark.parametrize("sweeps, code", [
    (["9.red=1,2"], "missing_node"), (["2.blue=1,2"], "unknown_input"), (["2.red="], "bad_sweep"),
    (["red=1"], "bad_sweep"), (["2.red=1", "2.red=2"], "bad_sweep"), (["2.red=300"], "out_of_range"),
    (["2.red=1", "2.width=8", "2.height=8"], "bad_sweep")])
def test_bad_sweeps_exit_1(capsys: pytest.CaptureFixture[str], pack: Path, tmp_path: Path, sweeps: list[str],
                           code: str) -> None:
    args = [arg for sweep in sweeps for arg in ("--sweep", sweep)]
    status, result, _ = run_cli(capsys, pack, tmp_path, paint(), "--json", *args)
    assert status == 1 and result["status"] == "invalid" and result["jobs"] == []
    assert result["errors"][0]["code"] == code
    assert not (tmp_path / "outputs").exists()


def test_ctrl_c_stops_the_sweep_with_exit_130(capsys: pytest.CaptureFixture[str], pack: Path,
                                              tmp_path: Path) -> None:
    # The node sends the process a SIGINT: the CLI cancels the job in progress and runs no other.
    code, result, err = run_cli(capsys, pack, tmp_path, paint(ctrl_c=True), "--json", "--sweep", "2.red=1,2,3")
    assert code == 130 and result["status"] == "interrupted" and result["grid"] is None
    assert [(j["values"], j["status"]) for j in result["jobs"]] == [({"2.red": 1}, "interrupted")]
    assert "interrupting" in err


def test_lora_sweep_on_the_demo_models_loads_the_pipeline_once(registry: Registry, demo_settings: Settings) -> None:
    base = wf.load(ROOT / "workflows" / "lora.json")
    base["nodes"]["3"]["inputs"].update(steps=2, batch_size=1)
    events = Recorder()
    loras = ("tiny-sd15-style.safetensors", "tiny-sd15-kohya.safetensors")
    result: SweepResult = run_sweep(Executor(registry, demo_settings), base, [Axis("2", "lora", loras)], events)
    assert result.status == "ok", [job.to_json() for job in result.jobs]
    assert [e.kind for e in events.of(ev.NodeInfo)].count("load") == 1
    assert events.ran().count("1") == 1  # LoadCheckpoint ran for the first job only
    assert result.grid is not None
    grid = Image.open(result.grid)
    assert grid.height > 64 and grid.width >= 2 * 64  # two columns of 64×64 images
    assert json.loads(grid.text["sweep"])["axes"][0]["values"] == list(loras)  # type: ignore[attr-defined]
