"""The routers on their own (no Ray): which idle worker gets which pending job."""

from __future__ import annotations

from nodegraph.registry import Registry
from nodegraph.scale.router import AffinityRouter, Candidate, RoundRobin, WorkerView, affinity

A, B = ("checkpoints", "a"), ("checkpoints", "b")
STYLE, INK = ("loras", "style"), ("loras", "ink")


def job(job_id: str, *models: tuple[str, str], waited: float = 0.0, client: str | None = None) -> Candidate:
    return Candidate(job_id, frozenset(models), waited, client)


def warm(index: int, *models: tuple[str, str], busy: bool = False) -> WorkerView:
    view = WorkerView(index, busy)
    view.touch(frozenset(models))
    return view


def test_affinity_is_the_model_files_a_workflow_names(registry: Registry) -> None:
    workflow = {"format": "nodegraph/1", "nodes": {
        "1": {"type": "LoadCheckpoint", "inputs": {"checkpoint": "tiny-sd15", "dtype": "fp32"}},
        "2": {"type": "LoadLoRA", "inputs": {"model": ["1", "model"], "lora": "style.safetensors"}},
        "3": {"type": "Int", "inputs": {"value": 3}}}}
    assert affinity(workflow, registry) == {("checkpoints", "tiny-sd15 [fp32]"), ("loras", "style.safetensors")}
    workflow["nodes"]["1"]["inputs"]["dtype"] = "fp16"  # another resident: another affinity
    assert ("checkpoints", "tiny-sd15 [fp16]") in affinity(workflow, registry)
    assert affinity({"format": "nodegraph/1", "nodes": {"1": {"type": "Int", "inputs": {"value": 3}}}},
                    registry) == frozenset()


def test_a_job_goes_to_the_worker_that_holds_its_checkpoint() -> None:
    workers = [warm(0, A), warm(1, B)]
    assert AffinityRouter().assign([job("j1", B), job("j2", A)], workers) == [("j2", 0), ("j1", 1)]


def test_a_lora_switch_is_cheaper_than_a_checkpoint_load() -> None:
    workers = [warm(0, A, STYLE), warm(1, B, INK)]
    assert AffinityRouter().assign([job("j1", A, INK)], workers) == [("j1", 0)]


def test_an_idle_worker_takes_a_later_job_it_holds_rather_than_the_head_of_the_queue() -> None:
    workers = [warm(0, A), warm(1, B, busy=True)]
    assert AffinityRouter().assign([job("j1", B), job("j2", A)], workers) == [("j2", 0)]


def test_a_job_waits_briefly_for_its_busy_worker_when_nothing_else_fits() -> None:
    workers = [warm(0, A), warm(1, B, busy=True)]
    assert AffinityRouter(max_backlog=3).assign([job("j1", B)], workers) == []


def test_a_long_queue_on_the_preferred_worker_spills_to_an_idle_one() -> None:
    workers = [warm(0, A), warm(1, B, busy=True)]
    pending = [job("j1", B), job("j2", B), job("j3", B)]
    assert AffinityRouter(max_backlog=3).assign(pending, workers) == [("j1", 0)]


def test_a_job_that_waited_past_the_limit_goes_to_any_idle_worker() -> None:
    workers = [warm(0, A), warm(1, B, busy=True)]
    assert AffinityRouter(max_wait=30, max_backlog=99).assign([job("j1", B, waited=31)], workers) == [("j1", 0)]


def test_the_look_ahead_is_bounded() -> None:
    workers = [warm(0, A), warm(1, B, busy=True)]
    pending = [job(f"b{i}", B) for i in range(4)] + [job("a", A)]
    assert AffinityRouter(lookahead=4, max_backlog=99).assign(pending, workers) == []
    assert AffinityRouter(lookahead=5, max_backlog=99).assign(pending, workers) == [("a", 0)]


def test_alternating_checkpoints_stay_on_their_workers() -> None:
    router, workers = AffinityRouter(max_backlog=99), [WorkerView(0), WorkerView(1)]
    ran: dict[int, list[str]] = {0: [], 1: []}
    pending = [job(f"{i}{name}", model) for i in range(4) for name, model in (("a", A), ("b", B))]
    while pending:
        for job_id, index in router.assign(pending, workers):
            ran[index].append(job_id[-1])
            pending = [p for p in pending if p.job_id != job_id]
        for worker in workers:
            worker.busy = False  # both finish
    assert sorted(map(set, ran.values()), key=sorted) == [{"a"}, {"b"}]


def test_sticky_sessions_keep_a_clients_recipe_on_one_worker() -> None:
    router = AffinityRouter()
    workers = [warm(0, A), warm(1, A)]
    [(_, first)] = router.assign([job("j1", A, client="alice")], workers)
    for worker in workers:
        worker.busy = False
    assert router.assign([job("j2", A, client="alice")], workers) == [("j2", first)]
    assert router.preferred(job("j3", A, client="bob"), workers) == {0, 1}


def test_jobs_without_models_go_to_any_idle_worker() -> None:
    workers = [WorkerView(0), WorkerView(1)]
    assert AffinityRouter().assign([job("j1"), job("j2"), job("j3")], workers) == [("j1", 0), ("j2", 1)]


def test_a_worker_forgets_models_beyond_its_residents() -> None:
    worker = warm(0, A, STYLE)
    worker.touch(frozenset({B}))
    worker.trim(1)
    assert list(worker.warm) == [STYLE, B]
    assert worker.cost(frozenset({A, STYLE})) == 10


def test_round_robin_ignores_models() -> None:
    router, workers = RoundRobin(), [warm(0, A), warm(1, B)]
    assert router.assign([job("j1", B), job("j2", A)], workers) == [("j1", 0), ("j2", 1)]
    for worker in workers:
        worker.busy = False
    assert router.assign([job("j3", A)], workers) == [("j3", 0)]
