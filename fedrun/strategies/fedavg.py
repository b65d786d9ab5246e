"""FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data"): w <- w + sum_i (n_i / n) delta_i."""
from __future__ import annotations

from fedrun.strategies.server import ServerStrategy


class FedAvg(ServerStrategy):
    """The example-weighted mean of the deltas, added to the global weights (the base's two halves)."""

    secure_sum_weighting = "examples"
    averages_plainly = True  # its step adds the example-weighted mean as is: a LoRA method may replace it
