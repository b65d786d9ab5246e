"""A client's examples as tensors ready to slice, and the federated data set they form.

Two kinds of examples share one small interface (`len`, indexing, `inputs_targets`), so local
training and evaluation are the same code for language modelling and classification:
- `Windows`: (N, T + 1) byte windows; inputs are the first T tokens, targets the last T. With
  a `mask` (instruction examples), only the targets it marks count: the response's tokens,
  never the prompt's or the padding (their targets read IGNORE, which the losses skip).
- `Labelled`: (N, F) features with (N,) class labels.
Models map inputs to logits whose last dimension is the class (or vocabulary) axis.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import torch

IGNORE = -100  # a target that no loss or metric counts (torch's cross_entropy ignore_index)


@dataclass
class Windows:
    tokens: torch.Tensor  # (N, T + 1) uint8 bytes, or int32 ids of a model's tokenizer
    mask: torch.Tensor | None = None  # (N, T + 1) bool: True where the token is a target that counts

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, idx) -> Windows:
        return Windows(self.tokens[idx], None if self.mask is None else self.mask[idx])

    def inputs_targets(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) int64 inputs and next-token targets (IGNORE where the mask says so)."""
        tokens = self.tokens.to(device, non_blocking=True).long()
        if self.mask is None:
            return tokens[:, :-1], tokens[:, 1:]
        counts = self.mask[:, 1:].to(device, non_blocking=True)
        return tokens[:, :-1], tokens[:, 1:].masked_fill(~counts, IGNORE)


@dataclass
class Labelled:
    features: torch.Tensor  # (N, F) float32
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx) -> Labelled:
        return Labelled(self.features[idx], self.labels[idx])

    def inputs_targets(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features.to(device, non_blocking=True), self.labels.to(device, non_blocking=True)


Examples = Windows | Labelled


def concat(parts: Sequence[Examples]) -> Examples:
    """Examples of one kind joined in order."""
    # The first part's kind is every part's kind (mypy does not narrow a sequence by its first item).
    if isinstance(parts[0], Windows):
        windows = cast("Sequence[Windows]", parts)
        masks = [p.mask for p in windows]
        if all(m is None for m in masks):
            return Windows(torch.cat([p.tokens for p in windows]))
        if any(m is None for m in masks):
            raise ValueError("concat: instruction examples (with a loss mask) and plain windows cannot be mixed")
        return Windows(torch.cat([p.tokens for p in windows]), torch.cat(cast("list[torch.Tensor]", masks)))
    labelled = cast("Sequence[Labelled]", parts)
    return Labelled(torch.cat([p.features for p in labelled]), torch.cat([p.labels for p in labelled]))


@dataclass
class ClientData:
    name: str
    train: Examples
    test: Examples

    @property
    def num_examples(self) -> int:
        return len(self.train)


class PackedClients(Sequence[ClientData]):
    """Every client's examples packed in one `Examples` per split, client after client.

    Client k is `train[train_offsets[k]:train_offsets[k + 1]]` (and likewise for test), handed
    out as a `ClientData` of views when asked for. 100,000 clients as separate objects would
    cost four tensors and three Python objects each (and a copy to gather the test set); packed
    they cost two (K + 1,) offset arrays, and the test set is one tensor already.
    Names are a list, or a prefix that client k's index completes (`synthetic_` -> `synthetic_7`).
    A client's views share their pack's storage: pickling one pickles the whole pack.
    """

    def __init__(self, train: Examples, test: Examples, *, train_offsets: np.ndarray,
                 test_offsets: np.ndarray, names: Sequence[str] | str):
        self.train, self.test = train, test
        self.train_offsets = np.asarray(train_offsets, dtype=np.int64)
        self.test_offsets = np.asarray(test_offsets, dtype=np.int64)
        self.names = names if isinstance(names, str) else list(names)
        k = len(self.train_offsets) - 1
        if (len(self.test_offsets) - 1 != k or self.train_offsets[-1] != len(train)
                or self.test_offsets[-1] != len(test) or (not isinstance(names, str) and len(names) != k)):
            raise ValueError("packed clients: offsets, names and examples do not agree")

    def __len__(self) -> int:
        return len(self.train_offsets) - 1

    def __getitem__(self, k: int) -> ClientData:  # type: ignore[override]
        if not -len(self) <= k < len(self):
            raise IndexError(f"client {k} of {len(self)}")
        k %= len(self)
        (a, b), (c, d) = self.train_offsets[k : k + 2].tolist(), self.test_offsets[k : k + 2].tolist()
        return ClientData(self.name(k), self.train[a:b], self.test[c:d])

    def __iter__(self) -> Iterator[ClientData]:
        return (self[k] for k in range(len(self)))

    def name(self, k: int) -> str:
        return f"{self.names}{k}" if isinstance(self.names, str) else self.names[k]

    def sizes(self, split: str = "train") -> np.ndarray:
        """(K,) int64 examples per client in `split`."""
        return np.diff(self.train_offsets if split == "train" else self.test_offsets)


def pack(clients: Sequence[ClientData]) -> PackedClients:
    """Separate clients packed into one tensor per split (same order, names and examples)."""
    if isinstance(clients, PackedClients):
        return clients
    offsets = [np.concatenate([[0], np.cumsum([len(getattr(c, split)) for c in clients])])
               for split in ("train", "test")]
    return PackedClients(concat([c.train for c in clients]), concat([c.test for c in clients]),
                         train_offsets=offsets[0], test_offsets=offsets[1], names=[c.name for c in clients])


def pack_parts(train: Examples, train_parts: Sequence[np.ndarray], test: Examples,
               test_parts: Sequence[np.ndarray], *, names: Sequence[str] | str) -> PackedClients:
    """Clients that hold the examples at given indices (one index array per client and split),
    gathered in one copy per split."""
    def gather(examples: Examples, parts: Sequence[np.ndarray]) -> tuple[Examples, np.ndarray]:
        order = np.concatenate(parts) if len(parts) else np.empty(0, dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])])
        return examples[torch.from_numpy(order.astype(np.int64))], offsets

    (tr, tr_off), (te, te_off) = gather(train, train_parts), gather(test, test_parts)
    return PackedClients(tr, te, train_offsets=tr_off, test_offsets=te_off, names=names)


