"""Listing a models folder (nodegraph/model_listing.py): links followed within bounds, never into /proc, cached."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodegraph import model_listing
from nodegraph.model_listing import list_folder, truncated
from nodegraph.settings import ModelChoices, Settings

PAST = 1_600_000_000  # an mtime long ago: a folder not changed since is trusted by the cache


@pytest.fixture(autouse=True)
def fresh() -> Iterator[None]:
    model_listing.forget()
    yield
    model_listing.forget()


@pytest.fixture
def scanned(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every folder the listing reads (os.scandir's argument), as its real path."""
    paths: list[str] = []
    real = os.scandir

    def scandir(path: Any) -> Any:
        paths.append(os.path.realpath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    return paths


def _tree(base: Path, *files: str) -> Path:
    for name in files:
        (base / name).parent.mkdir(parents=True, exist_ok=True)
        (base / name).write_bytes(b"")
    return base


def _age(base: Path) -> None:
    """Set every folder's mtime in the past (as a tree not touched for a while)."""
    for folder, _, _ in os.walk(base):
        os.utime(folder, (PAST, PAST))


def _outside(paths: list[str], tops: tuple[str, ...] = ("/proc", "/sys", "/dev")) -> list[str]:
    return [p for p in paths if any(p == top or p.startswith(top + "/") for top in tops)]


def test_a_link_to_the_root_is_walked_within_bounds_and_reported_once(
        tmp_path: Path, scanned: list[str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(model_listing, "MAX_ENTRIES", 2_000)  # the real bound, scaled down for a test
    base = _tree(tmp_path / "models" / "loras", "mine.safetensors", "z/deeper/mine.safetensors")
    (base / "everything").symlink_to("/", target_is_directory=True)
    names, note = list_folder(base)
    # The folder's own tree is listed before what links lead to, whatever the names' order.
    assert {"mine.safetensors", "z/deeper/mine.safetensors"} <= set(names) and note == "over 2,000 entries"
    assert not _outside(scanned)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(base) in warnings[0] and "listing_truncated" in warnings[0]
    assert truncated() == [{"code": "listing_truncated", "folder": str(base), "reason": "over 2,000 entries"}]
    scanned.clear()
    assert list_folder(base) == (names, note)  # served again for a while without walking /
    assert scanned == [] and len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    (base / "everything").unlink()  # the bad link removed: the next listing is whole, and the report goes
    model_listing._cache.clear()
    assert list_folder(base) == (["mine.safetensors", "z/deeper/mine.safetensors"], None) and truncated() == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc, /sys and /dev as Linux has them")
def test_links_into_pseudo_filesystems_are_never_entered(tmp_path: Path, scanned: list[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    base = _tree(tmp_path / "loras", "a.safetensors")
    for top in ("proc", "sys", "dev"):
        (base / top).symlink_to(f"/{top}", target_is_directory=True)
    assert list_folder(base) == (["a.safetensors"], None)
    assert not _outside(scanned)
    # By device (what /proc/self/mountinfo says is proc, sysfs…) as well as by path: a bind mount has another path.
    assert os.stat("/proc").st_dev in model_listing._pseudo_devices()
    monkeypatch.setattr(model_listing, "PSEUDO_PATHS", ())
    model_listing.forget()
    scanned.clear()
    names, _ = list_folder(base)
    assert not [n for n in names if n.startswith(("proc/", "sys/"))] and not _outside(scanned, ("/proc", "/sys"))


def test_link_cycles_are_walked_once_and_depth_is_bounded(tmp_path: Path, scanned: list[str]) -> None:
    base = _tree(tmp_path / "loras", "a/one.safetensors", "b/two.safetensors")
    (base / "a" / "up").symlink_to(base, target_is_directory=True)  # a cycle through the top
    (base / "b" / "a").symlink_to(base / "a", target_is_directory=True)  # two ways to one folder
    names, note = list_folder(base)
    assert names == ["a/one.safetensors", "b/two.safetensors"] and note is None
    assert len(scanned) == len(set(scanned)) == 3
    deep = "/".join(f"d{i}" for i in range(model_listing.MAX_DEPTH + 1))
    _tree(base, f"{deep}/too-deep.safetensors", "d0/d1/shallow.safetensors")
    names, note = list_folder(base)
    assert "d0/d1/shallow.safetensors" in names and not [n for n in names if "too-deep" in n]
    assert note == f"deeper than {model_listing.MAX_DEPTH} folders"


def test_an_unchanged_tree_is_served_from_the_cache_and_any_change_is_seen(tmp_path: Path, scanned: list[str]) -> None:
    disk = _tree(tmp_path / "disk", "linked.safetensors")
    base = _tree(tmp_path / "models" / "loras", "a.safetensors", "sub/b.safetensors")
    (base / "other-disk").symlink_to(disk, target_is_directory=True)
    (base / "later").symlink_to(tmp_path / "not-mounted-yet", target_is_directory=True)
    _age(tmp_path)
    expected = ["a.safetensors", "other-disk/linked.safetensors", "sub/b.safetensors"]
    assert list_folder(base) == (expected, None)
    scanned.clear()
    for _ in range(3):
        assert list_folder(base) == (expected, None)
    assert scanned == []  # nothing read but the folders' stat
    (disk / "new.safetensors").write_bytes(b"")  # in a linked folder
    assert "other-disk/new.safetensors" in list_folder(base)[0]
    (base / "sub" / "b.safetensors").rename(base / "sub" / "c.safetensors")
    assert "sub/c.safetensors" in list_folder(base)[0]
    _tree(tmp_path / "not-mounted-yet", "m.safetensors")  # a link that led nowhere now leads somewhere
    _age(tmp_path)
    assert "later/m.safetensors" in list_folder(base)[0]
    model_files = Settings(models_dirs=(tmp_path / "models",)).model_files("loras")
    assert model_files == list_folder(base)[0]


def test_a_folder_changed_a_moment_ago_is_read_again(tmp_path: Path, scanned: list[str]) -> None:
    base = _tree(tmp_path / "loras", "a.safetensors")  # just written: its mtime could change within the same tick
    list_folder(base)
    scanned.clear()
    list_folder(base)
    assert scanned == [str(base.resolve())]


def test_model_files_of_an_unchanged_tree_are_not_read_again_and_never_from_proc(
        tmp_path: Path, scanned: list[str]) -> None:
    base = _tree(tmp_path / "models" / "loras", "sub/x.safetensors")
    if os.path.isdir("/proc/self/fdinfo"):
        (base / "proc").symlink_to("/proc/self/fdinfo", target_is_directory=True)
    _age(base)
    settings = Settings(models_dirs=(tmp_path / "models",))
    assert settings.model_files("loras") == ["sub/x.safetensors"]  # Settings lists through this module
    assert not _outside(scanned)
    scanned.clear()
    assert settings.model_files("loras") == ModelChoices("loras")(settings) == ["sub/x.safetensors"]
    assert scanned == []  # served from the cache: the folders' mtimes are unchanged
