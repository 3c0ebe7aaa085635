"""The SQLite queue and history: order, atomic claims, recovery after a crash, pagination."""

from __future__ import annotations

import errno
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from nodegraph.store import SHUTDOWN_CODE, JobExists, StorageFull, Store, StoreBusy, storage_full

WORKFLOW = {"format": "nodegraph/1", "nodes": {}}


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = Store(tmp_path / "data")
    yield store
    store.close()


def test_jobs_are_claimed_in_the_order_queued_with_positions(store: Store) -> None:
    jobs = [store.add({**WORKFLOW, "n": i}, client_id="c") for i in range(3)]
    assert [j.position for j in jobs] == [0, 1, 2]
    running, pending = store.queue()
    assert running == [] and [j.id for j in pending] == [j.id for j in jobs]
    claimed = store.claim()
    assert claimed is not None and claimed.id == jobs[0].id and claimed.status == "running"
    assert claimed.workflow == {**WORKFLOW, "n": 0} and claimed.started is not None
    assert store.get(jobs[2].id).position == 1  # type: ignore[union-attr]
    assert store.counts() == {"pending": 2, "running": 1}


def test_no_job_is_claimed_twice_by_concurrent_claimers(store: Store) -> None:
    ids = {store.add(WORKFLOW).id for _ in range(60)}
    claimed: list[str] = []
    lock = threading.Lock()

    def claim_all() -> None:
        while (job := store.claim()) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=claim_all) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == sorted(ids)


def test_the_queue_survives_closing_and_reopening(tmp_path: Path) -> None:
    store = Store(tmp_path)
    job = store.add(WORKFLOW)
    store.close()
    reopened = Store(tmp_path)
    assert reopened.get(job.id).status == "pending"  # type: ignore[union-attr]
    reopened.close()


def test_recover_marks_jobs_cut_off_by_a_crash_and_keeps_pending_ones(tmp_path: Path) -> None:
    store = Store(tmp_path)
    first, second = store.add(WORKFLOW), store.add(WORKFLOW)
    store.claim()
    store.close()  # as if the process died: the row still says running
    store = Store(tmp_path)
    assert store.recover() == [first.id]
    cut = store.get(first.id)
    assert cut is not None and cut.status == "error" and cut.finished is not None
    assert [e["code"] for e in cut.to_json()["errors"]] == [SHUTDOWN_CODE]
    assert store.claim().id == second.id  # type: ignore[union-attr]
    store.close()


def test_history_is_newest_finished_first_and_pages_with_a_cursor(store: Store) -> None:
    jobs = [store.add(WORKFLOW) for _ in range(5)]
    assert store.cancel(jobs[3].id)  # finishes before the others run
    for _ in range(4):
        job = store.claim()
        assert job is not None
        store.finish(job.id, "ok", {"nodes": {}, "files": ["a.png"], "errors": []})
    order = [jobs[4].id, jobs[2].id, jobs[1].id, jobs[0].id, jobs[3].id]
    page, cursor = store.history(limit=2)
    assert [j.id for j in page] == order[:2] and cursor is not None
    page2, cursor2 = store.history(limit=2, before=cursor)
    page3, cursor3 = store.history(limit=2, before=cursor2)
    assert [j.id for j in page2 + page3] == order[2:] and cursor3 is None
    assert store.get(jobs[0].id).to_json()["files"] == ["a.png"]  # type: ignore[union-attr]


def test_cancel_and_delete_only_apply_to_the_right_states(store: Store) -> None:
    running, pending = store.add(WORKFLOW), store.add(WORKFLOW)
    store.claim()
    assert not store.cancel(running.id) and store.cancel(pending.id) and not store.cancel(pending.id)
    assert store.get(pending.id).status == "cancelled"  # type: ignore[union-attr]
    assert not store.delete(running.id) and store.delete(pending.id)
    assert store.get(pending.id) is None and not store.cancel("nope") and not store.delete("nope")


def test_one_process_per_data_folder(store: Store) -> None:
    with pytest.raises(StoreBusy, match="in use"):
        Store(store.path.parent)


def test_a_jobs_answer_splices_the_stored_workflow_text_unchanged(store: Store) -> None:
    workflow = {**WORKFLOW, "ui": {"title": "café ☕", "pos": [1.5, -2]}}
    pending = store.add(workflow, client_id="c")
    store.add(WORKFLOW)
    store.claim()
    store.finish(pending.id, "ok", {"nodes": {"1": {"status": "ok"}}, "files": ["a.png"], "errors": []})
    for job in (store.get(pending.id), *store.queue()[1]):
        assert job is not None
        assert json.loads(job.to_json_text()) == job.to_json()
    done = store.get(pending.id)
    assert done is not None and json.loads(done.to_json_text())["workflow"] == workflow
    assert done.to_json_text().isascii()  # stored escaped: the answer's bytes are its characters


