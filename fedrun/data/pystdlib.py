"""`data=pystdlib`: one client per top-level module or package of a folder of Python sources,
by default the running interpreter's standard library (tests excluded). Needs no file."""
from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from pathlib import Path
from typing import Any

from fedrun.components import LocalPath
from fedrun.core import FedrunError
from fedrun.data.text import Documents, TextSource

_NOT_STDLIB = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


class PyStdlib(TextSource):
    def __init__(self, *, root: LocalPath | None, **keys: Any):
        super().__init__(**keys)
        self.root = root  # None: this interpreter's stdlib

    def documents(self) -> tuple[Documents, dict[str, Any]]:
        docs, digest = read_python_sources(self.root)
        source = {"source": "pystdlib", "path": self.root or sysconfig.get_paths()["stdlib"],
                  "bytes": sum(len(t) for _, t in docs), "sha256": digest.hex()}
        return docs, source

    def implicit_sources(self) -> list[dict[str, Any]]:
        return stdlib_identity(self.root)


def stdlib_identity(root: str | None) -> list[dict[str, Any]]:
    """root=null reads this interpreter's stdlib, which changes only with the Python version:
    that is its identity (walking it would cost seconds)."""
    if root is not None:
        return []
    return [{"stdlib": sysconfig.get_paths()["stdlib"], "python": sys.version}]


def read_python_sources(root: str | None) -> tuple[Documents, bytes]:
    """One document per top-level module or package under `root` (tests excluded), and a
    sha256 of every file read."""
    files, digest = python_files(root)
    groups: dict[str, list[bytes]] = {}
    for rel, content in files:
        groups.setdefault(module_of(rel), []).append(content)
    docs = [(name, b"\n".join(groups[name])) for name in sorted(groups)]
    return docs, digest


def python_files(root: str | None) -> tuple[list[tuple[Path, bytes]], bytes]:
    """Every .py file under `root` (default: this interpreter's stdlib; tests excluded) in walk
    order, as (path relative to root, content), and a sha256 of them all."""
    base = Path(root or sysconfig.get_paths()["stdlib"]).expanduser()
    if not base.is_dir():
        raise FedrunError(f"data.root: directory not found: {root}")
    files = []
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if d not in _NOT_STDLIB)
        for fname in sorted(filenames):
            if not fname.endswith(".py") or fname.startswith("test_"):
                continue
            path = Path(dirpath, fname)
            rel = path.relative_to(base)
            content = path.read_bytes()
            digest.update(str(rel).encode() + b"\0" + content)
            files.append((rel, content))
    if not files:
        raise FedrunError(f"data.root: no Python sources found under {base}")
    return files, digest.digest()


def module_of(rel: Path) -> str:
    """The top-level module or package a file (relative to the root) belongs to: its client."""
    return rel.parts[0].removesuffix(".py")
