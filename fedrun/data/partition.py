"""Partitioners: which client holds which example.

Each returns one index array per client; every example lands in exactly one client.
The natural split (one client per speaker or module) comes from the data source itself.
"""
from __future__ import annotations

import numpy as np


def iid(num_examples: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle the examples and deal them out evenly: client sizes differ by at most one."""
    return np.array_split(rng.permutation(num_examples), num_clients)
