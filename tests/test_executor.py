"""The executor: planning, content-addressed caching, invalidation, errors, cancellation, events."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from nodegraph import events as ev
from nodegraph.cache import Entry, OutputCache, nbytes
from nodegraph.context import CancelToken
from nodegraph.executor import Executor
from nodegraph.registry import Registry
from tests.conftest import Recorder, workflow


def math_chain() -> dict[str, Any]:
    return workflow({
        "1": {"type": "Int", "inputs": {"value": 3}},
        "2": {"type": "Math", "inputs": {"a": ["1", "value"], "b": 4.5, "op": "add"}},
        "3": {"type": "Math", "inputs": {"a": ["2", 0], "b": 2, "op": "multiply"}},
        "4": {"type": "Math", "inputs": {"a": ["1", 0], "b": 1, "op": "subtract"}},
        "5": {"type": "Show", "inputs": {"value": ["3", 0]}},
        "6": {"type": "Show", "inputs": {"value": ["4", 0]}},
    })


def test_runs_in_dependency_order_and_reports_outputs(executor: Executor) -> None:
    events = Recorder()
    result = executor.run(math_chain(), events)
    assert result.status == "ok"
    assert result.nodes["5"].outputs == {"value": 15.0}
    assert result.nodes["6"].outputs == {"value": 2.0}
    order = events.ran()
    assert order.index("1") < order.index("2") < order.index("3") < order.index("5")
    assert [type(e) for e in (events[0], events[-1])] == [ev.JobStarted, ev.JobFinished]
    assert result.to_json()["nodes"]["5"] == {"type": "Show", "status": "ran",
                                               "seconds": result.to_json()["nodes"]["5"]["seconds"],
                                               "outputs": {"value": 15.0}}


def test_identical_rerun_executes_nothing(executor: Executor) -> None:
    executor.run(math_chain())
    events = Recorder()
    result = executor.run(math_chain(), events)
    assert events.ran() == []
    assert {r.status for r in result.nodes.values()} == {"cached"}
    assert result.nodes["5"].outputs == {"value": 15.0}


def test_changed_literal_reruns_exactly_that_node_and_its_descendants(executor: Executor) -> None:
    executor.run(math_chain())
    changed = math_chain()
    changed["nodes"]["2"]["inputs"]["b"] = 5.5
    events = Recorder()
    result = executor.run(changed, events)
    assert sorted(events.ran()) == ["2", "3", "5"]
    assert result.nodes["5"].outputs == {"value": 17.0}


def test_renumbered_nodes_keep_their_cache_keys(executor: Executor) -> None:
    executor.run(math_chain())
    mapping = {"1": "a", "2": "b", "3": "c", "4": "d", "5": "e", "6": "f"}
    renamed = {mapping[k]: {**v, "inputs": {name: [mapping[x[0]], x[1]] if isinstance(x, list) else x
                                            for name, x in v["inputs"].items()}}
               for k, v in math_chain()["nodes"].items()}
    events = Recorder()
    result = executor.run(workflow(renamed), events)
    assert events.ran() == []
    assert result.nodes["e"].outputs == {"value": 15.0}


def test_editor_data_does_not_change_keys(executor: Executor) -> None:
    executor.run(math_chain())
    moved = math_chain()
    moved["nodes"]["2"].update(title="renamed", ui={"pos": [1, 2]})
    events = Recorder()
    executor.run(moved, events)
    assert events.ran() == []


def test_only_what_output_nodes_need_runs(executor: Executor) -> None:
    wf = math_chain()
    wf["nodes"]["7"] = {"type": "Slow", "inputs": {"steps": 3}}  # feeds no output node
    events = Recorder()
    result = executor.run(wf, events)
    assert "7" not in events.ran() and "7" not in result.nodes


def test_changed_file_invalidates_the_nodes_that_read_it(executor: Executor, tmp_path: Path) -> None:
    path = tmp_path / "prompt.txt"
    path.write_text("a cat")
    wf = workflow({"1": {"type": "ReadText", "inputs": {"path": str(path)}},
                   "2": {"type": "Show", "inputs": {"value": ["1", 0]}}})
    assert executor.run(wf).nodes["2"].outputs == {"value": "a cat"}
    events = Recorder()
    executor.run(wf, events)
    assert events.ran() == []
    path.write_text("a dog")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    events = Recorder()
    assert executor.run(wf, events).nodes["2"].outputs == {"value": "a dog"}
    assert events.ran() == ["1", "2"]


def test_node_failure_ends_the_run_with_an_error_naming_the_node(executor: Executor) -> None:
    wf = workflow({"1": {"type": "Int", "inputs": {"value": 1}},
                   "2": {"type": "Fail", "inputs": {"value": ["1", 0]}},
                   "3": {"type": "Show", "inputs": {"value": ["2", 0]}}})
    events = Recorder()
    result = executor.run(wf, events)
    assert result.status == "error"
    assert [(p.node_id, p.input, p.code) for p in result.errors] == [("2", "value", "test_failure")]
    [error] = events.of(ev.NodeError)
    assert (error.node_id, error.node_type, error.message) == ("2", "Fail", "this node always fails")
    assert "3" not in result.nodes
    assert events[-1] == ev.JobFinished(result.job_id, "error", events[-1].seconds)
    # Nothing half-done is cached: the failed node runs again; the good one before it does not.
    events = Recorder()
    executor.run(wf, events)
    assert events.ran() == ["2"]


def test_unexpected_exception_is_an_error_with_a_traceback_kept(executor: Executor) -> None:
    wf = workflow({"1": {"type": "Fail", "inputs": {"expected": False}},
                   "2": {"type": "Show", "inputs": {"value": ["1", 0]}}})
    result = executor.run(wf)
    assert [(p.node_id, p.code, p.message) for p in result.errors] == [("1", "exception", "RuntimeError: unexpected")]
    assert result.traceback and "RuntimeError" in result.traceback


def test_division_by_zero_is_a_node_error(executor: Executor) -> None:
    wf = workflow({"1": {"type": "Math", "inputs": {"a": 1, "b": 0, "op": "divide"}},
                   "2": {"type": "Show", "inputs": {"value": ["1", 0]}}})
    result = executor.run(wf)
    assert [(p.node_id, p.input, p.code) for p in result.errors] == [("1", "b", "division_by_zero")]


def test_invalid_workflow_runs_nothing(executor: Executor) -> None:
    events = Recorder()
    result = executor.run(workflow({"1": {"type": "Show"}}), events)
    assert result.status == "invalid" and result.errors[0].code == "missing_input"
    assert events.of(ev.NodeStarted) == [] and events.of(ev.JobFinished)[0].status == "invalid"


def test_cancel_inside_a_long_node_stops_it_and_caches_nothing(executor: Executor) -> None:
    cancel = CancelToken()
    wf = workflow({"1": {"type": "Slow", "inputs": {"steps": 1000}},
                   "2": {"type": "Show", "inputs": {"value": ["1", 0]}}})

    def sink(event: ev.Event) -> None:
        if isinstance(event, ev.Progress) and event.step == 3:
            cancel.cancel()

    events = Recorder()
    result = executor.run(wf, lambda e: (sink(e), events(e)), cancel)
    assert result.status == "interrupted"
    assert max(e.step for e in events.of(ev.Progress)) == 3
    assert events.of(ev.Interrupted)[0].node_id == "1"
    assert len(executor.cache) == 0


def test_cancel_between_nodes(executor: Executor) -> None:
    cancel = CancelToken()

    def sink(event: ev.Event) -> None:
        if isinstance(event, ev.NodeFinished) and event.node_id == "1":
            cancel.cancel()

    events = Recorder()
    result = executor.run(math_chain(), lambda e: (sink(e), events(e)), cancel)
    assert result.status == "interrupted" and events.ran() == ["1"]
    assert executor.run(math_chain()).status == "ok"  # the next job is unaffected


def test_cancel_from_another_thread(executor: Executor) -> None:
    cancel = CancelToken()
    wf = workflow({"1": {"type": "Slow", "inputs": {"steps": 10_000, "delay": 0.001}},
                   "2": {"type": "Show", "inputs": {"value": ["1", 0]}}})
    timer = threading.Timer(0.05, cancel.cancel)
    timer.start()
    assert executor.run(wf, cancel=cancel).status == "interrupted"


def test_cache_is_an_lru_bounded_by_bytes() -> None:
    size = nbytes({"v": b"x" * 900})
    cache = OutputCache(max_bytes=3 * size)
    for i in range(10):
        cache.put(f"k{i}", Entry({"v": b"x" * 900}))
    assert cache.bytes == 3 * size and len(cache) == 3 and "k0" not in cache
    cache.get("k7")  # the oldest, but used: it survives the next insertion
    cache.put("k10", Entry({"v": b"x" * 900}))
    assert "k7" in cache and "k8" not in cache
    cache.put("huge", Entry({"v": b"x" * 10 * size}))
    assert "huge" not in cache and "k10" in cache


def test_cache_budget_applies_to_runs(registry: Registry) -> None:
    executor = Executor(registry, cache=OutputCache(max_bytes=1))
    executor.run(math_chain())
    events = Recorder()
    executor.run(math_chain(), events)
    assert len(events.ran()) == 6  # nothing fit, so everything ran again


OPS = ["add", "subtract", "multiply", "min", "max"]


def direct(op: str, a: float, b: float) -> float:
    return {"add": a + b, "subtract": a - b, "multiply": a * b, "min": min(a, b), "max": max(a, b)}[op]


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 40), st.randoms(use_true_random=False))
def test_random_graphs_match_direct_evaluation(registry: Registry, size: int, rnd: random.Random) -> None:
    """Random DAGs of Math nodes (ids shuffled, so file order is not dependency order)."""
    ids = [f"n{i}" for i in range(size)]
    rnd.shuffle(ids)
    nodes: dict[str, Any] = {}
    expected: dict[str, float] = {}
    for i, node_id in enumerate(ids):
        op = rnd.choice(OPS)
        inputs: dict[str, Any] = {"op": op}
        values = []
        for name in ("a", "b"):
            if i and rnd.random() < 0.7:
                source = ids[rnd.randrange(i)]
                inputs[name] = [source, "result"]
                values.append(expected[source])
            else:
                inputs[name] = float(rnd.randint(-3, 3))
                values.append(inputs[name])
        nodes[node_id] = {"type": "Math", "inputs": inputs}
        expected[node_id] = max(-1e6, min(1e6, direct(op, *values)))
        if expected[node_id] != direct(op, *values):  # keep values small: rebuild as a literal
            nodes[node_id] = {"type": "Float", "inputs": {"value": expected[node_id]}}
    shown = rnd.sample(ids, k=min(3, size))
    for j, node_id in enumerate(shown):
        output = "value" if nodes[node_id]["type"] == "Float" else "result"
        nodes[f"show{j}"] = {"type": "Show", "inputs": {"value": [node_id, output]}}
    events = Recorder()
    result = Executor(registry).run(workflow(nodes), events)
    assert result.status == "ok"
    for j, node_id in enumerate(shown):
        assert result.nodes[f"show{j}"].outputs["value"] == expected[node_id]
    # Identical nodes share a key, so the second of a pair is served from the cache: order both.
    done = [e.node_id for e in events if isinstance(e, (ev.NodeStarted, ev.NodeCached))]
    position = {node_id: i for i, node_id in enumerate(done)}
    for node_id in position:
        for value in nodes[node_id].get("inputs", {}).values():
            if isinstance(value, list):
                assert position[value[0]] < position[node_id]


def test_a_run_record_keeps_output_nodes_in_full_and_the_rest_in_brief(executor: Executor) -> None:
    long = "ab" * 600
    result = executor.run(workflow({
        "1": {"type": "String", "inputs": {"value": long}},
        "2": {"type": "Format", "inputs": {"template": "{a}{a}", "a": ["1", 0]}},
        "3": {"type": "Int", "inputs": {"value": 7}},
        "4": {"type": "Show", "inputs": {"value": ["2", 0]}},
        "5": {"type": "Show", "inputs": {"value": ["3", 0]}},
    }))
    nodes = result.to_json()["nodes"]
    assert nodes["4"]["outputs"] == {"value": long * 2}  # an output node: in full
    assert nodes["2"]["outputs"]["text"]["$type"] == "str"  # the rest: described, not copied
    assert nodes["2"]["outputs"]["text"]["summary"].startswith("2,400 characters: abab")
    assert len(nodes["1"]["outputs"]["value"]["summary"]) < 150
    assert nodes["3"]["outputs"] == {"value": 7}  # short values stay as they are
    assert result.nodes["2"].outputs == {"text": long * 2}  # the run itself keeps every value


def test_cached_runs_key_nodes_exactly_as_node_key_does(executor: Executor) -> None:
    from nodegraph.cache import node_key
    from nodegraph.validate import validate

    graph, _ = validate(math_chain(), executor.registry)
    assert graph is not None
    executor.execute(graph, ev.ignore, CancelToken(), "j")
    keys = {}
    for node_id in graph.order:
        step = graph.steps[node_id]
        upstream = {name: f"{keys[source]}/{output}" for name, (source, output) in step.links.items()}
        keys[node_id] = node_key(step.cls.type, step.cls.version, step.literals_json, upstream)
    assert set(keys.values()) <= set(executor.cache._entries)


def test_a_linked_model_name_no_file_can_have_fails_as_bad_name_without_server_paths(registry: Registry,
                                                                                      tmp_path: Path) -> None:
    from nodegraph.settings import Settings

    settings = Settings(models_dirs=(tmp_path / "models",), output_dir=tmp_path / "out")
    (tmp_path / "models" / "checkpoints").mkdir(parents=True)
    wf = workflow({"name": {"type": "Format", "inputs": {"template": "x" * 300}},  # known only once it runs
                   "1": {"type": "LoadCheckpoint", "inputs": {"checkpoint": ["name", 0]}},
                   "2": {"type": "Show", "inputs": {"value": ["1", 0]}}})
    result = Executor(registry, settings).run(wf)
    assert result.status == "error"
    [error] = result.errors
    assert (error.node_id, error.input, error.code) == ("1", "checkpoint", "bad_name")
    assert str(tmp_path) not in error.message


def long_chain(n: int, b: Any = 0.5) -> dict[str, Any]:
    nodes: dict[str, Any] = {"0": {"type": "Int", "inputs": {"value": 1}}}
    for i in range(1, n):
        nodes[str(i)] = {"type": "Math", "inputs": {"a": [str(i - 1), 0], "b": b, "op": "add"}}
    nodes["show"] = {"type": "Show", "inputs": {"value": [str(n - 1), 0]}}
    return workflow(nodes)


def test_equal_literals_are_encoded_once_per_graph(executor: Executor, monkeypatch: Any) -> None:
    """A cold run's cache keys need each step's literals as canonical JSON; steps with the same literals
    share one encoding (a 10,000-node chain used to encode 10,000 times), and the keys stay node_key's."""
    import nodegraph.validate

    encoded: list[Any] = []
    real = nodegraph.validate.canonical_json
    monkeypatch.setattr(nodegraph.validate, "canonical_json", lambda value: encoded.append(value) or real(value))
    result = executor.run(long_chain(500))
    assert result.status == "ok" and result.nodes["show"].outputs == {"value": 250.5}
    assert len(encoded) <= 3  # Int's, Math's, Show's (empty) literals
    test_cached_runs_key_nodes_exactly_as_node_key_does(executor)


