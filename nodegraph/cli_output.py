"""What the command line prints (the progress bar, a run's summary, tables, sweep jobs, problems) and its exit codes."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import TextIO

from nodegraph import events as ev
from nodegraph.executor import RunResult, json_summary
from nodegraph.sweep import Job
from nodegraph.validate import Problem

# The command's exit codes (see nodegraph/cli.py's docstring).
EXIT_OK, EXIT_INVALID, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_PIPE = 0, 1, 2, 130, 141


class ProgressPrinter:
    """Turns events into what `run` prints on stderr while it works.

    On a terminal: a one-line progress bar, and a line for each node's news (a model loading, a compile).
    Into a pipe or file: the news lines only. With `--json`: the news and the progress events as JSON
    objects, one per line (`{"type": "node_info", "kind": "compiling", …}`), so a script sees a long compile
    or load as it happens; stdout keeps the result. (Not every event: a 10,000-node graph would pay for it.)
    """

    def __init__(self, stream: TextIO, as_json: bool = False, width: int = 30) -> None:
        self.stream, self.as_json, self.width = stream, as_json, width
        self.bar = not as_json and stream.isatty()
        self.shown = False

    def __call__(self, event: ev.Event) -> None:
        if self.as_json:
            if isinstance(event, ev.NodeInfo | ev.Progress):
                self.stream.write(json.dumps(event.to_json()) + "\n")
                self.stream.flush()
        elif isinstance(event, ev.Progress) and event.total > 0 and self.bar:
            filled = self.width * event.step // event.total
            bar = "█" * filled + "·" * (self.width - filled)
            self.stream.write(f"\rnode {event.node_id} {bar} {event.step}/{event.total}")
            self.stream.flush()
            self.shown = True
        elif isinstance(event, ev.NodeInfo):
            self.clear()
            took = f" ({event.seconds:.1f} s)" if event.seconds is not None else ""
            self.stream.write(f"node {event.node_id}: {event.message}{took}\n")
            self.stream.flush()

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r" + " " * (self.width + 40) + "\r")
            self.shown = False


def print_summary(result: RunResult) -> None:
    rows = [(node_id, r.node_type, r.status, f"{r.seconds:.3f}") for node_id, r in result.nodes.items()]
    print_table(("node", "type", "status", "seconds"), rows)
    for node_id in result.output_nodes:
        record = result.nodes.get(node_id)
        if record is None:
            continue
        for name, value in record.outputs.items():
            shown = json_summary(value)
            if not isinstance(shown, dict):  # values, not summaries of images or models
                print(f"node {node_id} ({record.node_type}) {name}: {json.dumps(shown)}")
    for path in result.files:
        print(f"wrote {path}")
    print_problems(result.errors, sys.stderr)
    if result.status == "interrupted":
        print("interrupted", file=sys.stderr)


def print_table(headers: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> None:
    if not rows:
        return
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def print_job(job: Job, index: int, total: int, debug: bool) -> None:
    values = ", ".join(f"{name}={value if isinstance(value, str) else json.dumps(value)}"
                       for name, value in job.values.items())
    values = values if len(values) <= 100 else values[:97] + "..."
    counts = job.counts()
    print(f"[{index}/{total}] {values}: {job.status}, {job.seconds:.2f} s "
          f"({counts['ran']} ran, {counts['cached']} cached)", flush=True)
    if job.result is not None:
        print_problems(job.result.errors, sys.stderr)
        if debug and job.result.traceback:
            print(job.result.traceback, file=sys.stderr)


def print_problems(problems: Sequence[Problem], stream: TextIO) -> None:
    for problem in problems:
        print(f"error: {problem}", file=stream)
