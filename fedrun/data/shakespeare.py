"""`data=shakespeare`: one client per speaker of a file in the tinyshakespeare layout
(`SPEAKER:\\nlines\\n\\n`), as in LEAF's Shakespeare benchmark (Caldas et al. 2018)."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from fedrun.components import LocalPath
from fedrun.core import FedrunError
from fedrun.data.text import Documents, TextSource

# Where to get the file when ../shared/data/ is absent (Karpathy's char-rnn data, 1.1 MB).
TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
# Speaker lines look like "First Citizen:" alone on a line.
_SPEAKER = re.compile(rb"^([A-Za-z][A-Za-z '\-.,&]*):$")


class Shakespeare(TextSource):
    def __init__(self, *, path: LocalPath, **keys: Any):
        super().__init__(**keys)
        self.path = path

    def documents(self) -> tuple[Documents, dict[str, Any]]:
        docs, raw = read_shakespeare(self.path)
        source = {"source": "shakespeare", "path": str(Path(self.path).resolve()), "bytes": len(raw),
                  "sha256": hashlib.sha256(raw).hexdigest()}
        return docs, source


def read_shakespeare(path: str) -> tuple[Documents, bytes]:
    """One document per speaker, in order of first appearance, from `SPEAKER:\\nlines\\n\\n`."""
    speeches, raw = read_speeches(path)
    docs: dict[str, list[bytes]] = {}
    for speaker, text in speeches:
        docs.setdefault(speaker, []).append(text)
    return [(name, b"".join(parts)) for name, parts in docs.items()], raw


def read_speeches(path: str) -> tuple[list[tuple[str, bytes]], bytes]:
    """Every speech in order, as (speaker, its lines ending in a newline), and the file's bytes."""
    file = Path(path).expanduser()
    if file.is_dir():
        raise FedrunError(f"data.path: {path} is a directory; expected a file in the tinyshakespeare layout "
                          "(data.path=/path/to/tinyshakespeare.txt; for a folder of text files, data=text_files)")
    if not file.is_file():
        raise FedrunError(f"data.path: file not found: {path} (give data.path=/path/to/tinyshakespeare.txt; "
                          f"download it from {TINYSHAKESPEARE_URL})")
    raw = file.read_bytes()
    speeches = []
    for block in re.split(rb"\r?\n\s*\n", raw):
        lines = block.strip(b"\r\n").splitlines()
        if len(lines) < 2 or not (m := _SPEAKER.match(lines[0].strip())):
            continue
        speeches.append((m.group(1).decode("utf-8", "replace").strip(), b"\n".join(lines[1:]) + b"\n"))
    if not speeches:
        raise FedrunError(f"data.path: no 'SPEAKER:' blocks found in {path}; expected the tinyshakespeare layout")
    return speeches, raw
