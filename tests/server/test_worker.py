"""The worker thread on its own: re-validation at run time, resilience, output names."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodegraph.executor import Executor, RunResult
from nodegraph.registry import Registry
from nodegraph.server.worker import Worker, output_name
from nodegraph.settings import Settings
from nodegraph.store import Store
from tests.server.conftest import WAIT, show, wf


class Finished:
    """A publish sink that signals each job_finished."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.done: dict[str, threading.Event] = {}

    def __call__(self, client_id: str | None, message: dict[str, Any]) -> None:
        self.messages.append(message)
        if message["type"] == "job_finished":
            self.done.setdefault(message["job_id"], threading.Event()).set()

    def wait(self, job_id: str) -> dict[str, Any]:
        assert self.done.setdefault(job_id, threading.Event()).wait(WAIT)
        return next(m for m in self.messages if m["type"] == "job_finished" and m["job_id"] == job_id)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store(tmp_path / "data")
    yield store
    store.close()


def test_a_job_is_validated_again_when_it_runs(store: Store, registry: Registry, settings: Settings) -> None:
    published = Finished()
    worker = Worker(store, Executor(registry, settings), published)
    job = store.add(wf({"1": {"type": "Nope"}}))  # as if a model file vanished after it was queued
    worker.start()
    try:
        message = published.wait(job.id)
    finally:
        worker.stop()
    assert message["status"] == "error" and [e["code"] for e in message["errors"]] == ["unknown_node_type"]
    assert store.get(job.id).status == "error"  # type: ignore[union-attr]


class Broken(Executor):
    calls = 0

    def run(self, *args: Any, **kwargs: Any) -> RunResult:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("a bug")
        return super().run(*args, **kwargs)


def test_an_unexpected_exception_fails_the_job_not_the_worker(store: Store, registry: Registry,
                                                              settings: Settings) -> None:
    published = Finished()
    worker = Worker(store, Broken(registry, settings), published)
    first, second = store.add(show(1)), store.add(show(2))
    worker.start()
    try:
        failed, ok = published.wait(first.id), published.wait(second.id)
    finally:
        worker.stop()
    assert failed["status"] == "error" and failed["errors"][0]["code"] == "internal_error"
    assert ok["status"] == "ok"


def test_output_names_are_relative_to_the_output_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out" / ".temp").mkdir(parents=True)
    assert output_name("out/a_00001_.png", Path("out")) == "a_00001_.png"
    assert output_name(str(tmp_path / "out" / ".temp" / "p.png"), Path("out")) == ".temp/p.png"
    assert output_name(os.path.join("out", "sub", "x.png"), tmp_path / "out") == "sub/x.png"
    assert output_name("elsewhere/x.png", Path("out")) == "elsewhere/x.png"  # left as recorded


def test_the_warm_up_runs_on_the_worker_thread_at_the_first_wake_before_any_job(
        store: Store, registry: Registry, settings: Settings) -> None:
    """A job queued while the packs warm up waits for it: never two threads importing the same libraries."""
    log: list[tuple[str, str]] = []
    release = threading.Event()

    def warm_up() -> None:
        log.append(("warm-up", threading.current_thread().name))
        assert release.wait(WAIT)
        log.append(("warmed", threading.current_thread().name))

    class Recording(Executor):
        def run(self, *args: Any, **kwargs: Any) -> RunResult:
            log.append(("job", threading.current_thread().name))
            return super().run(*args, **kwargs)

    published = Finished()
    worker = Worker(store, Recording(registry, settings), published, warm_up)
    job = store.add(show(1))  # pending from before the start, as after a restart
    worker.start()
    try:
        assert not published.done.get(job.id) and log == []  # nothing until the first wake (the server listening)
        worker.wake()
        while not log:
            threading.Event().wait(0.01)
        release.set()
        assert published.wait(job.id)["status"] == "ok"
    finally:
        release.set()
        worker.stop()
    assert log == [("warm-up", "nodegraph-worker"), ("warmed", "nodegraph-worker"), ("job", "nodegraph-worker")]