def test_literals_that_are_equal_but_encode_differently_key_differently(executor: Executor) -> None:
    """0.0 == -0.0 and 1 == 1.0 in Python, but their JSON differs: steps of one graph never share an encoding."""
    nodes: dict[str, Any] = {"0": {"type": "Int", "inputs": {"value": 1}}}
    for i, b in enumerate((0.0, -0.0, 1, 1.0)):
        nodes[f"m{i}"] = {"type": "Math", "inputs": {"a": ["0", 0], "b": b, "op": "multiply"}}
        nodes[f"s{i}"] = {"type": "Show", "inputs": {"value": [f"m{i}", 0]}}
    events = Recorder()
    result = executor.run(workflow(nodes), events)
    assert result.status == "ok", result.errors
    assert {"m0", "m1", "m2", "m3"} <= set(events.ran())  # none found cached under another's key
    assert [result.nodes[f"s{i}"].outputs["value"] for i in range(4)] == [0.0, 0.0, 1.0, 1.0]
    assert str(result.nodes["m1"].outputs["result"]) == "-0.0"  # 1 × -0.0: b was kept as written


def test_run_json_text_is_the_run_one_line_per_node(executor: Executor) -> None:
    import json

    from nodegraph.cli_output import run_json

    run = executor.run(long_chain(20)).to_json()
    text = run_json(run)
    assert json.loads(text) == run
    lines = text.splitlines()
    assert sum(1 for line in lines if line.lstrip().startswith('"') and '"status"' in line and '"type"' in line) == 21
    assert json.loads(run_json({"status": "invalid", "nodes": {}, "files": [], "errors": []}))["nodes"] == {}
