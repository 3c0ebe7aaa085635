"""Shared fixtures. Tests never reach a model hub: HF_HUB_OFFLINE is set before anything imports it."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# `auto` dtype is fp32 on every CPU in tests (bf16 where the CPU has bf16 units otherwise): references are fp32,
# and a result must not depend on which CPU runs the suite. Tests of the bf16 policy patch `cpu_has_bf16`.
os.environ.setdefault("NODEGRAPH_CPU_BF16", "0")
# One torch thread (nodegraph/threads.py's choice for the tiny demo models, made here for the references computed
# outside the runtime and for subprocesses too): on a busy 2-core machine two threads wait at every op's barrier.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

from nodegraph import events as ev  # noqa: E402
from nodegraph.executor import Executor  # noqa: E402
from nodegraph.registry import Registry, load_registry  # noqa: E402
from nodegraph.settings import Settings  # noqa: E402

PACKS = Path(__file__).parent / "packs"


@pytest.fixture(scope="session")
def registry() -> Registry:
    """The built-in nodes plus the test pack (file readers, slow and failing nodes)."""
    return load_registry([PACKS])


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(models_dirs=(tmp_path / "models",), output_dir=tmp_path / "outputs", input_dir=tmp_path / "input")


@pytest.fixture
def executor(registry: Registry, settings: Settings) -> Executor:
    return Executor(registry, settings)


class Recorder(list[ev.Event]):
    """An event sink that keeps every event."""

    def __call__(self, event: ev.Event) -> None:
        self.append(event)

    def of(self, kind: type[ev.Event]) -> list[Any]:
        return [e for e in self if isinstance(e, kind)]

    def ran(self) -> list[str]:
        return [e.node_id for e in self.of(ev.NodeStarted)]


def workflow(nodes: dict[str, Any]) -> dict[str, Any]:
    return {"format": "nodegraph/1", "nodes": nodes, "ui": {}}


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled demo models (tiny SD1.5 and SDXL, LoRAs in several formats), made once per session."""
    from nodes.engine.demo_models import make_demo_models

    root = tmp_path_factory.mktemp("models")
    make_demo_models(root)
    return root


@pytest.fixture(scope="session")
def demo_input(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An input folder with the bundled demo image, `demo.png` (64×64 RGBA, a transparent rectangle)."""
    from nodes.engine.demo_input import make_demo_input

    folder = tmp_path_factory.mktemp("input")
    make_demo_input(folder)
    return folder


@pytest.fixture
def demo_settings(demo_dir: Path, demo_input: Path, tmp_path: Path) -> Settings:
    return Settings(models_dirs=(demo_dir,), output_dir=tmp_path / "outputs", input_dir=demo_input)
