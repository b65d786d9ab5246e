"""The data cache's entries on disk (fedrun/data/cache.py writes and loads them): list them, record
their last use, remove them, and keep the folder under a size cap ($FEDRUN_CACHE_MAX_GB) by evicting
the least recently used.

This lives outside fedrun/data, whose source code is part of every entry's key, so that a change to
pruning does not make every entry stale; and it imports nothing heavy, so `fedrun cache` is quick.

An entry is `<key>.pt` (the data) and `<key>.json` (what it holds: source, clients, seed; absent for
entries written before it was recorded). The data file's mtime is the entry's last use: set when it
is written and on every hit. Writers hold a shared lock (flock) on the folder from creating their
temporary file to the rename, loaders while loading (torch opens the file by name more than once);
removal holds it exclusively. So removal never takes an entry that is being written or loaded, and
a temporary file it finds is one a stopped writer left. A run that has an entry memory-mapped keeps
reading it after removal (POSIX keeps an unlinked file's pages while they are mapped).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fedrun.words import plural

try:
    import fcntl
except ImportError:  # Windows: no flock, so removal cannot tell a live write from a stopped one
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

GB = 10**9  # FEDRUN_CACHE_MAX_GB counts decimal gigabytes, as df -H does
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def cache_dir() -> Path:
    return Path(os.environ.get("FEDRUN_CACHE") or "~/.cache/fedrun/data").expanduser()


@dataclass(frozen=True)
class Entry:
    key: str
    path: Path  # <key>.pt, or a temporary file a stopped writer left
    size: int  # bytes: the data and its description
    last_used: float  # the data file's mtime, seconds since the epoch
    about: dict = field(default_factory=dict)  # source, clients, seed, data: where recorded
    unfinished: bool = False  # a stopped writer's temporary file or a description without data


def entries(folder: Path | None = None) -> list[Entry]:
    """The folder's entries, most recently used first."""
    folder = folder or cache_dir()
    found = []
    for path in folder.glob("*.pt") if folder.is_dir() else []:
        try:
            stat = path.stat()
        except FileNotFoundError:  # removed since the listing
            continue
        about, about_size = _about(path.with_suffix(".json"))
        found.append(Entry(path.stem, path, stat.st_size + about_size, stat.st_mtime, about))
    return sorted(found, key=lambda e: e.last_used, reverse=True)


def _about(path: Path) -> tuple[dict, int]:
    try:
        text = path.read_bytes()
        about = json.loads(text)
        return (about if isinstance(about, dict) else {}), len(text)
    except FileNotFoundError:
        return {}, 0
    except ValueError:  # half-written or foreign: the data is still an entry
        return {}, path.stat().st_size


def write_about(entry: Path, about: dict) -> None:
    """Record what `entry` (<key>.pt) holds beside it, atomically."""
    target = entry.with_suffix(".json")
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps(about, sort_keys=True, default=str))
    os.replace(tmp, target)


def touch(entry: Path) -> None:
    """Mark `entry` used now (its mtime); a read-only cache just keeps its old time."""
    with contextlib.suppress(OSError):
        os.utime(entry)


@contextlib.contextmanager
def locked(folder: Path, *, exclusive: bool) -> Iterator[None]:
    """An advisory lock on the cache folder: shared to write or load an entry, exclusive to remove."""
    try:
        fd: int | None = os.open(folder, os.O_RDONLY)
    except OSError:  # no folder yet (nothing to protect) or no access to it (nothing we could remove)
        fd = None
    try:
        if fd is not None and fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def clear(folder: Path | None = None, *, older_than: float | None = None) -> list[Entry]:
    """Remove the entries last used more than `older_than` seconds ago (all when None), and what
    stopped writers left; returns what was removed."""
    folder = folder or cache_dir()
    with locked(folder, exclusive=True):
        cutoff = None if older_than is None else time.time() - older_than
        doomed = [e for e in entries(folder) if cutoff is None or e.last_used < cutoff]
        return _remove_leftovers(folder) + [e for e in doomed if _remove(e)]


def evict(folder: Path, *, keep: Path, max_bytes: int) -> list[Entry]:
    """Remove the least recently used entries, never `keep`, until the folder holds at most
    `max_bytes`; warn when `keep` alone is larger. Returns what was removed."""
    with locked(folder, exclusive=True):
        removed = _remove_leftovers(folder)
        present = entries(folder)
        total = sum(e.size for e in present)
        for entry in reversed(present):  # least recently used first
            if total <= max_bytes:
                break
            if entry.path != keep and _remove(entry):
                removed.append(entry)
                total -= entry.size
    for entry in removed:
        log.info("data cache: evicted %s (%s, %s) to stay under FEDRUN_CACHE_MAX_GB=%g", entry.key[:12],
                 contents(entry), size_text(entry.size), max_bytes / GB)
    for entry in present:
        if entry.path == keep and entry.size > max_bytes:
            log.warning("data cache: the entry just written, %s (%s, %s), is above FEDRUN_CACHE_MAX_GB=%g on "
                        "its own; kept it", entry.key[:12], contents(entry), size_text(entry.size), max_bytes / GB)
    return removed


