"""A client's examples as tensors ready to slice, and the federated data set they form.

Two kinds of examples share one small interface (`len`, indexing, `inputs_targets`), so local
training and evaluation are the same code for language modelling and classification:
- `Windows`: (N, T + 1) byte windows; inputs are the first T tokens, targets the last T.
- `Labelled`: (N, F) features with (N,) class labels.
Models map inputs to logits whose last dimension is the class (or vocabulary) axis.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Union

import torch


@dataclass
class Windows:
    tokens: torch.Tensor  # (N, T + 1) uint8 bytes, or int32 ids of a model's tokenizer

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, idx) -> "Windows":
        return Windows(self.tokens[idx])

    def inputs_targets(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) int64 inputs and next-token targets."""
        tokens = self.tokens.to(device, non_blocking=True).long()
        return tokens[:, :-1], tokens[:, 1:]


@dataclass
class Labelled:
    features: torch.Tensor  # (N, F) float32
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx) -> "Labelled":
        return Labelled(self.features[idx], self.labels[idx])

    def inputs_targets(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features.to(device, non_blocking=True), self.labels.to(device, non_blocking=True)


Examples = Union[Windows, Labelled]


def concat(parts: Sequence[Examples]) -> Examples:
    """Examples of one kind joined in order."""
    if isinstance(parts[0], Windows):
        return Windows(torch.cat([p.tokens for p in parts]))
    return Labelled(torch.cat([p.features for p in parts]), torch.cat([p.labels for p in parts]))


@dataclass
class ClientData:
    name: str
    train: Examples
    test: Examples

    @property
    def num_examples(self) -> int:
        return len(self.train)


@dataclass
class FederatedData:
    clients: list[ClientData]
    fingerprint: dict
    # Keyword arguments every model of this data needs, e.g. vocab_size and seq_len.
    model_dims: dict = field(default_factory=dict)

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    def test_examples(self) -> Examples:
        return concat([c.test for c in self.clients])
