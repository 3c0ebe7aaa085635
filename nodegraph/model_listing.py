"""Listing one models folder (`models/loras`, …): bounded, cycle-free, never into /proc, cached by mtimes.

    names, note = list_folder(Path("models/loras"), (".safetensors",))
    names, note = list_folder(Path("models/checkpoints"), (".safetensors",), marker="model_index.json")

Every model kind is listed here (`Settings.model_files`). Symlinks are followed, since linking model
folders in from another disk is common, but a link to `/` or another huge tree must not cost a minute
per request. So a walk
- enters each folder once (device and inode): link cycles, and two links to one folder, cost nothing;
- never enters a pseudo-filesystem: /proc, /sys, /dev, or any folder on proc, sysfs, cgroup… (by the
  device numbers in /proc/self/mountinfo, and by path where that cannot be read);
- stops at MAX_DEPTH folders deep, MAX_ENTRIES directory entries, or MAX_SECONDS: what it reached is
  listed, and the folder is reported (one warning in the log, and in `truncated()`, which `/api/system`
  shows) until a listing of it is complete again.

A listing is kept with the device, inode and modification time of every folder it read: the next call
stats those folders again (microseconds each) and walks only when one changed (a file added, removed
or renamed changes its folder's mtime; a link retargeted changes its parent's; the ctime is compared
too, which a chmod changes). A folder modified in the last two seconds is not trusted (mtimes may be that
coarse), so such a listing is walked again next time. A listing that stopped at a bound is served for
RECHECK_TRUNCATED seconds before it is checked at all.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("nodegraph.models")

MAX_DEPTH = 16  # folders below the kind's folder
MAX_ENTRIES = 50_000  # directory entries read in one walk, files and folders together
MAX_SECONDS = 5.0
RECHECK_TRUNCATED = 10.0  # seconds a listing that stopped early is served before its folders are stat'ed again
RACY_NS = 2_000_000_000  # a folder changed this recently may change again within the same mtime
PSEUDO_PATHS = ("/proc", "/sys", "/dev")
PSEUDO_TYPES = frozenset({"proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "debugfs", "tracefs",
                          "securityfs", "pstore", "bpf", "configfs", "fusectl", "mqueue", "hugetlbfs",
                          "binfmt_misc", "efivarfs", "selinuxfs", "autofs", "rpc_pipefs", "nsfs"})
TRUNCATED_CODE = "listing_truncated"

Stamp = tuple[str, int, int, int, int]  # a folder read: (path, device, inode, mtime and ctime in ns)


@dataclass(frozen=True)
class _Listing:
    names: tuple[str, ...]
    stamps: tuple[Stamp, ...]
    dangling: tuple[str, ...]  # links that led nowhere: a disk mounted later must show up
    truncated: str | None  # why the walk stopped early
    trusted: bool  # no folder changed too recently to trust its mtime
    walked: float  # when (time.monotonic)


_cache: dict[tuple[str, tuple[str, ...], str | None], _Listing] = {}
_reported: dict[str, str] = {}  # folder -> why its listing stopped early (logged once)
_lock = threading.Lock()


def list_folder(base: Path, suffixes: Sequence[str] = (".safetensors",),
                marker: str | None = None) -> tuple[list[str], str | None]:
    """The model names under `base` (relative paths, sorted) and, when the walk stopped early, why.

    Files count when their suffix is one of `suffixes`; hidden files and folders never. With `marker`, a
    folder below `base` holding a file of that name (a diffusers folder's `model_index.json`) is one model,
    and what is inside it is its parts.
    """
    folder = os.path.abspath(base)
    key = (folder, tuple(s.lower() for s in suffixes), marker)
    with _lock:
        cached = _cache.get(key)
    # A listing that stopped early has read a huge tree (often one that changes all the time, as / does): it is
    # served for a while before being checked, so that each request does not walk it again.
    if cached is not None and (cached.truncated is not None and time.monotonic() - cached.walked < RECHECK_TRUNCATED
                               or _unchanged(cached)):
        return list(cached.names), cached.truncated
    if not os.path.isdir(folder):
        with _lock:
            _cache.pop(key, None)
            _reported.pop(str(base), None)
        return [], None
    listing = _walk(folder, key[1], marker)
    with _lock:
        _cache[key] = listing
        _note(str(base), listing.truncated)
    return list(listing.names), listing.truncated


def truncated() -> list[dict[str, str]]:
    """The folders whose latest listing stopped early, for `/api/system`: {"code", "folder", "reason"}."""
    with _lock:
        return [{"code": TRUNCATED_CODE, "folder": folder, "reason": reason}
                for folder, reason in sorted(_reported.items())]


def forget() -> None:
    """Drop every cached listing and report (tests)."""
    with _lock:
        _cache.clear()
        _reported.clear()


def _note(folder: str, reason: str | None) -> None:
    if reason is None:
        _reported.pop(folder, None)
    elif _reported.get(folder) != reason:
        _reported[folder] = reason
        log.warning("%s: %s (%s); the models past that are not offered. A link to a huge tree?", TRUNCATED_CODE,
                    folder, reason)


def _unchanged(listing: _Listing) -> bool:
    if not listing.trusted:
        return False
    try:
        for path, *stamp in listing.stamps:
            stat = os.stat(path)
            if [stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns] != stamp:
                return False
    except OSError:
        return False
    return not any(os.path.exists(link) for link in listing.dangling)


def _walk(base: str, suffixes: tuple[str, ...], marker: str | None) -> _Listing:
    started, deadline = time.time_ns(), time.monotonic() + MAX_SECONDS
    pseudo = _pseudo_devices()
    names: list[str] = []
    stamps: list[Stamp] = []
    dangling: list[str] = []
    seen: set[tuple[int, int]] = set()
    entries = 0
    why: str | None = None
    # Breadth first, the folder's own tree before what links lead to: a link to a huge tree cannot use up the
    # bounds before the models that are really here are listed.
    own: deque[tuple[str, int]] = deque([] if _pseudo_path(base) else [("", 0)])  # (path below base, depth)
    linked: deque[tuple[str, int]] = deque()
    while own or linked:
        if time.monotonic() > deadline:
            why = f"stopped after {MAX_SECONDS:g} s"
            break
        through_link = not own
        relative, depth = (linked if through_link else own).popleft()
        path = os.path.join(base, relative) if relative else base
        try:
            stat = os.stat(path)
        except OSError:
            continue
        if (stat.st_dev, stat.st_ino) in seen or stat.st_dev in pseudo:
            continue
        seen.add((stat.st_dev, stat.st_ino))
        stamps.append((path, stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns))
        try:
            with os.scandir(path) as found:
                children = sorted(found, key=lambda entry: entry.name)
        except OSError:
            continue
        entries += len(children)
        if marker is not None and relative and any(child.name == marker and _is_file(child) for child in children):
            names.append(relative)  # one model; its parts are not models
            continue
        for child in children:
            if child.name.startswith("."):
                continue
            name = f"{relative}/{child.name}" if relative else child.name
            if _is_folder(child, dangling):
                if depth >= MAX_DEPTH:
                    why = why or f"deeper than {MAX_DEPTH} folders"
                elif _leads_to_pseudo(child):
                    continue
                elif through_link or child.is_symlink():
                    linked.append((name, depth + 1))
                else:
                    own.append((name, depth + 1))
            elif os.path.splitext(child.name)[1].lower() in suffixes:
                names.append(name)
        if entries >= MAX_ENTRIES and (own or linked):  # folders left unread
            why = f"over {MAX_ENTRIES:,} entries"
            break
    trusted = all(mtime < started - RACY_NS for _, _, _, mtime, _ in stamps)
    return _Listing(tuple(sorted(names)), tuple(stamps), tuple(dangling), why, trusted, time.monotonic())


def _is_folder(entry: os.DirEntry[str], dangling: list[str]) -> bool:
    try:
        if entry.is_dir():  # follows links
            return True
        if entry.is_symlink() and not os.path.exists(entry.path):
            dangling.append(entry.path)
    except OSError:
        pass
    return False


def _is_file(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_file()
    except OSError:
        return False


def _leads_to_pseudo(entry: os.DirEntry[str]) -> bool:
    """Whether a folder entry is /proc, /sys or /dev or inside one (by path: where devices cannot tell).

    Only a link, or a folder of that name (in `/`, reached through a link to it), can be: the walk is never inside.
    """
    return (entry.is_symlink() or entry.name in ("proc", "sys", "dev")) and _pseudo_path(entry.path)


def _pseudo_path(path: str) -> bool:
    real = os.path.realpath(path)
    return any(real == top or real.startswith(top + "/") for top in PSEUDO_PATHS)


def _pseudo_devices() -> frozenset[int]:
    """The device numbers of the mounted pseudo-filesystems (Linux; empty elsewhere: paths are checked then)."""
    devices = set()
    try:
        lines = Path("/proc/self/mountinfo").read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return frozenset()
    for line in lines:
        fields, _, rest = line.partition(" - ")
        parts, kind = fields.split(), rest.split()[:1]
        if len(parts) > 2 and kind and kind[0] in PSEUDO_TYPES:
            major, _, minor = parts[2].partition(":")
            if major.isdigit() and minor.isdigit():
                devices.add(os.makedev(int(major), int(minor)))
    return frozenset(devices)
