"""The workflow file: round trips, ComfyUI's API format, the JSON Schema, and hostile files."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
        "nodes": {"4": {"type": "Int", "inputs": {"value": 2}, "title": "two", "ui": {"pos": [40, 40]}},
                  "5": {"type": "Show", "inputs": {"value": ["4", 0]}, "ui": {"pos": [380, 40]}}}}


def test_lowered_comfy_workflows_are_laid_out_left_to_right() -> None:
    """The API format has no positions: every link must run rightwards and no two nodes may share a spot."""
    for path in (Path(__file__).parents[1] / "workflows" / "comfyui").glob("*.json"):
        nodes = wf.load(path)["nodes"]
        spots = [tuple(node["ui"]["pos"]) for node in nodes.values()]
        assert len(set(spots)) == len(spots), path.name
        for node in nodes.values():
            for value in node["inputs"].values():
                if isinstance(value, list) and len(value) == 2:
                    assert nodes[value[0]]["ui"]["pos"][0] < node["ui"]["pos"][0], path.name


def test_a_link_to_a_node_id_that_is_not_text_is_left_to_validation(registry: Any) -> None:
    from nodegraph.validate import validate

    for source in ({"x": 1}, ["a"], 3):
        graph = wf.lower_comfy_api({"1": {"class_type": "Show", "inputs": {"value": [source, 0]}}})
        _, problems = validate(graph, registry)
        assert [(p.node_id, p.input) for p in problems] == [("1", "value")], source


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


@pytest.mark.parametrize("text, code, where", [
    ('{"format": "nodegraph/1", "nodes": {"3": {"inputs": {"b": 1e400}}}}', "non_finite_number",
     "node '3' at inputs/b"),
    ('{"nodes": {}, "ui": {"pos": [0, NaN]}}', "non_finite_number", "ui/pos/1"),
    ('{"nodes": {"1": {"ui": {"x": -Infinity}}}}', "non_finite_number", "node '1' at ui/x"),
    ('{"workflow": {"nodes": {"7": {"inputs": {"s": 1e999}}}}}', "non_finite_number", "node '7' at inputs/s"),
    ('Infinity', "non_finite_number", "the top level"),
    ('{"nodes": {}, "ui": {"title": "\\ud800"}}', "invalid_text", "ui/title"),
    ('{"nodes": {}, "ui": {"\\udfff": {}}}', "invalid_text", "ui/\\udfff"),
    ('{"client_id": "a\\udc00b"}', "invalid_text", "client_id"),
    ('{"nodes": {}, "ui": ' + "[" * 200 + "]" * 200 + "}", "too_deep", "ui/0/0/0"),
])
def test_values_json_has_no_room_for_are_refused_naming_where(tmp_path: Path, text: str, code: str,
                                                              where: str) -> None:
    # Python's json reads these; no file, database or JSON reply can hold them.
    (tmp_path / "bad.json").write_text(text)
    with pytest.raises(wf.WorkflowError, match=re.escape(where)) as err:
        wf.load(tmp_path / "bad.json")
    assert err.value.code == code


def test_finite_numbers_unicode_and_ordinary_nesting_pass() -> None:
    text = '{"nodes": {"1": {"inputs": {"f": 1e308, "s": "😀 \\ud83d\\ude00 é"}}}, "ui": ' + "[" * 40 + "]" * 40 + "}"
    value = wf.parse(text)
    assert value["nodes"]["1"]["inputs"] == {"f": 1e308, "s": "😀 😀 é"}


# The hostile pieces the fast text screen (`wf._plain`) must send to the full walk, written as raw JSON.
_TOKENS = ["1e400", "-1E+309", "1" + "0" * 320 + ".5", "NaN", "-Infinity", '"\\ud800"', '"\\udc00x"',
           '"\\ud83d\\ude00"', '"a\\"[b"', '"[{"', '"]]]}}"', '"\\\\"', "1e308", "2.5e-300", "1e+20", '"e00"']


def _dump(value: Any, ascii_only: bool) -> str:
    if isinstance(value, _Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k, ensure_ascii=ascii_only)}:{_dump(v, ascii_only)}"
                              for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_dump(v, ascii_only) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ascii_only)


class _Raw:
    def __init__(self, text: str) -> None:
        self.text = text


def _nested(value: Any, depth: int, as_list: bool) -> Any:
    for _ in range(depth):
        value = [value] if as_list else {"k": value}
    return value


_text = st.text(st.characters(codec="utf-8"), max_size=8) | st.sampled_from(["[", "]", "{", "}", '"', "\\", "é"])
_leaves = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
           | _text | st.sampled_from(_TOKENS).map(_Raw))
_values = st.recursive(_leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
                       max_leaves=20)
_deep = st.builds(_nested, _values, st.integers(55, 70), st.booleans())


def _outcome(check: Any) -> str:
    try:
        check()
    except wf.WorkflowError as exc:
        return exc.code
    except json.JSONDecodeError:
        return "invalid_json"
    return "ok"


@settings(max_examples=400, deadline=None)
@given(_values | _deep, st.booleans(), st.booleans())
def test_the_fast_screen_accepts_and_refuses_exactly_what_the_walk_does(value: Any, ascii_only: bool,
                                                                       as_bytes: bool) -> None:
    text = _dump(value, ascii_only)
    expected = _outcome(lambda: wf.check_values(json.loads(text)))
    assert _outcome(lambda: wf.parse(text.encode("utf-8", "surrogatepass") if as_bytes else text)) == expected


def test_brackets_inside_strings_cannot_hide_nesting() -> None:
    # 72 levels, but strings holding "]]]…" and "[[[…" halfway down make the brackets alone look 37 deep.
    half = "[" * 35
    text = '{"ui": ' + half + '"' + "]" * 35 + '", ' + half + "[]" + "]" * 35 + ', "' + "[" * 35 + '"' + "]" * 35 + "}"
    # Lists and objects in turn, 82 deep: a pass over the skeleton takes two such levels away at a time.
    alternating = '{"ui": ' + '[{"a": ' * 40 + "1" + "}]" * 40 + "}"
    for deep in (text, alternating):
        with pytest.raises(wf.WorkflowError) as err:
            wf.parse(deep)
        assert err.value.code == "too_deep"


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_text, _values | _deep, max_size=4), st.booleans(), st.sampled_from(["", " ", "\n\t "]))
def test_members_are_parsed_as_parse_does_and_their_texts_read_back_to_them(members: dict[str, Any],
                                                                           ascii_only: bool, space: str) -> None:
    text = "{" + space + ("," + space).join(f"{json.dumps(k, ensure_ascii=ascii_only)}{space}:{space}"
                                            f"{_dump(v, ascii_only)}" for k, v in members.items()) + space + "}"
    data = text.encode("utf-8")
    expected = _outcome(lambda: wf.parse(data))
    assert _outcome(lambda: wf.parse_members(data)) == expected
    if expected == "ok":
        value, texts = wf.parse_members(data)
        assert value == wf.parse(data)
        assert {k: json.loads(t) for k, t in texts.items()} == value
    for broken in (text[:-1], text.replace("}", ",}", 1) if members else "{,}", "[" + text + "]"):
        assert _outcome(lambda b=broken: wf.parse_members(b.encode("utf-8"))) == _outcome(  # type: ignore[misc]
            lambda b=broken: wf.parse(b.encode("utf-8")))


@pytest.mark.parametrize("text, node_id, input_name", [
    ('{"format": "nodegraph/1", "nodes": {"3": {"inputs": {"b": 1e400}}}}', "3", "b"),
    ('{"nodes": {"1": {"type": "Int", "inputs": {"value": NaN}}}}', "1", "value"),
    ('{"nodes": {"1": {"inputs": {"s": ["x", "\\ud800"]}}}}', "1", "s"),
    ('{"nodes": {"1": {"inputs": {"\\ud800": 1}}}}', "1", "\\ud800"),
    ('{"nodes": {"2": {"inputs": {"v": ' + "[" * 70 + "]" * 70 + "}}}}", "2", "v"),
    ('{"workflow": {"nodes": {"7": {"inputs": {"s": 1e999}}}}}', "7", "s"),  # an API request's body
    ('{"5": {"class_type": "KSampler", "inputs": {"cfg": 1e400}}}', "5", "cfg"),  # ComfyUI's API format
    ('{"nodes": {"1": {"ui": {"x": -Infinity}}}}', "1", None),
    ('{"nodes": {}, "ui": {"x": NaN}}', None, None),
])
def test_a_refused_value_names_its_node_and_input(text: str, node_id: str | None, input_name: str | None) -> None:
    for data in (text, text.encode()):
        with pytest.raises(wf.WorkflowError) as err:
            wf.parse(data)
        assert (err.value.node_id, err.value.input) == (node_id, input_name)
        assert err.value.to_json()["node_id"] == node_id
