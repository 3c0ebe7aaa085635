"""The `nodegraph` command line: run | validate | nodes | models | serve.

    nodegraph run workflows/math.json --set 1.value=10
    nodegraph run workflows/lora.json --sweep 2.strength=0,0.5,1 --sweep 3.seed=1,2
    nodegraph validate workflows/math.json --json
    nodegraph nodes --json
    nodegraph models demo                 # also writes input/demo.png
    nodegraph models status
    nodegraph serve --port 8188
    nodegraph serve --ray --workers 2     # jobs on Ray worker actors (pip install -e '.[ray]')
    nodegraph serve --front-end comfyui   # ComfyUI's frontend at / (pip install -e '.[comfyui]')

Exit codes: 0 success, 1 invalid workflow (or bad arguments, or a --device that is not there), 2 execution
error, 130 interrupted, 141 when the reader of the output went away (`nodegraph run … --json | head`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nodegraph import workflow as wf
from nodegraph.cli_models import cmd_models_demo, cmd_models_status, model_manager, model_options
from nodegraph.cli_output import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_INVALID,
    EXIT_OK,
    EXIT_PIPE,
    ProgressPrinter,
    print_job,
    print_problems,
    print_summary,
    run_json,
)
from nodegraph.context import CancelToken
from nodegraph.executor import Executor, RunResult
from nodegraph.models import OptionError
from nodegraph.registry import DeclarationError, Registry, load_registry
from nodegraph.scale.options import RayOptionError, add_ray_options
from nodegraph.settings import ConfigError, Settings
from nodegraph.sweep import Axis, Job, SweepResult, run_sweep
from nodegraph.validate import Problem, validate


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_args(args.models_dir, getattr(args, "output_dir", None), args.nodes_dir,
                                      args.input_dir, args.extra_model_paths)
        registry = load_registry(settings.nodes_dirs)
        if hasattr(args, "device"):
            manager = model_manager(args)  # a bad --device or budget is reported now, before anything starts
            if args.func in (cmd_run, cmd_serve):
                manager.check_device()
    except (DeclarationError, ConfigError, OptionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    try:
        command: int = args.func(args, registry, settings)
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly. Point stdout at /dev/null so the interpreter's
        # final flush does not raise again on the way out.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_PIPE
    return command


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nodegraph", description="A node-graph runtime for diffusion models.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--nodes-dir", action="append", default=[], metavar="DIR",
                        help="an extra folder of node packs (repeatable)")
    common.add_argument("--models-dir", action="append", default=[], metavar="DIR",
                        help="a models folder with checkpoints/ and loras/ (repeatable; "
                             "default $NODEGRAPH_MODELS or ./models)")
    common.add_argument("--extra-model-paths", action="append", default=[], metavar="FILE",
                        help="ComfyUI's extra_model_paths.yaml (repeatable; ./extra_model_paths.yaml is read too)")
    common.add_argument("--input-dir", metavar="DIR",
                        help="the folder LoadImage reads and uploads go to (default ./input)")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    run = sub.add_parser("run", parents=[common, model_options()], help="run a workflow headless")
    run.add_argument("file")
    run.add_argument("--set", action="append", default=[], metavar="NODE_ID.INPUT=VALUE",
                     help="override a literal input; VALUE is JSON, or else a plain string (repeatable)")
    run.add_argument("--sweep", action="append", default=[], metavar="NODE_ID.INPUT=A,B,C",
                     help="run once per value and grid the images; a second --sweep makes rows (X × Y)")
    run.add_argument("--output-dir", metavar="DIR", help="where images are written (default ./outputs)")
    run.add_argument("--json", action="store_true", help="print the result as JSON")
    run.add_argument("--debug", action="store_true", help="print the traceback of an unexpected node error")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("validate", parents=[common, model_options()],
                           help="check a workflow without running it (sizes against --device's memory too)")
    check.add_argument("file")
    check.add_argument("--json", action="store_true", help="print {ok, errors} as JSON")
    check.set_defaults(func=cmd_validate)

    models = sub.add_parser("models", parents=[common], help="manage the models folder")
    models_sub = models.add_subparsers(required=True, metavar="ACTION")
    demo = models_sub.add_parser("demo", parents=[common], help="write the bundled small demo models")
    demo.add_argument("--dir", metavar="DIR", help="the models folder (default: the first --models-dir, "
                                                   "$NODEGRAPH_MODELS or ./models)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_models_demo)

    status = models_sub.add_parser("status", parents=[common, model_options()],
                                   help="what is resident where: asks a running server, else shows this machine")
    status.add_argument("--url", default=os.environ.get("NODEGRAPH_URL", "http://127.0.0.1:8188"),
                        help="the server to ask (default $NODEGRAPH_URL or http://127.0.0.1:8188)")
    status.add_argument("--token", default=os.environ.get("NODEGRAPH_TOKEN"), help="its --token, if it has one")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.set_defaults(func=cmd_models_status)

    nodes = sub.add_parser("nodes", parents=[common], help="list the available node types")
    nodes.add_argument("--json", action="store_true", help="print the schema the editor reads")
    nodes.set_defaults(func=cmd_nodes)

    serve = sub.add_parser("serve", parents=[common, model_options()], help="serve the editor and the HTTP API")
    serve.add_argument("--host", default="127.0.0.1", help="the address to bind (default 127.0.0.1; any "
                                                           "other than loopback needs --token)")
    serve.add_argument("--port", type=int, default=8188, help="the port (default 8188; 0 picks a free one)")
    serve.add_argument("--output-dir", metavar="DIR", help="where images are written (default ./outputs)")
    serve.add_argument("--data-dir", default="data", metavar="DIR",
                       help="where the queue and history are kept, in SQLite (default ./data)")
    serve.add_argument("--workflows-dir", default="workflows", metavar="DIR",
                       help="the folder the editor saves and opens workflows in (default ./workflows)")
    serve.add_argument("--token", default=os.environ.get("NODEGRAPH_TOKEN") or None, metavar="TOKEN",
                       help="require this token on every request (default $NODEGRAPH_TOKEN)")
    serve.add_argument("--front-end", choices=("nodegraph", "comfyui"), default="nodegraph",
                       help="the editor at / (default nodegraph's own; comfyui: ComfyUI's frontend, from "
                            "pip install -e '.[comfyui]', with ComfyUI's shapes where the two APIs share a path)")
    serve.add_argument("--no-warm-up", action="store_true",
                       help="do not import the node packs' libraries in the background once listening")
    add_ray_options(serve)
    serve.set_defaults(func=cmd_serve)
    return parser


def load_workflow(path: str, overrides: Sequence[str] = (),
                  registry: Registry | None = None) -> tuple[Any, list[Problem]]:
    """Read a workflow file and apply `--set` overrides; problems instead of exceptions."""
    try:
        workflow = wf.load(path, registry)
    except wf.WorkflowError as exc:
        return None, [Problem(exc.node_id, exc.input, exc.code, str(exc))]
    problems = []
    for item in overrides:
        target, eq, text = item.partition("=")
        node_id, dot, input_name = target.rpartition(".")
        nodes = workflow.get("nodes") if isinstance(workflow, dict) else None
        if not (eq and dot and node_id and input_name):
            problems.append(Problem(None, None, "bad_override", f"--set {item!r}: expected NODE_ID.INPUT=VALUE"))
        elif not isinstance(nodes, dict) or not isinstance(nodes.get(node_id), dict):
            problems.append(Problem(node_id, input_name, "missing_node", f"--set: there is no node {node_id!r}"))
        else:
            inputs = nodes[node_id].setdefault("inputs", {})
            if isinstance(inputs, dict):
                inputs[input_name] = parse_value(text)
    return workflow, problems


def parse_value(text: str) -> Any:
    """`--set` values: JSON when they parse (5, 0.5, true, "text"), else the plain string."""
    try:
        return wf.parse(text)
    except wf.WorkflowError:
        return text


def cmd_validate(args: argparse.Namespace, registry: Registry, settings: Settings) -> int:
    workflow, problems = load_workflow(args.file, (), registry)
    if not problems:
        _, problems = validate(workflow, registry, settings, model_manager(args))
    if args.json:
        print(json.dumps({"ok": not problems, "errors": [p.to_json() for p in problems]}, indent=2))
    else:
        print_problems(problems, sys.stdout)
        if not problems:
            print(f"{args.file}: valid")
    return EXIT_INVALID if problems else EXIT_OK


def cmd_run(args: argparse.Namespace, registry: Registry, settings: Settings) -> int:
    workflow, problems = load_workflow(args.file, args.set, registry)
    if args.sweep:
        return cmd_sweep(args, registry, settings, workflow, problems)
    if problems:
        result = RunResult("", "invalid", errors=problems)
    else:
        cancel = CancelToken()
        progress = ProgressPrinter(sys.stderr, as_json=args.json)
        try:
            with ctrl_c_cancels(cancel):
                result = Executor(registry, settings, models=model_manager(args)).run(workflow, progress, cancel)
        except KeyboardInterrupt:
            result = RunResult("", "interrupted")
        finally:
            progress.clear()
    if args.json:
        print(run_json(result.to_json()))
    else:
        print_summary(result)
        if args.debug and result.traceback:
            print(result.traceback, file=sys.stderr)
    return _exit_code(result.status)


def cmd_sweep(args: argparse.Namespace, registry: Registry, settings: Settings, workflow: Any,
              problems: list[Problem]) -> int:
    """`run --sweep`: one job per value (per combination, with two axes), then the grid image."""
    axes = []
    for text in args.sweep:
        axis = parse_sweep(text)
        if isinstance(axis, Problem):
            problems.append(axis)
        else:
            axes.append(axis)
    if problems:
        result = SweepResult("invalid", axes, errors=problems)
    else:
        cancel = CancelToken()
        progress = ProgressPrinter(sys.stderr, as_json=args.json)
        total = math.prod(len(axis.values) for axis in axes)
        done: list[Job] = []

        def show(job: Job) -> None:
            done.append(job)
            if not args.json:
                progress.clear()
                print_job(job, len(done), total, args.debug)

        try:
            with ctrl_c_cancels(cancel):
                executor = Executor(registry, settings, models=model_manager(args))
                result = run_sweep(executor, workflow, axes, progress, cancel, show)
        except KeyboardInterrupt:  # between jobs (the executor reports one inside a job itself)
            result = SweepResult("interrupted", axes, jobs=done)
        finally:
            progress.clear()
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print_problems(result.errors, sys.stderr)
        if result.grid is not None:
            print(f"wrote {result.grid}")
        if result.status == "interrupted":
            print("interrupted", file=sys.stderr)
    return _exit_code(result.status)


def parse_sweep(text: str) -> Axis | Problem:
    """`--sweep NODE_ID.INPUT=A,B,C`: values split on commas, each parsed like a `--set` value.

    A comma inside a value is written `\\,` (`--sweep "3.prompt=a cat\\, 4k,a dog"`).
    """
    target, eq, values = text.partition("=")
    node_id, dot, input_name = target.rpartition(".")
    if not (eq and dot and node_id and input_name):
        return Problem(None, None, "bad_sweep", f"--sweep {text!r}: expected NODE_ID.INPUT=A,B,C")
    parts = re.split(r"(?<!\\),", values) if values else []
    return Axis(node_id, input_name, tuple(parse_value(part.replace("\\,", ",")) for part in parts))


@contextmanager
def ctrl_c_cancels(cancel: CancelToken) -> Iterator[None]:
    """While inside: the first Ctrl-C cancels the job cleanly, a second one stops at once."""

    def interrupt(signum: int, frame: Any) -> None:
        if cancel.cancelled:
            raise KeyboardInterrupt
        cancel.cancel()
        print("\ninterrupting… (Ctrl-C again to stop at once)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _exit_code(status: str) -> int:
    return {"ok": EXIT_OK, "invalid": EXIT_INVALID, "error": EXIT_FAILED}.get(status, EXIT_INTERRUPTED)


def cmd_nodes(args: argparse.Namespace, registry: Registry, settings: Settings) -> int:
    catalog = registry.catalog(settings)
    if args.json:
        print(json.dumps(catalog, indent=2))
        return EXIT_OK
    by_category: dict[str, list[dict[str, Any]]] = {}
    for node in catalog["nodes"].values():
        by_category.setdefault(node["category"], []).append(node)
    for category, nodes in sorted(by_category.items()):
        print(f"{category}:")
        for node in nodes:
            ins = ", ".join(f"{i['name']}:{i['type']}" + ("" if i["required"] else "?") for i in node["inputs"])
            outs = ", ".join(f"{o['name']}:{o['type']}" for o in node["outputs"]) or "(output node)"
            print(f"  {node['type']} {node['version']}  ({ins}) -> {outs}")
            if node["description"]:
                print(f"      {node['description']}")
    return EXIT_OK


def cmd_serve(args: argparse.Namespace, registry: Registry, settings: Settings) -> int:
    """`serve`: imported here, so the other commands never load aiohttp."""
    from nodegraph.server.app import serve
    from nodegraph.server.security import is_loopback
    from nodegraph.server.state import ServerConfig
    from nodegraph.store import StoreBusy

    if not is_loopback(args.host) and not args.token:
        print(f"error: refusing to serve on {args.host} without --token: anyone who can reach it could run "
              "workflows and read outputs (bind 127.0.0.1, or set --token / $NODEGRAPH_TOKEN)", file=sys.stderr)
        return EXIT_INVALID
    if not 0 <= args.port <= 65535:
        print(f"error: --port {args.port} is not a port number", file=sys.stderr)
        return EXIT_INVALID
    front_end_dir = None
    if args.front_end == "comfyui":
        from nodegraph.server.comfy.front import FrontEndMissing, static_dir

        try:
            front_end_dir = static_dir()
        except FrontEndMissing as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_INVALID
    config = ServerConfig(data_dir=Path(args.data_dir), workflows_dir=Path(args.workflows_dir), token=args.token,
                          front_end=args.front_end, front_end_dir=front_end_dir)
    executor = Executor(registry, settings, models=model_manager(args))
    try:
        runner = None
        if args.ray is not None:
            from nodegraph.scale.options import ray_runner

            runner = ray_runner(args, registry, settings)
        # Jobs run in this process unless on Ray: then the libraries the first job needs are loaded meanwhile.
        warm_up = None if args.no_warm_up or runner is not None else registry.warm_up
        return serve(executor, config, args.host, args.port, runner, warm_up)
    except (StoreBusy, OSError, RayOptionError) as exc:  # the data folder in use, the port taken, an unknown host
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID


if __name__ == "__main__":
    sys.exit(main())
