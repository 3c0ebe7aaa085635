"""Validation's graph walk: the dependency order and the cycles it reports are networkx's on the same graph."""

from __future__ import annotations

from typing import Any

import networkx as nx
from hypothesis import given, settings
from hypothesis import strategies as st

from nodegraph.registry import Registry
from nodegraph.validate import validate
from tests.conftest import workflow

# Each Math node links `a` and `b` to any node (itself included), or writes a literal.
links = st.lists(st.tuples(st.one_of(st.none(), st.integers(0, 11)), st.one_of(st.none(), st.integers(0, 11))),
                 min_size=1, max_size=12)


def math_graph(spec: list[tuple[int | None, int | None]]) -> dict[str, Any]:
    n = len(spec)
    nodes: dict[str, Any] = {}
    for i, (a, b) in enumerate(spec):
        nodes[f"n{i}"] = {"type": "Math", "inputs": {
            "a": 1 if a is None else [f"n{a % n}", "result"], "b": 2 if b is None else [f"n{b % n}", 0]}}
    nodes["show"] = {"type": "Show", "inputs": {"value": [f"n{n - 1}", "result"]}}
    return workflow(nodes)


def reference(wf: dict[str, Any]) -> nx.DiGraph:
    dag = nx.DiGraph()
    dag.add_nodes_from(wf["nodes"])
    dag.add_edges_from((value[0], node_id) for node_id, entry in wf["nodes"].items()
                       for value in entry["inputs"].values() if isinstance(value, list))
    return dag


@settings(max_examples=300, deadline=None)
@given(links)
def test_order_and_cycles_are_networkx_ones(registry: Registry, spec: list[tuple[int | None, int | None]]) -> None:
    wf = math_graph(spec)
    dag = reference(wf)
    graph, problems = validate(wf, registry)
    cycles = sorted(sorted(c) for c in nx.strongly_connected_components(dag)
                    if len(c) > 1 or dag.has_edge(next(iter(c)), next(iter(c))))
    assert [(p.node_id, p.code, p.message) for p in problems] == [
        (c[0], "cycle", "these nodes form a cycle: " + " → ".join(c)) for c in cycles]
    if graph is not None:
        assert graph.order == list(nx.topological_sort(dag))
        assert list(graph.dag.nodes) == list(dag.nodes) and list(graph.dag.edges) == list(dag.edges)


def test_order_follows_generations_in_written_order(registry: Registry) -> None:
    wf = workflow({"s": {"type": "Show", "inputs": {"value": ["m2", "result"]}},
                   "m2": {"type": "Math", "inputs": {"a": ["i", "value"], "b": ["m1", "result"]}},
                   "m1": {"type": "Math", "inputs": {"a": ["i", "value"], "b": ["i", "value"]}},
                   "i": {"type": "Int", "inputs": {"value": 1}}})
    graph, problems = validate(wf, registry)
    assert problems == [] and graph is not None
    assert graph.order == ["i", "m1", "m2", "s"]
