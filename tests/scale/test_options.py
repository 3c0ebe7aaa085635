"""`nodegraph serve --ray`: options that cannot work are refused before anything starts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from nodegraph.cli import main


def serve(tmp_path: Path, *options: str) -> list[str]:
    return ["serve", "--port", "0", "--data-dir", str(tmp_path / "data"), "--device", "cpu", *options]


def test_no_workers_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(serve(tmp_path, "--ray", "--workers", "0")) == 1
    assert "error: --workers 0: at least one worker" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


def test_a_negative_job_timeout_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(serve(tmp_path, "--ray", "--job-timeout", "-1")) == 1
    assert "--job-timeout 0 or more" in capsys.readouterr().err


def test_ray_missing_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` finds when Ray is not installed
    assert main(serve(tmp_path, "--ray")) == 1
    assert "--ray needs Ray, which is not installed" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()