def test_a_router_claims_a_given_pending_job_and_a_dead_workers_job_goes_back_in_its_place(store: Store) -> None:
    first, second, third = (store.add(WORKFLOW, client_id=str(i)) for i in range(3))
    assert [job.id for job in store.pending(2)] == [first.id, second.id]
    assert store.pending(2)[1].workflow == WORKFLOW and store.pending(2)[1].position == 1
    assert store.claim(second.id).id == second.id  # type: ignore[union-attr]
    assert store.claim(second.id) is None and store.claim("nope") is None
    assert store.requeue(second.id) and not store.requeue(second.id) and not store.requeue(third.id)
    requeued = store.get(second.id)
    assert requeued is not None and requeued.status == "pending" and requeued.started is None
    assert [job.id for job in store.pending(5)] == [first.id, second.id, third.id]


def _fill(store: Store) -> None:
    """The database may not grow: SQLite answers "database or disk is full", as on a full disk."""
    (pages,) = store._db.execute("PRAGMA page_count").fetchone()
    store._db.execute(f"PRAGMA max_page_count = {pages}")


def test_a_full_disk_is_a_storage_error_that_loses_nothing_and_passes_once_there_is_room(store: Store) -> None:
    first = store.add(WORKFLOW)
    _fill(store)
    big = {"format": "nodegraph/1", "nodes": {}, "ui": {"note": "x" * 200_000}}  # needs new pages
    with pytest.raises(StorageFull) as caught:
        store.add(big)
    assert caught.value.folder == "data" and "'data'" in str(caught.value) and "/" not in str(caught.value)
    assert [job.id for job in store.queue()[1]] == [first.id]  # nothing half-written, nothing lost
    assert list(store._queued) == [first.id]
    store._db.execute("PRAGMA max_page_count = 1073741823")  # space is back
    second = store.add(big)
    assert [job.id for job in store.queue()[1]] == [first.id, second.id]


class _FailingCommits:
    """The store's connection, with its next `failures` COMMITs failing as a full disk makes them fail."""

    def __init__(self, real: sqlite3.Connection, failures: int) -> None:
        self.real, self.failures = real, failures

    def execute(self, sql: str, *args: Any) -> Any:
        if sql == "COMMIT" and self.failures:
            self.failures -= 1
            raise sqlite3.OperationalError("database or disk is full")
        return self.real.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_a_commit_that_fails_for_want_of_space_is_rolled_back_and_the_store_goes_on(store: Store) -> None:
    first = store.add(WORKFLOW)
    store._db = _FailingCommits(store._db, failures=2)  # type: ignore[assignment]
    with pytest.raises(StorageFull):
        store.add(WORKFLOW)
    with pytest.raises(StorageFull):
        store.claim()  # a claim's commit fails too: the job stays pending
    running, pending = store.queue()
    assert running == [] and [job.id for job in pending] == [first.id]
    claimed = store.claim()  # the disk has room again: everything works, in order
    assert claimed is not None and claimed.id == first.id
    store.finish(first.id, "ok", {"nodes": {}, "files": [], "errors": []})
    assert store.get(first.id).status == "ok"  # type: ignore[union-attr]


def test_storage_errors_are_told_apart_from_other_failures() -> None:
    assert storage_full(OSError(errno.ENOSPC, "No space left on device"))
    assert storage_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert storage_full(sqlite3.OperationalError("database or disk is full"))
    assert not storage_full(OSError(errno.EACCES, "Permission denied"))
    assert not storage_full(sqlite3.OperationalError("database is locked"))


def test_a_job_id_given_is_kept_and_a_taken_one_refused_without_harm(store: Store) -> None:
    job = store.add(WORKFLOW, client_id="c", job_id="prompt-1")
    assert job.id == "prompt-1" and store.get("prompt-1") is not None
    with pytest.raises(JobExists):
        store.add({**WORKFLOW, "other": 1}, job_id="prompt-1")
    claimed = store.claim()
    assert claimed is not None and claimed.id == "prompt-1" and claimed.workflow == WORKFLOW  # the first one's
    assert store.claim() is None
