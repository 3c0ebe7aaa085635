"""A local Ray runtime (2 CPUs, a small object store) and two worker actors, shared by the session.

Starting Ray and the actors (each imports the node packs) takes seconds, so one runtime and one
pair of actors serve every test; each test gets its own app, store and pool over them. The tests
skip, saying why, when Ray is not installed (CI installs it: the `test` extra pulls in `ray`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nodegraph.executor import Executor
from nodegraph.registry import Registry
from nodegraph.server.app import create_app
from nodegraph.server.state import WORKER, ServerConfig
from nodegraph.settings import Settings
from tests.conftest import PACKS
from tests.server.conftest import Client

# Ray is imported by the fixtures that need it: the router's tests run without it, and
# test_pool.py skips (saying why) when it is missing.


@pytest.fixture(scope="session")
def scale_settings(demo_dir: Path, demo_input: Path, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(models_dirs=(demo_dir,), output_dir=tmp_path_factory.mktemp("outputs"), input_dir=demo_input)


@pytest.fixture(scope="session")
def actors(scale_settings: Settings) -> Iterator[list[Any]]:
    import ray

    from nodegraph.scale import cluster

    cluster.connect(None, num_cpus=2)
    yield cluster.spawn(2, scale_settings, [PACKS], {"device": "cpu"})
    ray.shutdown()


def wait_ready(actors: list[Any], limit: float = 120.0) -> list[int]:
    """The actors' process ids, once every one is up (a killed one is restarted by Ray)."""
    import ray

    deadline = time.monotonic() + limit
    while True:
        try:
            return [ray.get(actor.ready.remote(), timeout=10) for actor in actors]
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            assert time.monotonic() < deadline, "a worker did not come back"
            time.sleep(0.2)


MakePool = Callable[..., Any]


@pytest.fixture
def make_pool(aiohttp_client: Any, registry: Registry, scale_settings: Settings, tmp_path: Path,
              actors: list[Any]) -> Iterator[MakePool]:
    """A test client on an app whose jobs run on the two actors; keywords go to `RayPool`."""
    from nodegraph.scale.pool import RayPool

    wait_ready(actors)

    async def make(**options: Any) -> Client:
        config = ServerConfig(data_dir=tmp_path / "data", workflows_dir=tmp_path / "workflows")
        app = create_app(Executor(registry, scale_settings), config,
                         lambda store, publish: RayPool(store, publish, actors, registry, **options))
        client: Client = await aiohttp_client(app)
        assert isinstance(app[WORKER], RayPool)
        return client

    yield make
    wait_ready(actors)  # the next test starts with both workers up


async def system_workers(client: Client) -> list[dict[str, Any]]:
    body: dict[str, Any] = await (await client.get("/api/system")).json()
    workers: list[dict[str, Any]] = body["workers"]
    return workers