def _remove(entry: Entry) -> bool:
    try:
        entry.path.unlink()
    except FileNotFoundError:  # another process removed it first
        return False
    except OSError as e:  # e.g. open elsewhere on Windows, or a read-only folder: keep it, say so
        log.warning("data cache: cannot remove %s (%s)", entry.path, e)
        return False
    entry.path.with_suffix(".json").unlink(missing_ok=True)
    return True


def _remove_leftovers(folder: Path) -> list[Entry]:
    """Temporary files and descriptions without data: only stopped writers leave them, since the
    caller holds the exclusive lock (without flock a live write cannot be told apart: keep them)."""
    if fcntl is None or not folder.is_dir():
        return []
    left = [p for p in folder.glob(".*.tmp")] + [p for p in folder.glob("*.json") if not p.with_suffix(".pt").exists()]
    removed = []
    for path in left:
        with contextlib.suppress(FileNotFoundError):
            stat = path.stat()
            path.unlink()
            removed.append(Entry(path.name, path, stat.st_size, stat.st_mtime, unfinished=True))
    return removed


def max_bytes() -> int | None:
    """The cap FEDRUN_CACHE_MAX_GB sets, in bytes; None when it is unset (no cap)."""
    text = os.environ.get("FEDRUN_CACHE_MAX_GB", "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        from fedrun.core import FedrunError  # imports torch: only on this error

        raise FedrunError(f"FEDRUN_CACHE_MAX_GB: {text!r} is not a size; set a number of gigabytes >= 0 "
                          "(e.g. 20 or 0.5), or unset it for no cap")
    return int(value * GB)


def parse_age(text: str) -> float:
    """'7d', '12h', '30m', '45s', '2w' in seconds."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhdw])", text.strip().lower())
    if match is None:
        from fedrun.core import FedrunError  # imports torch: only on this error

        raise FedrunError(f"--older-than: {text!r} is not an age; use a number and a unit, s, m, h, d or w "
                          "(e.g. 7d, 12h, 30m)")
    return float(match[1]) * _UNITS[match[2]]


def describe(entry: Entry, now: float | None = None) -> str:
    """One line: short key, the data it holds where recorded, size on disk and last use."""
    if entry.unfinished:
        return f"{entry.key}  (left by a stopped write)  {size_text(entry.size)}"
    return (f"{entry.key[:12]}  {contents(entry):<44}  {size_text(entry.size):>9}  "
            f"used {ago((now or time.time()) - entry.last_used)}")


def contents(entry: Entry) -> str:
    """'synthetic, 100,000 clients, seed 0', 'shakespeare input.txt, 156 clients, seed 0'."""
    about, data = entry.about, entry.about.get("data") or {}
    held = [about.get("source", "(contents not recorded)")]
    if data.get("path") or data.get("root"):  # which file or folder a text source read
        held[0] += f" {Path(data.get('path') or data['root']).name}"
    if "clients" in about:
        held.append(f"{about['clients']:,} clients")
    if "seed" in about:
        held.append(f"seed {about['seed']}")
    return ", ".join(held)


def summary(found: list[Entry]) -> str:
    """'2 entries, 2.2 GB' (and the files stopped writers left, where there were any)."""
    whole = [e for e in found if not e.unfinished]
    text = f"{len(whole)} {'entry' if len(whole) == 1 else 'entries'}"
    if len(found) > len(whole):
        text += f" and {plural(len(found) - len(whole), 'left-over file')}"
    return f"{text}, {size_text(sum(e.size for e in found))}"


def size_text(size: float) -> str:
    """'512 B', '1.2 MB', '2.2 GB': decimal units, as FEDRUN_CACHE_MAX_GB counts."""
    if size < 1000:
        return f"{size:.0f} B"
    exponent = min(int(math.log10(size)) // 3, 3)
    return f"{size / 1000**exponent:.1f} {['', 'kB', 'MB', 'GB'][exponent]}"


def ago(seconds: float) -> str:
    for unit, span in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= span:
            return f"{seconds / span:.0f} {unit} ago"
    return "just now"
