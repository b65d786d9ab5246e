"""Privacy accounting: a ledger of DP events, replayed into maintained accountants.

Each round of DP-FedAvg is one subsampled Gaussian mechanism: Poisson sampling of clients
with rate q, then Gaussian noise of standard deviation z * C on a sum of contributions each
bounded by C. That is exactly one step of DP-SGD as opacus accounts it, so the ledger is
replayed into opacus' RDP accountant (Mironov 2017; Mironov et al. 2019) and its PRV
accountant (Gopi et al. 2021, numerical composition of privacy random variables), side by
side: both give valid upper bounds on epsilon; the gap shows how loose RDP is.

Epsilon is reported >= 0. Both conversions give the epsilon of the privacy curve at delta,
which is negative when delta exceeds the mechanism's total variation distance (heavy noise,
few rounds, the large delta 1/N^1.1 of a small population): the mechanism is then already
(0, delta)-DP, which is what is reported.
"""
from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from fedrun.core import FedrunError

ACCOUNTANTS = ("rdp", "prv")
MAX_NOISE_MULTIPLIER = 1e6  # opacus' get_noise_multiplier gives up above this
PRV_EPS_ERROR = 0.01  # opacus' PRV epsilon is an upper bound: its estimate plus this error


@dataclass(frozen=True)
class DPEvent:
    """`steps` compositions of one subsampled Gaussian mechanism, as the accountant needs them
    (plus what a reader wants): one round of central DP (a step), or one client's DP-SGD steps in
    a round (local DP, one ledger per client)."""

    round: int
    sample_rate: float  # q: Poisson sampling rate of the clients (central) or of the client's examples (local)
    noise_multiplier: float  # z: noise std / clip norm
    clip_norm: float
    participants: int  # clients in the round's sum (central); 1 for a client's own steps (local)
    mechanism: str
    steps: int = 1  # a checkpoint's events from before local DP recorded events have none: 1 each
    canaries: int = 0  # of the participants, audit=epsilon's canary clients


class Ledger:
    """The DP events of one accountant (the run's for central DP, one client's for local DP),
    and their composition (z, q) -> steps, kept as they are recorded so epsilon costs no replay."""

    def __init__(self, events: list[DPEvent] | None = None):
        self.events: list[DPEvent] = []
        self.counts: Counter = Counter()
        for event in events or []:
            self.record(event)

    def record(self, event: DPEvent) -> None:
        self.events.append(event)
        self.counts[(event.noise_multiplier, event.sample_rate)] += event.steps

    def epsilon(self, delta: float, *, accountant: str, extra: DPEvent | None = None) -> float:
        """epsilon at `delta` after every recorded event (and `extra`, to look one round ahead)."""
        counts = self.counts
        if extra is not None:
            counts = counts.copy()
            counts[(extra.noise_multiplier, extra.sample_rate)] += extra.steps
        return epsilon_of(counts, delta, accountant=accountant)

    def state_dict(self) -> dict:
        return {"events": [asdict(e) for e in self.events]}

    def load_state_dict(self, state: dict) -> None:
        self.events, self.counts = [], Counter()
        for event in state["events"]:
            self.record(DPEvent(**event))


def epsilon_of(counts: Counter, delta: float, *, accountant: str) -> float:
    """epsilon at `delta` of composing `n` subsampled Gaussian steps for each (z, q): n in `counts`."""
    if not counts:
        return 0.0
    if any(z == 0 for z, _ in counts):
        return math.inf
    with warnings.catch_warnings():  # opacus warns when the optimal RDP order is at the edge
        warnings.simplefilter("ignore")
        eps = _rdp_epsilon(counts, delta) if accountant == "rdp" else _prv_epsilon(counts, delta)
    # (eps < 0, delta)-DP implies (0, delta)-DP: see the module docstring for when eps < 0.
    return max(eps, 0.0)


def _prv_epsilon(counts: Counter, delta: float) -> float:
    from opacus.accountants import PRVAccountant  # imported when needed: opacus loads scipy (seconds)

    acc = PRVAccountant()
    acc.history = [(z, q, n) for (z, q), n in counts.items()]  # composition is order-free
    with numpy_fft():
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

    with warnings.catch_warnings(), numpy_fft():
        warnings.simplefilter("ignore")
        try:
            return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                              sample_rate=sample_rate, steps=rounds, accountant=accountant))
        except ValueError as e:  # opacus: "The privacy budget is too low." once z passes 1e6
            reason = (f"even noise multiplier {MAX_NOISE_MULTIPLIER:g} spends more" if "too low" in str(e)
                      else str(e))
            least = rdp_epsilon_floor(delta) if accountant == "rdp" else PRV_EPS_ERROR
            floor = (f" (the {accountant} accountant certifies no less than about {least:.3g} at this delta)"
                     if target_epsilon < least else "")
            raise FedrunError(f"privacy.target_epsilon: {target_epsilon:g} cannot be reached at delta {delta:.3g} "
                              f"over {rounds} rounds with sample rate {sample_rate:.3g}: {reason}{floor}; "
                              "allowed: a larger target_epsilon or delta, or fewer rounds") from e


def rdp_epsilon_floor(delta: float) -> float:
    """The least epsilon the RDP accountant can certify at `delta`, whatever the noise: its
    conversion of RDP 0 over opacus' orders (at most 63), 0.103 at delta 1e-5."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as rdp_analysis

    orders = RDPAccountant.DEFAULT_ALPHAS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eps, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=np.zeros(len(orders)), delta=delta)
    return max(float(eps), 0.0)


def default_delta(num_clients: int) -> float:
    """1 / N^1.1: below 1/N, as user-level DP needs (McMahan et al. 2018 use N^-1.1 too)."""
    return 1.0 / num_clients**1.1


class NumpyFFT:
    """A scipy.fft backend that transforms with numpy.fft, which keeps no plans.

    scipy.fft (pocketfft) caches the plans of its 16 latest transform lengths, each O(length)
    and several times the data for a length with a large prime factor (Bluestein). opacus'
    PRV accountant transforms a grid whose length grows with the rounds and is new at every
    evaluation, so the cache held the plans of the last 16 evaluations, never used again:
    +330 MB of RSS after 1000 rounds of central_dp (PRV every 50), +1.7 GB after 4000.
    The epsilons are bit-identical to scipy's (tests/test_accounting_memory.py).
    """

    __ua_domain__ = "numpy.scipy.fft"
    SCIPY_ONLY = ("overwrite_x", "workers", "plan")

    @staticmethod
    def __ua_function__(method: Callable, args: tuple, kwargs: dict[str, Any]) -> Any:
        transform = getattr(np.fft, method.__name__, None)
        if transform is None or len(args) > 4:  # beyond (x, n, axis, norm): left to scipy
            return NotImplemented
        return transform(*args, **{k: v for k, v in kwargs.items() if k not in NumpyFFT.SCIPY_ONLY})


@contextmanager
def numpy_fft() -> Iterator[None]:
    """scipy.fft (and scipy.signal's FFT convolution) computed by numpy.fft inside the block."""
    import scipy.fft

    with scipy.fft.set_backend(NumpyFFT):
        yield
