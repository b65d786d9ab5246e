"""Real text split into federated clients, as byte-level next-token windows.

Tokens are raw bytes (vocabulary 256: no tokenizer to download). A client's text is cut
into windows of `seq_len + 1` bytes with stride `seq_len`, so every byte after the first
is a prediction target exactly once; the first windows (by position) are the client's
training data and the last ones its test data, as in LEAF's Shakespeare benchmark
(Caldas et al. 2018, "LEAF: A Benchmark for Federated Settings").
"""
from __future__ import annotations

import hashlib
import os
import re
import sysconfig
from pathlib import Path
from typing import Callable

import torch

from fedrun.core import FedrunError, Stream, numpy_rng
from fedrun.data import partition as partitioners
from fedrun.data.examples import ClientData, FederatedData, PackedClients, Windows, pack, pack_parts

VOCAB_SIZE = 256
PARTITIONS = ("natural", "iid")
# Speaker lines look like "First Citizen:" alone on a line.
_SPEAKER = re.compile(rb"^([A-Za-z][A-Za-z '\-.,&]*):$")
_NOT_STDLIB = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def windows(text: bytes, seq_len: int, *, encode: Callable[[bytes], list[int]] | None = None) -> torch.Tensor:
    """(N, seq_len + 1) windows overlapping by one token, N = (len - 1) // seq_len: bytes (uint8),
    or the ids of `encode` (a model's tokenizer, int32)."""
    if encode is None:
        tokens = torch.frombuffer(bytearray(text), dtype=torch.uint8) if text else torch.empty(0, dtype=torch.uint8)
    else:
        tokens = torch.tensor(encode(text), dtype=torch.int32)
    if len(tokens) < seq_len + 1:
        return torch.empty(0, seq_len + 1, dtype=tokens.dtype)
    return tokens.unfold(0, seq_len + 1, seq_len).clone()


def num_test(n: int, test_fraction: float) -> int:
    """How many of n examples a client holds out: `test_fraction`, at least one when n >= 2,
    never all of them."""
    return 0 if test_fraction == 0 or n < 2 else min(n - 1, max(1, int(n * test_fraction)))


