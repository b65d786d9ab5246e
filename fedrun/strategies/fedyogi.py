"""FedYogi (Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2): the mean client
delta is a pseudo-gradient for a server-side Yogi (the update rule is in server_opt.py)."""
from __future__ import annotations

from fedrun.strategies.server_opt import FedOptStrategy


class FedYogi(FedOptStrategy):
    kind = "yogi"
