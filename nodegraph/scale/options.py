"""`nodegraph serve --ray`: the command-line options, and the pool they build (Ray imported only then).

    nodegraph serve --ray --workers 2                  # a local Ray runtime, two CPU (or GPU) workers
    nodegraph serve --ray auto                         # join this machine's cluster: a worker per GPU
    nodegraph serve --ray ray://head:10001 --workers 8 --job-timeout 600
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any

from nodegraph.registry import Registry
from nodegraph.server.worker import Publish
from nodegraph.settings import Settings
from nodegraph.store import Store
from nodegraph.threads import parse_threads

DEFAULT_JOB_TIMEOUT = 1800.0


class RayOptionError(ValueError):
    """Ray is missing, or the options cannot be met (reported before serving)."""


def add_ray_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("scale-out on Ray (pip install -e '.[ray]')")
    group.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                       help="run jobs on Ray worker actors: alone, a local Ray runtime; `auto` or "
                            "ray://host:port joins a cluster")
    group.add_argument("--workers", type=int, metavar="N",
                       help="worker actors (default: one per GPU of the cluster, else 1)")
    group.add_argument("--worker-cpus", type=float, default=1.0, metavar="N",
                       help="CPUs per worker on a cluster without GPUs (default 1)")
    group.add_argument("--job-timeout", type=float, default=DEFAULT_JOB_TIMEOUT, metavar="SECONDS",
                       help=f"a job running longer gets its worker killed and restarted (default "
                            f"{DEFAULT_JOB_TIMEOUT:g}; 0: no limit)")


def ray_runner(args: argparse.Namespace, registry: Registry, settings: Settings) -> Any:
    """Start or join Ray and spawn the workers; the factory `create_app` calls with the store."""
    if args.workers is not None and args.workers < 1:
        raise RayOptionError(f"--workers {args.workers}: at least one worker")
    if args.worker_cpus <= 0 or args.job_timeout < 0:
        raise RayOptionError("--worker-cpus must be above 0 and --job-timeout 0 or more")
    try:
        import ray

        from nodegraph.scale import cluster
        from nodegraph.scale.pool import RayPool
    except ImportError as exc:
        raise RayOptionError(f"--ray needs Ray, which is not installed ({exc}): pip install -e '.[ray]'") from None
    local = args.ray == "local"
    wanted = args.workers or 1
    cluster.connect(None if local else args.ray,
                    num_cpus=max(os.cpu_count() or 1, math.ceil(wanted * args.worker_cpus)) if local else None)
    gpus = int(ray.cluster_resources().get("GPU", 0))  # type: ignore[no-untyped-call]
    workers = args.workers or max(gpus, 1)
    if local and 0 < gpus < workers:
        raise RayOptionError(f"--workers {workers}: this machine has {gpus} GPU(s), one per worker")
    models = {"device": args.device, "vram_budget": args.vram_budget, "ram_budget": args.ram_budget,
              "text_encoder_device": args.text_encoder_device, "threads": parse_threads(args.threads)}
    try:
        actors = cluster.spawn(workers, settings, list(settings.nodes_dirs), models, args.worker_cpus)
    except ray.exceptions.GetTimeoutError:
        raise RayOptionError(f"the cluster did not place {workers} worker(s) in time: too few GPUs or CPUs "
                             f"({ray.cluster_resources()})") from None  # type: ignore[no-untyped-call]
    timeout = args.job_timeout or None

    def runner(store: Store, publish: Publish) -> RayPool:
        return RayPool(store, publish, actors, registry, job_timeout=timeout, owns_actors=True)

    return runner
