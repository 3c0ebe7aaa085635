"""Executor overhead per node, on generated graphs of utility nodes.

    python bench/executor.py          # a table
    python bench/executor.py --json   # the same figures as JSON

Two shapes, each at 1,000 and 10,000 nodes:
  chain  Int → Math → Math → … → Show, each Math taking the previous node's result
         (10,000 nodes deep: nothing in the core may recurse per node).
  wide   independent branches of 10 nodes, Int → 8 × Math → Show, one Show per branch;
         every branch starts from a different Int, so no two nodes share a cache key.

Phases, each the best of 3 to 15 runs (`time.perf_counter`, garbage collected before each):
  validate  `nodegraph.validate.validate` alone.
  cold      a fresh `Executor` with an empty cache executing a freshly validated graph (`execute()`: its
            per-graph work, the steps' key parts and the plan, included, as every job pays it).
  cached    `execute()` again on the same executor and graph: every node must come back cached.
  requeued  the same on a freshly validated graph of the workflow, as a re-queued job gets one (its keying
            and plan made again).
            (`run()` is validate + execute; the server validates once when a job is queued.)
  end to end  what `nodegraph run --json` does with the file's bytes once started: parse, validate,
            execute on a fresh executor, the run's JSON and its text (`cli_output.run_json`).
  direct    the baseline: the same node `run` methods called in a plain Python loop over a
            precomputed order, inputs looked up in a dict; the least work any executor must do.

Figures are microseconds per node (wall clock; `cold cpu` is the process's CPU time for the cold phase, steadier
on a shared machine); `×` is the ratio to the direct loop measured in the same run.
Targets: ≤ 25 µs/node cold, ≤ 5 µs/node cached, a 10,000-node workflow validated in ≤ 0.1 s
(`bench/jobs_api.py` measures validation through the HTTP API too).
"""

from __future__ import annotations

import gc
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nodegraph.cli_output import run_json
from nodegraph.context import CancelToken
from nodegraph.events import ignore
from nodegraph.executor import Executor, RunResult
from nodegraph.registry import Registry
from nodegraph.validate import Graph, validate
from nodegraph.workflow import loads
from nodes.utility import NODES

COLD_US_PER_NODE = 25.0
CACHED_US_PER_NODE = 5.0
VALIDATE_10K_SECONDS = 0.1
BRANCH_LENGTH = 10  # nodes per branch of the wide graph: Int, 8 × Math, Show
SIZES = (1_000, 10_000)
MIN_REPEATS, MAX_REPEATS, PHASE_BUDGET_S = 3, 15, 2.0

Workflow = dict[str, Any]


def chain(n: int) -> Workflow:
    """Int → (n - 2) × Math → Show, each node linked to the one before it."""
    nodes: dict[str, Any] = {"1": {"type": "Int", "inputs": {"value": 1}}}
    for i in range(2, n):
        source = [str(i - 1), "value" if i == 2 else "result"]
        nodes[str(i)] = {"type": "Math", "inputs": {"a": source, "b": 0.5, "op": "add"}}
    nodes[str(n)] = {"type": "Show", "inputs": {"value": [str(n - 1), "result"]}}
    return {"format": "nodegraph/1", "nodes": nodes, "ui": {}}


