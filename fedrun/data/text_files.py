"""`data=text_files`: one client per text file of a folder (e.g. one file per user's notes,
mails or chat log), matched by a glob pattern, in sorted order of their paths.

This file and conf/data/text_files.yaml are the whole data source: the worked example of
docs/extending.md.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from fedrun.components import LocalPath
from fedrun.core import FedrunError
from fedrun.data.text import Documents, TextSource


class TextFiles(TextSource):
    def __init__(self, *, path: LocalPath, pattern: str, **keys: Any):
        super().__init__(**keys)
        self.path, self.pattern = path, pattern

    def documents(self) -> tuple[Documents, dict[str, Any]]:
        folder = Path(self.path).expanduser()
        if folder.is_file():
            raise FedrunError(f"data.path: {self.path} is a file; expected a folder of text files, one per client "
                              "(for one file in the tinyshakespeare layout, data=shakespeare)")
        if not folder.is_dir():
            raise FedrunError(f"data.path: directory not found: {self.path} (a folder of text files, one per client)")
        files = sorted(f for f in folder.glob(self.pattern) if f.is_file())
        if not files:
            raise FedrunError(f"data.pattern: no file under {folder} matches {self.pattern!r}")
        digest = hashlib.sha256()
        docs = []
        for file in files:
            name, text = str(file.relative_to(folder)), file.read_bytes()
            digest.update(name.encode() + b"\0" + text)
            docs.append((name, text))
        source = {"source": "text_files", "path": str(folder.resolve()), "pattern": self.pattern,
                  "bytes": sum(len(t) for _, t in docs), "sha256": digest.hexdigest()}
        return docs, source
