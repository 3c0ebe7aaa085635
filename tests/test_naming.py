"""Numbered names: one past the highest counter, and a name taken meanwhile is skipped, never replaced."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodegraph import naming
from nodegraph.naming import link_numbered, move_numbered, next_counter


def test_a_finished_file_is_linked_to_the_next_free_number(tmp_path: Path) -> None:
    (tmp_path / "m_00003_.safetensors").write_bytes(b"keep")
    finished = tmp_path / ".temp"
    finished.write_bytes(b"new")
    assert next_counter(tmp_path, "m", ".safetensors") == 4
    assert link_numbered(finished, tmp_path, "m", ".safetensors") == tmp_path / "m_00004_.safetensors"
    assert (tmp_path / "m_00004_.safetensors").read_bytes() == b"new"
    assert (tmp_path / "m_00003_.safetensors").read_bytes() == b"keep"
    assert next_counter(tmp_path / "absent", "m") == 1


def test_a_finished_folder_skips_numbers_taken_after_the_scan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for taken in ("c_00001_", "c_00002_"):
        (tmp_path / taken).mkdir()
        (tmp_path / taken / "keep").write_text("x")
    built = tmp_path / ".build"
    built.mkdir()
    (built / "model_index.json").write_text("{}")
    monkeypatch.setattr(naming, "next_counter", lambda folder, name, suffix: 1)  # as if scanned before both
    assert move_numbered(built, tmp_path, "c") == tmp_path / "c_00003_"
    assert (tmp_path / "c_00003_" / "model_index.json").exists()
    assert all((tmp_path / taken / "keep").exists() for taken in ("c_00001_", "c_00002_"))
