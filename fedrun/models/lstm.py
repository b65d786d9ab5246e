"""The character LSTM of LEAF's Shakespeare task and McMahan et al. 2017
("Communication-Efficient Learning of Deep Networks from Decentralized Data"):
an 8-dimensional embedding, two LSTM layers of 256 units, a dense output layer.
"""
from __future__ import annotations

from typing import Annotated

import torch
from torch import nn

from fedrun.components import Range

AtLeastOne = Annotated[int, Range(ge=1)]


class CharLSTM(nn.Module):
    def __init__(self, *, vocab_size: int, seq_len: int, embed_dim: AtLeastOne, hidden_size: AtLeastOne,
                 num_layers: AtLeastOne):
        super().__init__()
        self.seq_len = seq_len
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.lstm = nn.LSTM(embed_dim, hidden_size, num_layers=num_layers, batch_first=True)
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, vocab) logits."""
        out, _ = self.lstm(self.embed(idx))
        return self.head(out)