def split_by_position(w: torch.Tensor, test_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """First windows train, last `test_fraction` test (at least one each when possible)."""
    n_test = num_test(len(w), test_fraction)
    return w[: len(w) - n_test], w[len(w) - n_test :]


def read_shakespeare(path: str) -> tuple[list[tuple[str, bytes]], bytes]:
    """One document per speaker, in order of first appearance, from `SPEAKER:\\nlines\\n\\n`."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FedrunError(f"data.path: file not found: {path} (give data.path=/path/to/tinyshakespeare.txt)")
    raw = file.read_bytes()
    speeches: dict[str, list[bytes]] = {}
    for block in re.split(rb"\r?\n\s*\n", raw):
        lines = block.strip(b"\r\n").splitlines()
        if len(lines) < 2 or not (m := _SPEAKER.match(lines[0].strip())):
            continue
        speaker = m.group(1).decode("utf-8", "replace").strip()
        speeches.setdefault(speaker, []).append(b"\n".join(lines[1:]) + b"\n")
    if not speeches:
        raise FedrunError(f"data.path: no 'SPEAKER:' blocks found in {path}; expected the tinyshakespeare layout")
    return [(name, b"".join(parts)) for name, parts in speeches.items()], raw


def read_python_sources(root: str | None) -> tuple[list[tuple[str, bytes]], bytes]:
    """One document per top-level module or package under `root` (tests excluded)."""
    base = Path(root or sysconfig.get_paths()["stdlib"]).expanduser()
    if not base.is_dir():
        raise FedrunError(f"data.root: directory not found: {root}")
    groups: dict[str, list[bytes]] = {}
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
            groups.setdefault(rel.parts[0].removesuffix(".py"), []).append(content)
    if not groups:
        raise FedrunError(f"data.root: no Python sources found under {base}")
    docs = [(name, b"\n".join(groups[name])) for name in sorted(groups)]
    return docs, digest.digest()


def federate(
    docs: list[tuple[str, bytes]],
    *,
    source: dict,
    seq_len: int,
    test_fraction: float,
    min_samples: int,
    partition: str,
    num_clients: int | None,
    max_client_bytes: int | None,
    seed: int,
    insert: Callable[[list[tuple[str, bytes]]], list[tuple[str, bytes]]] | None = None,
    tokenizer: "Tokenizer | None" = None,
) -> FederatedData:
    """Window each document, keep those with >= min_samples windows, split and partition.

    `insert` (the canary audit) edits the truncated documents before they are windowed."""
    docs = [(name, text[:max_client_bytes] if max_client_bytes else text) for name, text in docs]
    if insert is not None:
        docs = insert(docs)
    kept = []
    for name, text in docs:
        w = windows(text, seq_len, encode=tokenizer.encode if tokenizer else None)
        if len(w) >= min_samples:
            train, test = split_by_position(w, test_fraction)
            kept.append(ClientData(name, Windows(train), Windows(test)))
    if not kept:
        raise FedrunError(f"data.min_samples: no client has {min_samples} windows of {seq_len + 1} bytes; lower it")
    if partition == "iid":
        clients = _iid(pack(kept), num_clients or len(kept), seed)
    elif partition == "natural":
        clients = pack(kept)
    else:
        raise FedrunError(f"data.partition: unknown partition '{partition}'; allowed: {', '.join(PARTITIONS)}")
    fingerprint = {
        **source,
        "partition": partition,
        "seq_len": seq_len,
        "clients": len(clients),
        "train_examples": len(clients.train),
        "test_examples": len(clients.test),
        "tokens": tokenizer.name if tokenizer else "bytes",
    }
    vocab_size = tokenizer.vocab_size if tokenizer else VOCAB_SIZE
    return FederatedData(clients, fingerprint, model_dims={"vocab_size": vocab_size, "seq_len": seq_len})


def _iid(natural: PackedClients, num_clients: int, seed: int) -> PackedClients:
    """The same train and test windows, shuffled evenly over `num_clients` clients."""
    train, test = natural.train, natural.test
    if num_clients > len(train):
        raise FedrunError(f"data.num_clients: {num_clients} is more than the {len(train)} training windows")
    rng = numpy_rng(seed, Stream.PARTITION)
    train_parts = partitioners.iid(len(train), num_clients, rng)
    test_parts = partitioners.iid(len(test), num_clients, rng)
    return pack_parts(train, train_parts, test, test_parts, names="iid_")


class Tokenizer:
    """A model's own tokenizer (Hugging Face), read from a local checkpoint directory."""

    def __init__(self, path: str):
        from fedrun.models.hf import _offline

        _offline()
        from transformers import AutoTokenizer  # the [llm] extra

        self.name = str(path)
        self._tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.vocab_size = len(self._tokenizer)

    def encode(self, text: bytes) -> list[int]:
        return self._tokenizer(text.decode("utf-8", "replace"), add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> bytes:
        return self._tokenizer.decode(ids).encode()


def has_tokenizer(path: str) -> bool:
    return any((Path(path) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))


def shakespeare(path: str, *, seq_len: int, test_fraction: float, min_samples: int, partition: str,
               num_clients: int | None, max_client_bytes: int | None, seed: int = 0,
               insert: Callable | None = None, tokenizer: "Tokenizer | None" = None) -> FederatedData:
    """`data=shakespeare`: one client per speaker of a tinyshakespeare-style file."""
    docs, raw = read_shakespeare(path)
    source = {"source": "shakespeare", "path": str(Path(path).resolve()), "bytes": len(raw),
              "sha256": hashlib.sha256(raw).hexdigest()}
    return federate(docs, source=source, seed=seed, seq_len=seq_len, test_fraction=test_fraction,
                    min_samples=min_samples, partition=partition, num_clients=num_clients,
                    max_client_bytes=max_client_bytes, insert=insert, tokenizer=tokenizer)


def pystdlib(root: str | None, *, seq_len: int, test_fraction: float, min_samples: int, partition: str,
               num_clients: int | None, max_client_bytes: int | None, seed: int = 0,
               insert: Callable | None = None, tokenizer: "Tokenizer | None" = None) -> FederatedData:
    """`data=pystdlib`: one client per top-level module/package of the interpreter's stdlib."""
    docs, digest = read_python_sources(root)
    source = {"source": "pystdlib", "path": root or sysconfig.get_paths()["stdlib"],
              "bytes": sum(len(t) for _, t in docs), "sha256": digest.hex()}
    return federate(docs, source=source, seed=seed, seq_len=seq_len, test_fraction=test_fraction,
                    min_samples=min_samples, partition=partition, num_clients=num_clients,
                    max_client_bytes=max_client_bytes, insert=insert, tokenizer=tokenizer)
