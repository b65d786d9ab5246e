"""Privacy accounting: a ledger of DP events, replayed into maintained accountants.

Each round of DP-FedAvg is one subsampled Gaussian mechanism: Poisson sampling of clients
with rate q, then Gaussian noise of standard deviation z * C on a sum of contributions each
bounded by C. That is exactly one step of DP-SGD as opacus accounts it, so the ledger is
replayed into opacus' RDP accountant (Mironov 2017; Mironov et al. 2019) and its PRV
accountant (Gopi et al. 2021, numerical composition of privacy random variables), side by
side: both give valid upper bounds on epsilon; the gap shows how loose RDP is.
"""
from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np

ACCOUNTANTS = ("rdp", "prv")


@dataclass(frozen=True)
class DPEvent:
    """One round's DP mechanism, as the accountant needs it (plus what a reader wants)."""

    round: int
    sample_rate: float
    noise_multiplier: float
    clip_norm: float
    participants: int
    mechanism: str


class Ledger:
    def __init__(self, events: list[DPEvent] | None = None):
        self.events = list(events or [])

    def record(self, event: DPEvent) -> None:
        self.events.append(event)

    def epsilon(self, delta: float, *, accountant: str, extra: DPEvent | None = None) -> float:
        """epsilon at `delta` after every recorded event (and `extra`, to look one round ahead)."""
        events = self.events + ([extra] if extra is not None else [])
        if not events:
            return 0.0
        if any(e.noise_multiplier == 0 for e in events):
            return math.inf
        return epsilon_of(Counter((e.noise_multiplier, e.sample_rate) for e in events), delta, accountant=accountant)

    def state_dict(self) -> dict:
        return {"events": [asdict(e) for e in self.events]}

    def load_state_dict(self, state: dict) -> None:
        self.events = [DPEvent(**e) for e in state["events"]]


def epsilon_of(counts: Counter, delta: float, *, accountant: str) -> float:
    """epsilon at `delta` of composing `n` subsampled Gaussian steps for each (z, q): n in `counts`."""
    if not counts:
        return 0.0
    if any(z == 0 for z, _ in counts):
        return math.inf
    with warnings.catch_warnings():  # opacus warns when the optimal RDP order is at the edge
        warnings.simplefilter("ignore")
        if accountant == "rdp":
            return _rdp_epsilon(counts, delta)
        from opacus.accountants import PRVAccountant  # imported when needed: opacus loads scipy (seconds)

        acc = PRVAccountant()
        acc.history = [(z, q, n) for (z, q), n in counts.items()]  # composition is order-free
        return float(acc.get_epsilon(delta))


def _rdp_epsilon(counts: Counter, delta: float) -> float:
    """opacus' RDP accountant, with the per-step RDP curve of each (z, q) computed once:
    RDP composes by addition, so n identical steps are n times one step's curve."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as rdp_analysis

    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = sum(n * _rdp_curve(z, q) for (z, q), n in counts.items())
    eps, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps)


@lru_cache(maxsize=4096)
def _rdp_curve(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as rdp_analysis

    return np.asarray(rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                               orders=RDPAccountant.DEFAULT_ALPHAS))


def calibrate_noise(*, target_epsilon: float, delta: float, sample_rate: float, rounds: int,
                    accountant: str) -> float:
    """The smallest noise multiplier (to opacus' tolerance) that keeps `rounds` rounds within budget."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=rounds, accountant=accountant))


def default_delta(num_clients: int) -> float:
    """1 / N^1.1: below 1/N, as user-level DP needs (McMahan et al. 2018 use N^-1.1 too)."""
    return 1.0 / num_clients**1.1
