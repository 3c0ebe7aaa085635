"""The workflow file: round trips, ComfyUI's API format, the JSON Schema, and hostile files."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from nodegraph import workflow as wf

EXAMPLES = sorted(Path(__file__).parents[1].glob("workflows/*.json"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_round_trip_unchanged_and_match_the_schema(path: Path, tmp_path: Path) -> None:
    loaded = wf.load(path)
    jsonschema.validate(loaded, json.loads(wf.SCHEMA_PATH.read_text()))
    wf.save(loaded, tmp_path / "copy.json")
    assert json.loads((tmp_path / "copy.json").read_text()) == json.loads(path.read_text())
    assert wf.load(tmp_path / "copy.json") == loaded


def test_schema_rejects_what_validation_rejects() -> None:
    schema = json.loads(wf.SCHEMA_PATH.read_text())
    for bad in ({"nodes": {}}, {"format": "x", "nodes": {}}, {"format": "nodegraph/1", "nodes": {"1": {}}},
                {"format": "nodegraph/1", "nodes": {"1": {"type": "Show", "inputs": {"value": [1, 0]}}}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_comfy_api_format_is_lowered(tmp_path: Path) -> None:
    api = {"4": {"class_type": "Int", "inputs": {"value": 2}, "_meta": {"title": "two"}},
           "5": {"class_type": "Show", "inputs": {"value": ["4", 0]}}}
    (tmp_path / "api.json").write_text(json.dumps(api))
    assert wf.load(tmp_path / "api.json") == {
        "format": "nodegraph/1", "ui": {},
        "nodes": {"4": {"type": "Int", "inputs": {"value": 2}, "title": "two"},
                  "5": {"type": "Show", "inputs": {"value": ["4", 0]}}}}


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe\x00garbage\x81", "not UTF-8"),
    (b"{\"nodes\": ", "malformed JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b"1" * 10_000, "malformed JSON"),
    (b"", "malformed JSON"),
])
def test_unreadable_files_raise_workflow_error(tmp_path: Path, content: bytes, message: str) -> None:
    (tmp_path / "bad.json").write_bytes(content)
    with pytest.raises(wf.WorkflowError, match=message):
        wf.load(tmp_path / "bad.json")


def test_missing_file_is_a_workflow_error(tmp_path: Path) -> None:
    with pytest.raises(wf.WorkflowError) as err:
        wf.load(tmp_path / "nope.json")
    assert err.value.code == "unreadable"
