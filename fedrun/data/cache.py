"""Prepared federated data cached on disk, so a second run with the same data starts fast.

An entry is keyed by a sha256 of everything that determines the data: the data config (less
`cache`), the seed, the identity of every source it reads (a file's resolved path, size and
mtime; a folder's files' too; and what the source declares it reads besides, its
`implicit_sources()`), the tokenizer's folder if any, FORMAT_VERSION, the source
code of fedrun/data and the torch and numpy versions (whose random streams generate data), so
a change to how data is made never serves stale data.
Entries live in $FEDRUN_CACHE, default ~/.cache/fedrun/data, one `<key>.pt` file each
(`torch.save` of the packed tensors, offsets, names and fingerprint). They are written to a
temporary file and renamed, so a reader sees a whole entry or none; they are loaded with
`weights_only=True` and memory-mapped, so only the pages a run touches are read. An entry
that cannot be read is rebuilt (and rewritten) with a warning, never a crash; so is one that
cannot be written. Beside each entry, `<key>.json` says what data it holds. Listing, last use,
removal (`fedrun cache list|clear`), the size cap FEDRUN_CACHE_MAX_GB and the folder lock that makes
removal safe beside running runs are in fedrun/cache_entries.py.
Another process of the run (a Ray actor) loads the same entry again with `reload(entry_of(data))`:
memory-mapped, so a machine holds the pages once however many processes read them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedrun import cache_entries
from fedrun.cache_entries import cache_dir as cache_dir  # its home is there; tests and callers find it here
from fedrun.data.examples import FederatedData, Labelled, PackedClients, SourceRows, Windows, pack

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the entry layout changes
_DATA_CODE = Path(__file__).resolve().parent  # fedrun/data: its code is part of every key
_NEVER_DATA = {"__pycache__", "site-packages", "dist-packages", ".git"}  # folders no source reads


def data_key(*, data: dict, seed: int, tokenizer: str | None = None,
             implicit_sources: list[dict[str, Any]] | None = None) -> str:
    """sha256 (hex) of everything that determines the prepared data; `implicit_sources` are the
    identities of what the source reads that no key of `data` names (its `implicit_sources()`)."""
    recipe = {
        "format": FORMAT_VERSION,
        "code": _tree_digest(_DATA_CODE, suffix=".py", content=True),
        "versions": [torch.__version__, np.__version__],  # their random streams make the data
        "data": data,
        "seed": seed,
        "sources": sources(data) + list(implicit_sources or []),
        "tokenizer": None if tokenizer is None else path_identity(tokenizer),
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()


def path_identity(path: str | os.PathLike) -> dict[str, Any]:
    """What tells one version of a file or folder from another without reading it all:
    the resolved path and size and mtime of the file (or of every file under the folder)."""
    resolved = Path(path).expanduser().resolve()
    if resolved.is_file():
        stat = resolved.stat()
        return {"path": str(resolved), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if resolved.is_dir():
        return {"path": str(resolved), "tree": _tree_digest(resolved)}
    return {"path": str(resolved), "missing": True}


def _tree_digest(root: Path, *, suffix: str = "", content: bool = False) -> str:
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _NEVER_DATA)
        for name in sorted(f for f in filenames if f.endswith(suffix)):
            path = Path(dirpath, name)
            stat = path.stat()
            digest.update(f"{path.relative_to(root)}\0{stat.st_size}\0".encode())
            digest.update(path.read_bytes() if content else str(stat.st_mtime_ns).encode())
    return digest.hexdigest()


def load_or_build(key: str, build: Callable[[], FederatedData], *, about: dict | None = None) -> FederatedData:
    """The cached data for `key`, or `build()` (then cached, `about` and its number of clients recorded
    beside it, and the cache kept under FEDRUN_CACHE_MAX_GB) when there is none or it is unreadable."""
    path = cache_dir() / f"{key}.pt"
    cap = cache_entries.max_bytes()  # a bad value fails here, not after a long build
    start = time.perf_counter()
    if path.exists():
        try:
            with cache_entries.locked(path.parent, exclusive=False):  # not removed while torch opens it
                data = load(path)
                cache_entries.touch(path)  # its last use, for eviction and --older-than
            data.provenance = {"cache": "hit", "entry": str(path), "seconds": time.perf_counter() - start}
            return data
        except FileNotFoundError:  # removed since exists(): a plain miss
            pass
        except Exception as e:  # any unreadable entry is rebuilt; the run must not fail for it
            log.warning("data cache: entry %s is unreadable (%s: %s); rebuilding it", path, type(e).__name__, e)
    data = build()
    try:
        save(data, path, about={**(about or {}), "clients": data.num_clients})
        if cap is not None:
            cache_entries.evict(path.parent, keep=path, max_bytes=cap)
    except OSError as e:
        log.warning("data cache: cannot write %s (%s); continuing without caching", path, e)
    data.provenance = {"cache": "miss", "entry": str(path), "seconds": time.perf_counter() - start}
    return data


def save(data: FederatedData, path: Path, *, about: dict | None = None) -> None:
    """Write `data` to `path` atomically (a temporary file in the same folder, then a rename), and
    `about` (what it holds) beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    clients = pack(data.clients)
    state = {"format": FORMAT_VERSION, "train": _examples_state(clients.train), "test": _examples_state(clients.test),
             "train_offsets": torch.from_numpy(clients.train_offsets),
             "test_offsets": torch.from_numpy(clients.test_offsets),
             "names": clients.names, "fingerprint": data.fingerprint, "model_dims": data.model_dims}
    if data.source_rows is not None:
        state["source_rows"] = {k: torch.from_numpy(v) for k, v in vars(data.source_rows).items()}
    with cache_entries.locked(path.parent, exclusive=False):  # removal waits, and leaves our temporary file
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(state, f)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        if about is not None:
            cache_entries.write_about(path, about)