@dataclass
class SourceRows:
    """Which rows of a table file each client holds in each split (data=table's instruction
    examples): row numbers counted from 0 in the file's order (a folder's files concatenated in
    name order; a CSV's header not counted), each client's in one array per split, packed."""
    train: np.ndarray  # int64 row numbers, client after client
    train_offsets: np.ndarray  # (K + 1,): client k's are train[train_offsets[k]:train_offsets[k + 1]]
    test: np.ndarray
    test_offsets: np.ndarray

    @classmethod
    def of(cls, train: Sequence[np.ndarray], test: Sequence[np.ndarray]) -> SourceRows:
        def packed(parts: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
            flat = np.concatenate(parts).astype(np.int64) if len(parts) else np.empty(0, dtype=np.int64)
            return flat, np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)

        (tr, tr_off), (te, te_off) = packed(train), packed(test)
        return cls(tr, tr_off, te, te_off)

    def client(self, k: int, split: str) -> np.ndarray:
        rows, offsets = (self.train, self.train_offsets) if split == "train" else (self.test, self.test_offsets)
        return rows[offsets[k]:offsets[k + 1]]


@dataclass
class FederatedData:
    clients: Sequence[ClientData]  # a list, or PackedClients (what fedrun's data sources build)
    fingerprint: dict
    # Keyword arguments every model of this data needs, e.g. vocab_size and seq_len.
    model_dims: dict = field(default_factory=dict)
    # The table rows behind each client's examples (partition.csv records them), where a source has rows.
    source_rows: SourceRows | None = None
    # How this data was obtained (cache hit or miss, seconds): not part of what the data is.
    provenance: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    def client_sizes(self, split: str = "train") -> np.ndarray:
        """(K,) int64 examples per client in `split` (train: what samplers weight by), without
        making each client's views (100,000 of them take seconds)."""
        if isinstance(self.clients, PackedClients):
            return self.clients.sizes(split)
        return np.array([len(getattr(c, split)) for c in self.clients], dtype=np.int64)

    def client_names(self) -> list[str]:
        if isinstance(self.clients, PackedClients):
            return [self.clients.name(k) for k in range(len(self.clients))]
        return [c.name for c in self.clients]

    def test_examples(self) -> Examples:
        """The union of every client's test examples (packed: the test pack itself, no copy)."""
        if isinstance(self.clients, PackedClients):
            return self.clients.test
        return concat([c.test for c in self.clients])