def wide(n: int) -> Workflow:
    """n / BRANCH_LENGTH independent branches Int → Math × (BRANCH_LENGTH - 2) → Show."""
    nodes: dict[str, Any] = {}
    next_id = 1
    for branch in range(n // BRANCH_LENGTH):
        first = str(next_id)
        nodes[first] = {"type": "Int", "inputs": {"value": branch}}
        source = [first, "value"]
        for depth in range(BRANCH_LENGTH - 2):
            next_id += 1
            op = "multiply" if depth % 2 else "add"  # stays finite: x ↦ (x + 0.5) · 1.0001, 4 times
            b = 1.0001 if op == "multiply" else 0.5
            nodes[str(next_id)] = {"type": "Math", "inputs": {"a": source, "b": b, "op": op}}
            source = [str(next_id), "result"]
        next_id += 1
        nodes[str(next_id)] = {"type": "Show", "inputs": {"value": source}}
        next_id += 1
    return {"format": "nodegraph/1", "nodes": nodes, "ui": {}}


def direct_program(graph: Graph, order: list[str]) -> Callable[[], dict[str, dict[str, Any]]]:
    """The baseline: each node's `run` called directly, inputs resolved from a dict of outputs."""
    instances = {cls: cls() for cls in {step.cls for step in graph.steps.values()}}
    program = [(node_id, instances[graph.steps[node_id].cls].run, graph.steps[node_id].literals,
                tuple((name, src, out) for name, (src, out) in graph.steps[node_id].links.items()))
               for node_id in order]

    def run() -> dict[str, dict[str, Any]]:
        values: dict[str, dict[str, Any]] = {}
        for node_id, node_run, literals, links in program:
            inputs = dict(literals)
            for name, source, output in links:
                inputs[name] = values[source][output]
            values[node_id] = node_run(None, **inputs)  # type: ignore[arg-type]  # utility nodes ignore ctx
        return values

    return run


def best_of(setup: Callable[[], Any], measured: Callable[[Any], Any],
            clock: Callable[[], float] = time.perf_counter) -> tuple[float, Any]:
    """Lowest time of `measured(setup())` on `clock` (wall by default), and the last result.

    At least MIN_REPEATS runs, then more while the phase has spent under PHASE_BUDGET_S, up to
    MAX_REPEATS: cheap phases get more tries, which steadies them on a busy machine.
    """
    best, result, spent, runs = float("inf"), None, 0.0, 0
    while runs < MIN_REPEATS or (runs < MAX_REPEATS and spent < PHASE_BUDGET_S):
        prepared = setup()
        gc.collect()
        t0 = clock()
        result = measured(prepared)
        elapsed = clock() - t0
        best, spent, runs = min(best, elapsed), spent + elapsed, runs + 1
    return best, result


def statuses(result: RunResult) -> set[str]:
    return {record.status for record in result.nodes.values()}


def require(condition: bool, message: str) -> None:
    """An assertion that `python -O` keeps: a benchmark of the wrong thing must not print figures."""
    if not condition:
        raise AssertionError(message)


@dataclass
class Row:
    shape: str
    nodes: int
    validate_s: float
    cold_s: float
    cold_cpu_s: float
    cached_s: float
    requeued_s: float
    end_to_end_s: float
    direct_s: float

    def per_node(self, seconds: float) -> float:
        return seconds / self.nodes * 1e6


def measure(shape: str, workflow: Workflow, registry: Registry) -> Row:
    n = len(workflow["nodes"])
    validate_s, (graph, problems) = best_of(lambda: None, lambda _: validate(workflow, registry))
    require(graph is not None and not problems and len(graph.steps) == n, f"{shape} {n}: invalid: {problems}")
    assert graph is not None  # for the type checker; `require` has checked it

    def fresh() -> Graph:
        """A graph as each job gets one (validated again when it runs): the executor's per-graph keying and plan
        are made in every measured run, as they are in `nodegraph run` and the server's worker."""
        again, _ = validate(workflow, registry)
        assert again is not None
        return again

    def execute(prepared: tuple[Executor, Graph]) -> tuple[Executor, Graph, RunResult]:
        ex, job_graph = prepared
        return ex, job_graph, ex.execute(job_graph, ignore, CancelToken(), "bench")

    cold_s, (executor, ran, result) = best_of(lambda: (Executor(registry), fresh()), execute)
    require(result.status == "ok" and len(result.nodes) == n and statuses(result) == {"ran"},
            f"{shape} {n}: the cold run did not run every node: {result.status}, {statuses(result)}")

    cold_cpu_s, _ = best_of(lambda: (Executor(registry), fresh()), execute, time.process_time)

    cached_s, (_, _, result) = best_of(lambda: (executor, ran), execute)
    require(result.status == "ok" and len(result.nodes) == n and statuses(result) == {"cached"},
            f"{shape} {n}: the re-run was not fully cached: {result.status}, {statuses(result)}")

    requeued_s, (_, _, again) = best_of(lambda: (executor, fresh()), execute)
    require(statuses(again) == {"cached"}, f"{shape} {n}: the re-queued run was not fully cached")

    text = json.dumps(workflow).encode()

    def end_to_end(_: Any) -> str:
        run = Executor(registry).run(loads(text), ignore, CancelToken(), "bench")
        require(run.status == "ok", f"{shape} {n}: end to end: {run.status}")
        return run_json(run.to_json())

    end_to_end_s, _ = best_of(lambda: None, end_to_end)

    direct = direct_program(graph, list(result.nodes))  # the executor's own order: the same work
    direct_s, values = best_of(lambda: None, lambda _: direct())
    for node_id in graph.outputs:  # same answers, so both sides measured the same computation
        require(values[node_id] == result.nodes[node_id].outputs, f"{shape} {n}: node {node_id} differs")

    return Row(shape, n, validate_s, cold_s, cold_cpu_s, cached_s, requeued_s, end_to_end_s, direct_s)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def table(rows: list[Row]) -> list[str]:
    header = ("shape", "nodes", "validate ms", "validate µs/node", "cold µs/node", "cold cpu", "cached µs/node",
              "requeued", "end to end", "direct µs/node", "cold ×", "cached ×")
    lines = [header]
    for r in rows:
        validate_ok = r.nodes < 10_000 or r.validate_s <= VALIDATE_10K_SECONDS
        cold, cached, direct = r.per_node(r.cold_s), r.per_node(r.cached_s), r.per_node(r.direct_s)
        lines.append((
            r.shape, f"{r.nodes:,}",
            f"{r.validate_s * 1e3:.1f}" + ("" if r.nodes < 10_000 else f" {verdict(validate_ok)}"),
            f"{r.per_node(r.validate_s):.1f}",
            f"{cold:.1f} {verdict(cold <= COLD_US_PER_NODE)}",
            f"{r.per_node(r.cold_cpu_s):.1f}",
            f"{cached:.2f} {verdict(cached <= CACHED_US_PER_NODE)}",
            f"{r.per_node(r.requeued_s):.2f}",
            f"{r.per_node(r.end_to_end_s):.1f}",
            f"{direct:.2f}",
            f"{cold / direct:.0f}×",
            f"{cached / direct:.1f}×",
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                      for i, (cell, w) in enumerate(zip(line, widths, strict=True))).rstrip()
            for line in lines]


def as_json(rows: list[Row]) -> dict[str, Any]:
    """The figures (µs per node, ratios to the direct loop) and verdicts, for scripts and CI."""
    out = []
    for r in rows:
        direct = r.per_node(r.direct_s)
        figures = {phase: round(r.per_node(getattr(r, f"{phase}_s")), 3)
                   for phase in ("validate", "cold", "cold_cpu", "cached", "requeued", "end_to_end", "direct")}
        out.append({"shape": r.shape, "nodes": r.nodes, "us_per_node": figures,
                    "ratio_to_direct": {p: round(v / direct, 2) for p, v in figures.items() if p != "direct"},
                    "validate_s": round(r.validate_s, 4)})
    worst = {"cold": max(r.per_node(r.cold_s) for r in rows), "cached": max(r.per_node(r.cached_s) for r in rows),
             "validate_10k_s": max(r.validate_s for r in rows if r.nodes >= 10_000)}
    return {"python": platform.python_version(), "machine": f"{platform.system()} {platform.machine()}",
            "rows": out, "targets": {"cold": COLD_US_PER_NODE, "cached": CACHED_US_PER_NODE,
                                     "validate_10k_s": VALIDATE_10K_SECONDS},
            "pass": {"cold": worst["cold"] <= COLD_US_PER_NODE, "cached": worst["cached"] <= CACHED_US_PER_NODE,
                     "validate_10k": worst["validate_10k_s"] <= VALIDATE_10K_SECONDS}}


def summary(rows: list[Row]) -> str:
    worst_cold = max(r.per_node(r.cold_s) for r in rows)
    worst_cached = max(r.per_node(r.cached_s) for r in rows)
    worst_validate = max(r.validate_s for r in rows if r.nodes >= 10_000)
    return (f"cold ≤ {COLD_US_PER_NODE:g} µs/node: {verdict(worst_cold <= COLD_US_PER_NODE)} "
            f"(worst {worst_cold:.1f}); cached ≤ {CACHED_US_PER_NODE:g} µs/node: "
            f"{verdict(worst_cached <= CACHED_US_PER_NODE)} (worst {worst_cached:.2f}); "
            f"10,000 nodes validated ≤ {VALIDATE_10K_SECONDS:g} s: "
            f"{verdict(worst_validate <= VALIDATE_10K_SECONDS)} (worst {worst_validate:.3f} s)")


def main(argv: list[str] | None = None) -> int:
    registry = Registry(NODES)
    rows = [measure(name, build(n), registry)
            for name, build in (("chain", chain), ("wide", wide)) for n in SIZES]
    if "--json" in (sys.argv[1:] if argv is None else argv):
        print(json.dumps(as_json(rows), indent=2))
        return 0
    print(f"nodegraph executor overhead — Python {platform.python_version()}, "
          f"{platform.system()} {platform.machine()}; best of {MIN_REPEATS} to {MAX_REPEATS} runs per phase")
    print()
    print("\n".join(table(rows)))
    print()
    print(summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
