"""The model manager's decisions, with stand-in models that report their sizes (no diffusion here)."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from nodegraph.models import ModelManager, OptionError, Placement, parse_size


class Model:
    """A resident that holds `size` bytes on one device and logs what the manager asks of it."""

    def __init__(self, name: str, size: int, placement: Placement, log: list[str]) -> None:
        self.name, self.size, self.placement, self.log = name, size, placement, log
        self.device = placement.device

    def memory(self) -> dict[str, int]:
        return {} if self.placement.offload else {self.device: self.size}  # offloaded: its weights are on disk

    def move(self, device: str) -> None:
        self.log.append(f"move {self.name} {device}")
        self.device = device

    def release(self) -> None:
        self.log.append(f"release {self.name}")


class Harness:
    def __init__(self, **options: Any) -> None:
        self.manager = ModelManager(**options)
        self.log: list[str] = []
        self.reports: list[tuple[str, str]] = []

    def use(self, name: str, size: int) -> Any:
        return self.manager.use(name, lambda placement: Model(name, size, placement, self.log), size, name,
                                lambda kind, message, seconds: self.reports.append((kind, message)))

    def load(self, name: str, size: int) -> Model:
        with self.use(name, size) as model:
            assert isinstance(model, Model)
            return model

    def resident(self) -> dict[str, str]:
        return {str(e.key): e.device for e in self.manager.resident()}


def test_sizes_and_percentages() -> None:
    assert parse_size("8G", lambda: 0) == 8 * 1024**3
    assert parse_size("512MiB", lambda: 0) == 512 * 1024**2
    assert parse_size("1.5g", lambda: 0) == int(1.5 * 1024**3)
    assert parse_size("1073741824", lambda: 0) == 1073741824
    assert parse_size("25%", lambda: 1000) == 250
    for bad in ("lots", "-1G", "150%", "8 parsecs"):
        with pytest.raises(OptionError):
            parse_size(bad, lambda: 1000)


def test_bad_options_fail_at_start() -> None:
    with pytest.raises(OptionError, match="unknown device 'gpu'"):
        ModelManager(device="gpu")
    with pytest.raises(OptionError, match="not a size"):
        ModelManager(ram_budget="half")


def test_least_recently_used_is_evicted_first_within_the_budget() -> None:
    h = Harness(device="cpu", ram_budget=100)  # models may use 90 bytes
    h.load("a", 40)
    h.load("b", 40)
    h.load("a", 40)  # a is now the most recently used
    h.load("c", 40)
    assert h.resident() == {"a": "cpu", "c": "cpu"}
    assert h.log == ["release b"]
    assert ("evict", "released b (40 B)") in h.reports
    assert h.manager.used("cpu") == 80 <= h.manager.limit("cpu")


def test_a_model_in_use_is_never_evicted() -> None:
    h = Harness(device="cpu", ram_budget=100)
    with h.use("a", 60):
        big = h.load("b", 60)  # no room while a is locked: b runs offloaded rather than evict a
        assert big.placement.offload
        assert "a" in h.resident()
    assert h.log == []


def test_a_model_larger_than_the_budget_is_loaded_with_offloading() -> None:
    h = Harness(device="cpu", ram_budget=100)
    h.load("small", 10)
    model = h.load("huge", 1000)
    assert model.placement == Placement("cpu", offload=True)
    assert "small" in h.resident()  # nothing was evicted for a model that could never fit
    assert any(kind == "load" and "with offloading" in message for kind, message in h.reports)


def test_gpu_models_move_to_the_cpu_and_back() -> None:
    h = Harness(device="cuda:0", vram_budget=100, ram_budget=1000)
    h.load("a", 60)
    h.load("b", 60)
    assert h.resident() == {"a": "cpu", "b": "cuda:0"}
    assert h.log == ["move a cpu"]
    h.load("a", 60)  # back from the CPU: no load, b makes room the same way
    assert h.resident() == {"b": "cpu", "a": "cuda:0"}
    assert h.log == ["move a cpu", "move b cpu", "move a cuda:0"]
    assert [kind for kind, _ in h.reports] == ["loading", "load", "offload", "loading", "load", "offload", "reload"]


def test_gpu_models_are_released_when_the_ram_budget_has_no_room() -> None:
    h = Harness(device="cuda:0", vram_budget=100, ram_budget=50)
    h.load("a", 60)
    h.load("b", 60)
    assert h.resident() == {"b": "cuda:0"}
    assert h.log == ["release a"]


def test_a_model_that_grows_in_use_makes_room_when_released() -> None:
    h = Harness(device="cpu", ram_budget=100)
    h.load("a", 30)
    with h.use("b", 30) as b:
        b.size = 80  # e.g. LoRAs loaded into it
    assert h.resident() == {"b": "cpu"}
    assert h.manager.used("cpu") == 80


def test_clear_and_drop() -> None:
    h = Harness(device="cpu", ram_budget=100)
    h.load("a", 10)
    with h.use("b", 10):
        h.manager.clear()
        assert h.resident() == {"b": "cpu"}  # in use: kept
    h.manager.drop("b")
    assert h.resident() == {}
    assert sorted(h.log) == ["release a", "release b"]


def test_a_failed_load_leaves_nothing_behind() -> None:
    h = Harness(device="cpu", ram_budget=100)

    def fail(placement: Placement) -> Any:
        raise RuntimeError("bad file")

    with pytest.raises(RuntimeError), h.manager.use("x", fail, 10):
        pass
    assert h.resident() == {}


def test_status_reports_budgets_and_residents() -> None:
    h = Harness(device="cuda:0", vram_budget="1000", ram_budget="2000")
    h.load("a", 300)
    with h.use("b", 200):
        status = h.manager.status()
    assert status["device"] == "cuda:0"
    assert status["budgets"]["vram"] == {"device": "cuda:0", "budget": 1000, "limit": 900, "used": 500}
    assert status["budgets"]["ram"]["budget"] == 2000
    [a, b] = status["residents"]
    assert (a["name"], a["device"], a["bytes"], a["locked"]) == ("a", "cuda:0", {"cuda:0": 300}, False)
    assert b["locked"] is True


def test_status_can_be_read_while_a_model_loads() -> None:
    h = Harness(device="cpu", ram_budget=100)
    loading, release = threading.Event(), threading.Event()

    def slow(placement: Placement) -> Model:
        loading.set()
        release.wait(10)
        return Model("slow", 10, placement, h.log)

    def worker() -> None:
        with h.manager.use("slow", slow, 10):
            pass

    thread = threading.Thread(target=worker)
    thread.start()
    assert loading.wait(10)
    assert h.manager.status()["residents"] == []  # answered at once, not after the load
    release.set()
    thread.join(10)
    assert h.resident() == {"slow": "cpu"}


class Parts(Model):
    """A resident that also lists its components, as a pipeline does: text encoders on the CPU."""

    def memory(self) -> dict[str, int]:
        memory = {self.device: self.size}
        memory["cpu"] = memory.get("cpu", 0) + 70
        return memory

    def component_memory(self) -> list[dict[str, Any]]:
        return [{"name": "transformer", "dtype": "bfloat16", "bytes": {self.device: self.size}},
                {"name": "text_encoder_2", "dtype": "float32", "bytes": {"cpu": 70}}]


def test_text_encoder_device_is_checked_at_start_naming_the_option() -> None:
    with pytest.raises(OptionError, match=r"text_encoder_device \(--text-encoder-device\) 'gpu'"):
        ModelManager(device="cpu", text_encoder_device="gpu")
    assert ModelManager(device="cpu").text_encoder_device is None
    assert ModelManager(device="cpu", text_encoder_device="cuda").text_encoder_device == "cuda:0"
    assert ModelManager(device="cpu", text_encoder_device="cpu").status()["text_encoder_device"] == "cpu"
    assert ModelManager(device="cpu").status()["text_encoder_device"] == "cpu"  # default: the compute device


def test_status_lists_each_component_with_its_bytes_and_device() -> None:
    h = Harness(device="cuda:0", vram_budget="1000", ram_budget="2000", text_encoder_device="cpu")
    with h.manager.use("flux", lambda placement: Parts("flux", 300, placement, h.log), 300, "flux"):
        pass
    [flux] = h.manager.status()["residents"]
    assert flux["bytes"] == {"cuda:0": 300, "cpu": 70}
    assert flux["components"] == [{"name": "transformer", "dtype": "bfloat16", "bytes": {"cuda:0": 300}},
                                  {"name": "text_encoder_2", "dtype": "float32", "bytes": {"cpu": 70}}]
    assert h.manager.used("cpu") == 70  # text encoders on the CPU count against the RAM budget


def test_text_encoders_on_the_cpu_make_room_in_the_ram_budget() -> None:
    h = Harness(device="cuda:0", vram_budget="1000", ram_budget=100)  # models may use 90 bytes of RAM
    with h.manager.use("old", lambda placement: Model("old", 50, Placement("cpu"), h.log), 0, "old"):
        pass
    with h.manager.use("flux", lambda placement: Parts("flux", 300, placement, h.log), 300, "flux"):
        pass
    assert h.resident() == {"flux": "cuda:0"} and h.log == ["release old"]  # 50 + 70 bytes of RAM did not fit


def test_a_reload_makes_room_for_what_was_moved_not_for_text_encoders_kept_on_the_cpu() -> None:
    h = Harness(device="cuda:0", vram_budget="1000", ram_budget="2000")  # models may use 900 bytes of VRAM
    with h.manager.use("flux", lambda placement: Parts("flux", 300, placement, h.log), 300, "flux"):
        pass
    h.load("b", 400)
    h.load("c", 300)  # 1000: flux goes to the CPU
    assert h.resident() == {"flux": "cpu", "b": "cuda:0", "c": "cuda:0"}
    h.manager.drop("c")
    h.load("d", 150)
    with h.manager.use("flux", lambda placement: Parts("flux", 300, placement, h.log), 0, "flux"):
        pass  # 400 + 150 + 300 fit; counting its 70 bytes of text encoders too would not
    assert h.resident() == {"b": "cuda:0", "d": "cuda:0", "flux": "cuda:0"}


class Pool:
    """A cache beside the models (as the LoRA cache is): entries of (device, bytes), least recently used first."""

    name = "fake"

    def __init__(self, *entries: tuple[str, int]) -> None:
        self.entries = list(entries)

    def memory(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for device, size in self.entries:
            totals[device] = totals.get(device, 0) + size
        return totals

    def count(self) -> int:
        return len(self.entries)

    def shrink(self, kind: str, size: int) -> None:
        for entry in list(self.entries):
            if size <= 0:
                return
            if (entry[0] == "cpu") == (kind == "cpu"):
                self.entries.remove(entry)
                size -= entry[1]


def test_a_pools_bytes_count_in_the_budgets_and_are_listed() -> None:
    h = Harness(device="cuda:0", vram_budget="1000", ram_budget="2000")
    pool = Pool(("cpu", 70), ("cuda:0", 30), ("cpu", 5))
    h.manager.add_pool(pool)
    h.load("a", 300)
    status = h.manager.status()
    assert status["budgets"]["vram"]["used"] == 330 and status["budgets"]["ram"]["used"] == 75
    assert status["caches"] == [{"name": "fake", "entries": 3, "bytes": {"cpu": 75, "cuda:0": 30}}]
    h.manager.remove_pool(pool)
    assert h.manager.used("gpu") == 300 and h.manager.status()["caches"] == []


def test_a_pool_is_shrunk_least_recent_first_before_any_model_is_evicted() -> None:
    h = Harness(device="cpu", ram_budget=1000)  # models and pools may use 900 bytes
    pool = Pool(*[("cpu", 100)] * 4)
    h.manager.add_pool(pool)
    h.load("a", 400)  # 400 + 400: fits
    assert pool.count() == 4
    first = pool.entries[0]
    pool.entries[0] = ("cpu", 99)  # to tell the oldest entry apart
    h.load("b", 250)  # 250 more: two entries go (the oldest first), no model
    assert pool.entries == [first, first] and h.resident() == {"a": "cpu", "b": "cpu"} and h.log == []
    h.load("c", 300)  # the pool is emptied before a model is evicted
    assert pool.entries == [] and h.log == ["release a"]


def test_a_pool_grows_only_into_room_that_models_leave() -> None:
    h = Harness(device="cpu", ram_budget=1000)  # 900 bytes
    pool = Pool(("cpu", 100), ("cpu", 100))
    h.manager.add_pool(pool)
    h.load("a", 600)
    assert h.manager.room("cpu", 100)  # 800 + 100: fits as it is
    assert pool.count() == 2
    assert h.manager.room("cpu", 150) and pool.count() == 1  # its own oldest entry made way
    assert not h.manager.room("cpu", 400)  # only by evicting a model: refused, the model and the entry stay
    assert h.resident() == {"a": "cpu"} and h.log == [] and pool.count() == 1
    assert not h.manager.room("cpu", 901)  # larger than the whole budget


def test_pool_entries_on_the_gpu_count_in_the_vram_budget() -> None:
    h = Harness(device="cuda:0", vram_budget=1000, ram_budget=1000)
    pool = Pool(("cuda:0", 300), ("cpu", 300))
    h.manager.add_pool(pool)
    h.load("a", 500)
    h.load("b", 300)  # 800 of VRAM models: the GPU entry goes, the CPU one stays
    assert pool.entries == [("cpu", 300)] and h.resident() == {"a": "cuda:0", "b": "cuda:0"}


def test_clear_empties_the_pools_too() -> None:
    h = Harness(device="cuda:0", vram_budget=1000, ram_budget=1000)
    pool = Pool(("cuda:0", 300), ("cpu", 300))
    h.manager.add_pool(pool)
    h.load("a", 100)
    h.manager.clear()
    assert pool.entries == [] and h.resident() == {}
