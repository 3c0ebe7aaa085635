"""The `nodegraph` command: run, validate, nodes; exit codes, --set, --json, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from nodegraph.cli import main
from tests.conftest import PACKS, workflow

ROOT = Path(__file__).parents[1]
MATH = str(ROOT / "workflows" / "math.json")


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def write(tmp_path: Path, content: Any) -> str:
    path = tmp_path / "wf.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def test_run_prints_a_table_and_the_shown_value(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "run", MATH)
    assert code == 0
    assert out.splitlines()[0].split() == ["node", "type", "status", "seconds"]
    assert 'node 5 (Show) value: "(3 + 4.5)^2 = 56.25"' in out


def test_run_json_with_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "run", MATH, "--json", "--set", "1.value=10", "--set", "2.op=multiply")
    result = json.loads(out)
    assert code == 0 and result["status"] == "ok" and result["errors"] == [] and result["files"] == []
    assert result["nodes"]["5"]["outputs"] == {"value": "(10 + 4.5)^2 = 2025.00"}
    assert set(result["nodes"]["1"]) == {"type", "status", "seconds", "outputs"}


@pytest.mark.parametrize("override, code", [("9.value=1", "missing_node"), ("value=1", "bad_override"),
                                            ("1.value", "bad_override"), ("1.value=x", "wrong_type")])
def test_bad_overrides_are_invalid(capsys: pytest.CaptureFixture[str], override: str, code: str) -> None:
    status, out, _ = run_cli(capsys, "run", MATH, "--json", "--set", override)
    assert status == 1 and json.loads(out)["errors"][0]["code"] == code


def test_set_value_that_is_not_json_is_a_string(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = write(tmp_path, workflow({"1": {"type": "String"}, "2": {"type": "Show", "inputs": {"value": ["1", 0]}}}))
    _, out, _ = run_cli(capsys, "run", path, "--json", "--set", "1.value=a cat, 4k")
    assert json.loads(out)["nodes"]["2"]["outputs"]["value"] == "a cat, 4k"


def test_execution_error_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = write(tmp_path, workflow({"1": {"type": "Math", "inputs": {"a": 1, "b": 0, "op": "divide"}},
                                     "2": {"type": "Show", "inputs": {"value": ["1", 0]}}}))
    code, _, err = run_cli(capsys, "run", path)
    assert code == 2 and "error: node 1, input 'b': cannot divide 1 by zero" in err


def test_unexpected_node_error_hides_the_traceback_unless_debug(capsys: pytest.CaptureFixture[str],
                                                                tmp_path: Path) -> None:
    path = write(tmp_path, workflow({"1": {"type": "Fail", "inputs": {"expected": False}},
                                     "2": {"type": "Show", "inputs": {"value": ["1", 0]}}}))
    code, _, err = run_cli(capsys, "run", path, "--nodes-dir", str(PACKS))
    assert code == 2 and "RuntimeError: unexpected" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "run", path, "--nodes-dir", str(PACKS), "--debug")
    assert "Traceback" in err


@pytest.mark.parametrize("content", ["\x00\x01garbage", "{" * 50_000, "1e400", '{"format": "nodegraph/1", '
                                     '"nodes": {"1": {"type": "Float", "inputs": {"value": 1e400}}}}',
                                     json.dumps({"format": "nodegraph/1", "nodes": {"1": {"type": "x" * 10**7}}})])
def test_validate_never_tracebacks(capsys: pytest.CaptureFixture[str], tmp_path: Path, content: str) -> None:
    code, out, _ = run_cli(capsys, "validate", write(tmp_path, content), "--json")
    result = json.loads(out)
    assert code == 1 and result["ok"] is False and result["errors"]
    assert set(result["errors"][0]) == {"node_id", "input", "code", "message"}
    assert len(out) < 100_000


def test_validate_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(capsys, "validate", MATH)[0] == 0
    code, out, _ = run_cli(capsys, "validate", MATH, "--json")
    assert json.loads(out) == {"ok": True, "errors": []}


def test_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = run_cli(capsys, "run", str(tmp_path / "nope.json"))
    assert code == 1


def test_nodes_catalog(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "nodes", "--json")
    catalog = json.loads(out)["nodes"]
    assert code == 0 and catalog["Math"]["inputs"][2]["choices"][:2] == ["add", "subtract"]
    code, out, _ = run_cli(capsys, "nodes", "--nodes-dir", str(PACKS))
    assert "Slow 1.0.0" in out and "Math 1.0.0  (a:FLOAT?, b:FLOAT?, op:COMBO?) -> result:FLOAT" in out


def test_bad_node_pack_is_a_clear_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("NODES = None")
    code, _, err = run_cli(capsys, "nodes", "--nodes-dir", str(tmp_path))
    assert code == 1 and err.startswith("error: node pack") and "broken.py" in err


def test_ctrl_c_interrupts_cleanly_with_exit_130(tmp_path: Path) -> None:
    marker = tmp_path / "started"
    path = write(tmp_path, workflow({"1": {"type": "Slow", "inputs": {"steps": 10_000, "delay": 0.001,
                                                                      "marker": str(marker)}},
                                     "2": {"type": "Show", "inputs": {"value": ["1", 0]}}}))
    proc = subprocess.Popen([sys.executable, "-m", "nodegraph.cli", "run", path, "--json", "--nodes-dir", str(PACKS)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # until the node has begun (however loaded the machine)
    assert marker.exists(), proc.communicate()[1]
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert json.loads(out)["status"] == "interrupted" and "Traceback" not in err


def test_models_folders_from_flag_environment_and_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from nodegraph.settings import Settings

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NODEGRAPH_MODELS", raising=False)
    monkeypatch.delenv("NODEGRAPH_CONFIG", raising=False)
    assert Settings.from_args().models_dirs == (Path("models"),)
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "nodegraph.json").write_text('{"models_dirs": ["m1", "/abs"], "output_dir": "out"}')
    monkeypatch.setenv("NODEGRAPH_CONFIG", str(tmp_path / "conf" / "nodegraph.json"))
    settings = Settings.from_args()
    assert settings.models_dirs == (tmp_path / "conf" / "m1", Path("/abs"))
    assert settings.output_dir == tmp_path / "conf" / "out"
    monkeypatch.setenv("NODEGRAPH_MODELS", os.pathsep.join(["e1", "e2"]))
    assert Settings.from_args().models_dirs == (Path("e1"), Path("e2"))
    assert Settings.from_args(["flag"], "o").models_dirs == (Path("flag"),)
    (tmp_path / "conf" / "nodegraph.json").write_text('{"models_dirs": "not a list"}')
    code, _, err = run_cli(capsys, "nodes")
    assert code == 1 and "config file" in err


@pytest.mark.parametrize("device, available, count, says", [
    ("cuda", False, 0, "device 'cuda': "),
    ("cuda:0", False, 0, "use --device cpu"),
    ("cuda:2", True, 1, "this machine has 1 CUDA GPU(s), cuda:0 to cuda:0"),
])
def test_a_device_that_is_not_there_exits_1_at_start(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch, device: str, available: bool,
                                                     count: int, says: str) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    started: list[object] = []
    monkeypatch.setattr("nodegraph.cli.Executor.run", lambda *args: started.append(args))
    code, out, err = run_cli(capsys, "run", MATH, "--device", device, "--output-dir", str(tmp_path))
    assert code == 1 and out == "" and not started
    assert err.startswith("error: device") and says in err and "Traceback" not in err


def test_a_reader_that_goes_away_ends_the_run_quietly(tmp_path: Path) -> None:
    """`nodegraph run … --json | head -0`: the pipe's reader is gone before anything is written."""
    read, write_end = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([sys.executable, "-m", "nodegraph.cli", "run", MATH, "--json"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    finally:
        os.close(write_end)
    assert proc.returncode == 141 and proc.stderr == ""


def test_a_bad_text_encoder_device_exits_1_naming_the_option(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device, says in (("gpu", "unknown text_encoder_device (--text-encoder-device) 'gpu'"),
                         ("cuda", "text_encoder_device 'cuda': ")):
        code, out, err = run_cli(capsys, "run", MATH, "--device", "cpu", "--text-encoder-device", device,
                                 "--output-dir", str(tmp_path))
        assert code == 1 and out == "" and says in err and "use --text-encoder-device cpu" * (device == "cuda") in err
        assert "Traceback" not in err


def test_models_status_lists_components(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from nodegraph import cli_models
    from nodegraph.models import ModelManager
    from tests.test_models import Parts

    manager = ModelManager(device="cpu", text_encoder_device="cpu")
    with manager.use("flux", lambda placement: Parts("tiny-flux", 300, placement, []), 300, "tiny-flux (bf16)"):
        pass
    monkeypatch.setattr(cli_models, "model_manager", lambda args: manager)
    code, out, _ = run_cli(capsys, "models", "status", "--url", "http://127.0.0.1:1")
    lines = out.splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith("tiny-flux (bf16)"))
    assert code == 0 and lines[row + 1].split() == ["transformer", "(bfloat16)", "cpu", "300", "B", "cpu"]
    assert lines[row + 2].split() == ["text_encoder_2", "(float32)", "cpu", "70", "B", "cpu"]


def test_models_status_lists_the_caches_counted_in_the_budgets(capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from nodegraph import cli_models
    from nodegraph.models import ModelManager
    from tests.test_models import Pool

    manager = ModelManager(device="cpu", ram_budget=10_000)
    manager.add_pool(Pool(("cpu", 1000), ("cpu", 500)))
    monkeypatch.setattr(cli_models, "model_manager", lambda args: manager)
    code, out, _ = run_cli(capsys, "models", "status", "--url", "http://127.0.0.1:1")
    assert code == 0 and "fake cache: 2 entries, 1.5 KiB cpu" in out.splitlines()
    assert "ram budget on cpu: 9.8 KiB, models up to 8.8 KiB, 1.5 KiB used" in out


def test_validate_names_the_node_and_input_of_a_non_finite_literal(capsys: pytest.CaptureFixture[str],
                                                                  tmp_path: Path) -> None:
    path = tmp_path / "inf.json"
    path.write_text('{"format": "nodegraph/1", "nodes": {"1": {"type": "Float", "inputs": {"value": 1e400}}, '
                    '"2": {"type": "Show", "inputs": {"value": ["1", 0]}}}}')
    for command in ("validate", "run"):
        assert main([command, str(path), "--json"]) != 0
        error = json.loads(capsys.readouterr().out)["errors"][0]
        assert (error["node_id"], error["input"], error["code"]) == ("1", "value", "non_finite_number")
