"""Privacy mechanisms: hooks on each client's update and on the aggregate, with accounting."""
from __future__ import annotations

import torch

# Imported before `central` below is defined, so that the name stays the factory (the
# submodule of the same name would otherwise replace it when first imported).
from fedrun.privacy.central import CentralPrivacy


def central(*, num_clients: int, num_params: int, sample_rate: float, rounds: int, seed: int,
            device: torch.device, dropout: float = 0.0, **options) -> CentralPrivacy:
    """`privacy=central_dp` (DP-FedAvg, optionally over secure aggregation)."""
    return CentralPrivacy(num_clients=num_clients, num_params=num_params, sample_rate=sample_rate, rounds=rounds,
                          seed=seed, dropout=dropout, device=device, **options)
