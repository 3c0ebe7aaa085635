"""The thread policy: torch's intra-op threads follow the largest model in use, unless the user says."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from nodegraph import threads
from nodegraph.cli import EXIT_INVALID, main
from nodegraph.threads import SMALL_MODEL, ThreadPolicy, ThreadsError, parse_threads
from tests.test_models import Harness


@pytest.fixture
def auto(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """`auto` on a 4-core machine, nothing set in the environment; torch's count restored after."""
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("NODEGRAPH_THREADS", raising=False)
    monkeypatch.setattr(threads, "machine_cores", lambda: 4)
    yield
    torch.set_num_threads(before)


def test_thread_counts_parse() -> None:
    assert parse_threads("auto") is None and parse_threads(None) is None
    assert parse_threads("3") == 3
    for bad in ("0", "-2", "many", "1.5"):
        with pytest.raises(ThreadsError, match="--threads must be auto or a positive whole number"):
            parse_threads(bad)


def test_auto_gives_small_models_one_thread_and_large_ones_every_core(auto: None) -> None:
    policy = ThreadPolicy()
    assert policy.count_for(8 * 2**20) == 1
    assert policy.count_for(SMALL_MODEL) == 4


def test_what_the_user_says_wins(auto: None, monkeypatch: pytest.MonkeyPatch) -> None:
    assert ThreadPolicy(3).count_for(1) == 3 and ThreadPolicy(3).count_for(2**40) == 3
    monkeypatch.setenv("NODEGRAPH_THREADS", "2")
    assert ThreadPolicy().count_for(1) == 2
    monkeypatch.delenv("NODEGRAPH_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # torch read it at import: auto leaves torch alone
    assert ThreadPolicy().count_for(1) is None and ThreadPolicy(2).count_for(1) == 2


def test_the_manager_sets_threads_for_the_largest_model_in_use(auto: None) -> None:
    harness = Harness(device="cpu")
    torch.set_num_threads(3)
    with harness.use("big", SMALL_MODEL * 2):
        assert torch.get_num_threads() == 4
        with harness.use("controlnet", 2**20):  # a small one beside the large one: still every core
            assert torch.get_num_threads() == 4
        assert torch.get_num_threads() == 4
    with harness.use("tiny", 2**20):
        assert torch.get_num_threads() == 1


def test_a_bad_thread_count_stops_the_command_before_anything_runs(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    workflow = tmp_path / "wf.json"
    workflow.write_text('{"format": "nodegraph/1", "nodes": {}}')
    assert main(["run", str(workflow), "--threads", "0"]) == EXIT_INVALID
    assert "--threads must be auto or a positive whole number, not 0" in capsys.readouterr().err
