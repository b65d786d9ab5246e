"""Privacy mechanisms: hooks on each client's update and on the aggregate, with accounting."""
from __future__ import annotations

import torch

from fedrun.privacy.central import CentralPrivacy


def central(*, num_clients: int, num_params: int, sample_rate: float, rounds: int, seed: int,
            device: torch.device, **options) -> CentralPrivacy:
    """`privacy=central_dp` and `privacy=secure_agg` (central, noise_multiplier 0)."""
    return CentralPrivacy(num_clients=num_clients, num_params=num_params, sample_rate=sample_rate, rounds=rounds,
                          seed=seed, device=device, **options)
