"""Byzantine-robust aggregators: pure functions from stacked client deltas to one delta.

Each takes `deltas`, a (K, D) float32 tensor with one client update per row, and
returns a (D,) float32 tensor. None of them weighs clients by their number of
examples: a Byzantine client could simply lie about it.

- coordinate-wise median and trimmed mean: Yin et al. 2018, "Byzantine-Robust
  Distributed Learning: Towards Optimal Statistical Rates" (ICML).
- Krum: Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine Tolerant
  Gradient Descent" (NeurIPS).
- Multi-Krum: El Mhamdi et al. 2018, "The Hidden Vulnerability of Distributed Learning
  in Byzantium" (ICML).
"""
from __future__ import annotations

import math

import torch


def _check_stacked(deltas: torch.Tensor, name: str) -> int:
    if deltas.ndim != 2 or deltas.shape[0] < 1:
        raise ValueError(f"{name} needs deltas of shape (K, D) with K >= 1; got {tuple(deltas.shape)}")
    return deltas.shape[0]


def coordinate_median(deltas: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median; for even K the mean of the two middle values (as numpy.median).

    torch.median returns the lower middle value for even K, which biases the result
    towards -inf, so we sort and average the two middle rows instead.
    """
    k = _check_stacked(deltas, "coordinate_median")
    ordered = deltas.to(torch.float64).sort(dim=0).values  # (K, D)
    middle = ordered[(k - 1) // 2 : k // 2 + 1]  # one row for odd K, two for even K
    return middle.mean(dim=0).to(deltas.dtype)


def trimmed_mean(deltas: torch.Tensor, *, trim: float) -> torch.Tensor:
    """Coordinate-wise mean after dropping the floor(trim*K) smallest and largest values."""
    k = _check_stacked(deltas, "trimmed_mean")
    if not 0.0 <= trim < 0.5:
        raise ValueError(f"trimmed_mean needs 0 <= trim < 0.5; got trim={trim}")
    cut = math.floor(trim * k)
    if k - 2 * cut < 1:
        raise ValueError(f"trimmed_mean needs K - 2*floor(trim*K) >= 1 values left; "
                         f"got K={k}, trim={trim} (drops {cut} from each end)")
    ordered = deltas.to(torch.float64).sort(dim=0).values  # (K, D)
    return ordered[cut : k - cut].mean(dim=0).to(deltas.dtype)


def _squared_distances(deltas: torch.Tensor) -> torch.Tensor:
    """(K, K) float64 squared L2 distances between rows.

    Differences are taken row by row rather than through the Gram-matrix identity
    |a|^2 + |b|^2 - 2ab: that identity cancels catastrophically when updates are large
    and close together, and its matmul is not exactly symmetric, which would turn true
    ties into arbitrary choices. Here d[i, j] == d[j, i] bit for bit, and identical rows
    are exactly 0 apart.
    """
    rows = deltas.to(torch.float64)  # (K, D)
    return torch.stack([(rows - row).square().sum(dim=1) for row in rows])  # (K, K)


def krum_scores(deltas: torch.Tensor, *, num_byzantine: int) -> torch.Tensor:
    """(K,) float64 Krum scores: each row's summed squared distance to its K - f - 2 nearest others."""
    k = _check_stacked(deltas, "krum")
    if num_byzantine < 0:
        raise ValueError(f"krum needs num_byzantine >= 0; got {num_byzantine}")
    # Scores only need K - f - 2 >= 1 neighbours, but Krum's guarantee (Blanchard et al.,
    # Prop. 1) needs a strict honest majority beyond that: 2f + 2 < K.
    if k < 2 * num_byzantine + 3:
        raise ValueError(f"krum needs K >= 2*num_byzantine + 3 (Blanchard et al.'s 2f + 2 < K); "
                         f"got K={k}, num_byzantine={num_byzantine}")
    neighbours = k - num_byzantine - 2
    dist = _squared_distances(deltas)
    dist.fill_diagonal_(math.inf)  # a row is not its own neighbour
    return dist.sort(dim=1).values[:, :neighbours].sum(dim=1)


def krum(deltas: torch.Tensor, *, num_byzantine: int, multi: int = 1) -> torch.Tensor:
    """The mean of the `multi` rows with the lowest Krum scores (multi=1: Krum itself).

    Ties go to the lowest index so that the choice is deterministic.
    """
    k = _check_stacked(deltas, "krum")
    if not 1 <= multi <= k:
        raise ValueError(f"krum needs 1 <= multi <= K; got multi={multi}, K={k}")
    scores = krum_scores(deltas, num_byzantine=num_byzantine)
    chosen = torch.argsort(scores, stable=True)[:multi]
    return deltas[chosen].to(torch.float64).mean(dim=0).to(deltas.dtype)
