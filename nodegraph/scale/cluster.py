"""Start or join a Ray cluster and place the worker actors on it (`nodegraph serve --ray`).

    connect(None)                 # a local Ray runtime in this process (CPU workers on this machine)
    connect("auto")               # join the cluster this machine is part of (`ray start --head` ran)
    connect("ray://host:10001")   # join a remote cluster through Ray Client
    actors = spawn(2, settings, nodes_dirs, {"device": "auto"}, worker_cpus=1)

On a cluster with GPUs each actor takes one (`num_gpus=1`; Ray sets CUDA_VISIBLE_DEVICES so its
`cuda:0` is its own); else each takes `worker_cpus` CPUs. Ray restarts an actor whose process died
(`max_restarts`); the pool re-queues the job it was running, so no task is retried by Ray itself.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import ray

from nodegraph.scale.actor import WorkerActor
from nodegraph.settings import Settings

MAX_RESTARTS = 1000
CONCURRENCY = 4  # run, and cancel / free / status while it runs
LOCAL_OBJECT_STORE = 200 * 1024 * 1024  # events and records are small; nothing big travels through Ray


def connect(address: str | None, num_cpus: int | None = None) -> None:
    """Join `address`, or start a local runtime (None) with `num_cpus` logical CPUs."""
    if ray.is_initialized():
        return
    if address is None:
        ray.init(num_cpus=num_cpus, object_store_memory=LOCAL_OBJECT_STORE, include_dashboard=False,
                 log_to_driver=True)
    else:
        ray.init(address=address, log_to_driver=True)


def spawn(workers: int, settings: Settings, nodes_dirs: list[Path], models: dict[str, Any],
          worker_cpus: float = 1.0, timeout: float = 300.0) -> list[Any]:
    """`workers` actors, each constructed (its node packs imported) before this returns."""
    # Absolute paths: a worker's working folder is Ray's, not this process's.
    settings = replace(settings, models_dirs=tuple(p.absolute() for p in settings.models_dirs),
                       output_dir=settings.output_dir.absolute(), input_dir=settings.input_dir.absolute())
    nodes_dirs = [p.absolute() for p in nodes_dirs]
    gpus = ray.cluster_resources().get("GPU", 0) >= 1  # type: ignore[no-untyped-call]
    placement: dict[str, Any] = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": worker_cpus}
    remote = ray.remote(WorkerActor).options(max_restarts=MAX_RESTARTS, max_task_retries=0,
                                             max_concurrency=CONCURRENCY, **placement)
    actors: list[Any] = [remote.remote(settings, nodes_dirs, models) for _ in range(workers)]
    ray.get([actor.ready.remote() for actor in actors], timeout=timeout)
    return actors