def load(path: Path) -> FederatedData:
    """An entry written by `save`; raises if it is not one (wrong format, truncated, inconsistent)."""
    state = torch.load(path, weights_only=True, mmap=True)
    if state.get("format") != FORMAT_VERSION:
        raise ValueError(f"format {state.get('format')!r}, expected {FORMAT_VERSION}")
    clients = PackedClients(_examples(state["train"]), _examples(state["test"]),
                            train_offsets=state["train_offsets"].numpy(), test_offsets=state["test_offsets"].numpy(),
                            names=state["names"])
    if np.any(np.diff(clients.train_offsets) < 0) or np.any(np.diff(clients.test_offsets) < 0):
        raise ValueError("offsets are not increasing")
    rows = state.get("source_rows")
    source_rows = None if rows is None else SourceRows(**{k: v.numpy() for k, v in rows.items()})
    return FederatedData(clients, state["fingerprint"], model_dims=state["model_dims"], source_rows=source_rows)


def entry_of(data: FederatedData) -> dict[str, Any] | None:
    """Where another process can load `data` again: the cache entry it was loaded from or
    written to, with what `reload` checks the file against; None for data not in the cache."""
    path = data.provenance.get("entry")
    if path is None or data.provenance.get("cache") not in ("hit", "miss"):
        return None
    try:
        size = Path(path).stat().st_size
    except OSError:  # a miss whose entry could not be written, or one removed since
        return None
    return {"path": str(Path(path).resolve()), "size": size, "fingerprint": data.fingerprint,
            "clients": data.num_clients}


def reload(entry: dict[str, Any]) -> FederatedData | None:
    """`entry_of`'s data loaded (memory-mapped) in this process; None where this machine has no
    such file (another node), or it is no longer that entry (removed, or not readable)."""
    path = Path(entry["path"])
    try:
        if path.stat().st_size != entry["size"]:
            return None
        with cache_entries.locked(path.parent, exclusive=False):  # not removed while torch opens it
            data = load(path)
    except Exception:  # whatever went wrong, the caller sends the data itself instead
        return None
    # The file name is the key of everything that made the data: the same name, size and
    # fingerprint is the same data (entries are replaced whole, never edited in place).
    if data.fingerprint != entry["fingerprint"] or data.num_clients != entry["clients"]:
        return None
    data.provenance = {"cache": "reloaded", "entry": str(path)}
    return data


def _examples_state(examples) -> dict[str, torch.Tensor]:
    if isinstance(examples, Windows):
        mask = {} if examples.mask is None else {"mask": examples.mask.contiguous()}
        return {"tokens": examples.tokens.contiguous(), **mask}
    return {"features": examples.features.contiguous(), "labels": examples.labels.contiguous()}


def _examples(state: dict[str, torch.Tensor]):
    if "tokens" in state:
        return Windows(state["tokens"], state.get("mask"))
    return Labelled(state["features"], state["labels"])


def sources(data: dict) -> list[dict[str, Any]]:
    """Identities of the files and folders a data config names: its string values that name
    existing paths (data.path, data.root)."""
    return [path_identity(v) for k, v in data.items()
            if k != "_target_" and isinstance(v, str) and Path(v).expanduser().exists()]
