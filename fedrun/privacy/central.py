"""User-level central privacy: clipping on the client, then a (secure) sum and Gaussian noise.

DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent Language
Models"): each client clips its update to L2 norm C; the server adds N(0, (z C)^2) to the
sum of the clipped updates and divides by the expected number of clients q N (a fixed
denominator, so one client's presence changes the result by at most C / (q N)). With
`adaptive`, C follows a target quantile of the update norms (Andrew et al. 2021,
"Differentially Private Learning with Adaptive Clipping"), the noisy count of unclipped
clients being charged to the same budget: the update noise is z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2.
With `secure_agg`, the sum is computed by secure aggregation (Bonawitz et al. 2017): the
server learns only the sum of the clipped, fixed-point updates of the round's survivors (the
clip norm bounds every coordinate, so it is the fixed-point range), and with `adaptive` the
count of unclipped clients, summed inside the same masked vector. A round whose cohort is
below `secagg_min_clients` (or whose survivors are below the Shamir threshold) is skipped; that
skip depends on who was sampled, so its probability is charged to delta (`secagg_skips`).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Annotated, Any

import torch

from fedrun.components import Range
from fedrun.core import ClientUpdate, FedrunError, RoundContext, Stream
from fedrun.privacy.accounting import DPEvent, Ledger, calibrate_noise, default_delta
from fedrun.privacy.keys import (
    Accountant,
    ClipNorm,
    Delta,
    NoiseMultiplier,
    NoiseSource,
    SecaggBits,
    SecaggMinClients,
    SecaggThreshold,
    TargetEpsilon,
)
from fedrun.privacy.masking import SecAggAbort
from fedrun.privacy.randomness import stream_generator, stream_seed
from fedrun.privacy.secagg_skips import calibration_delta, epsilon_with_skips, flip_probability
from fedrun.privacy.secure_round import SecureSumRound, most_bits, shamir_threshold

log = logging.getLogger(__name__)


class CentralPrivacy:
    """One object owns the clip norm: the one clients clip to is the one the noise is scaled by."""

    dp_level = "user"  # clipping bounds each client's whole contribution
    secure_sum = "secure_agg"  # its own key decides whether the sum is secure

    def __init__(self, *, clip_norm: ClipNorm, noise_multiplier: NoiseMultiplier | None,
                 target_epsilon: TargetEpsilon | None, delta: Delta | None, accountant: Accountant,
                 stop_at_budget: bool, adaptive: bool, target_quantile: Annotated[float, Range(ge=0, le=1)],
                 clip_lr: Annotated[float, Range(ge=0)], clip_count_stddev: Annotated[float, Range(gt=0)] | None,
                 secure_agg: bool, secagg_bits: SecaggBits | None, secagg_threshold: SecaggThreshold,
                 secagg_min_clients: SecaggMinClients, log_client_stats: bool, noise_source: NoiseSource,
                 num_clients: int, num_params: int, sample_rate: float, rounds: int, seed: int,
                 dropout: float = 0.0, device: torch.device = torch.device("cpu")):
        self.clip_norm = clip_norm
        self.num_params = num_params
        self.num_clients, self.sample_rate, self.seed = num_clients, sample_rate, seed
        self.expected_clients = sample_rate * num_clients  # the fixed denominator
        self.delta = delta if delta is not None else default_delta(num_clients)
        self.accountant = accountant
        self.target_epsilon, self.stop_at_budget = target_epsilon, stop_at_budget
        self.adaptive, self.target_quantile, self.clip_lr = adaptive, target_quantile, clip_lr
        self.secure_agg, self.secagg_bits, self.secagg_threshold = secure_agg, secagg_bits, secagg_threshold
        self.secagg_min_clients, self.noise_source = secagg_min_clients, noise_source
        self.hides_client_stats = secure_agg and not log_client_stats
        dp = noise_multiplier is None or noise_multiplier > 0
        self.skip_gamma = flip_probability(
            num_clients=num_clients, sample_rate=sample_rate, dropout=dropout, min_clients=secagg_min_clients,
            threshold_fraction=secagg_threshold, bits=secagg_bits) if secure_agg and dp else 0.0
        self._check_skip_budget(rounds)
        if noise_multiplier is None:  # calibrate: spend target_epsilon over the planned rounds
            if target_epsilon is None:
                raise FedrunError("privacy.noise_multiplier: null means calibrate it from privacy.target_epsilon, "
                                  "which is not set; give one of them")
            delta = calibration_delta(delta=self.delta, target_epsilon=target_epsilon,
                                      gamma_total=self.skip_gamma * rounds) if self.skip_gamma else self.delta
            noise_multiplier = calibrate_noise(target_epsilon=target_epsilon, delta=delta,
                                               sample_rate=sample_rate, rounds=rounds, accountant=accountant)
            log.info("privacy: noise multiplier %.4f calibrated for epsilon %.3g at delta %.3g over %d rounds",
                     noise_multiplier, target_epsilon, self.delta, rounds)
        self.noise_multiplier = noise_multiplier
        self.clip_count_stddev = clip_count_stddev if clip_count_stddev is not None else self._default_count_stddev()
        self.update_noise = self._update_noise_multiplier()
        self._warn_about_delta()
        self.ledger = Ledger()
        self.round_cost: dict[str, float] = {}
        self.secure_round: SecureSumRound | None = None
        self.device = device

    def _check_skip_budget(self, rounds: int) -> None:
        """Refuse a run whose skipped secure-aggregation rounds alone could spend delta."""
        if self.skip_gamma * rounds >= self.delta / 2:
            raise FedrunError(
                f"privacy.secagg_min_clients: with an expected cohort of {self.expected_clients:.3g} of "
                f"{self.num_clients} clients, one user decides whether a round reaches the minimum of "
                f"{self.secagg_min_clients} (or the Shamir threshold) with probability {self.skip_gamma:.3g} a round; "
                f"over {rounds} rounds that alone exceeds delta / 2 = {self.delta / 2:.3g}; raise "
                "sampler.clients_per_round or lower privacy.secagg_min_clients (>= 2)")

    @property
    def is_dp(self) -> bool:
        return self.noise_multiplier > 0

    @property
    def metric_columns(self) -> list[str]:
        dp = ["epsilon", "epsilon_rdp", "epsilon_prv", "noise_multiplier", "clip_norm"] if self.is_dp else ["clip_norm"]
        return dp + (["secagg_skipped", "secagg_bytes_per_client", "secagg_seconds"] if self.secure_agg else [])

    def _default_count_stddev(self) -> float:
        """Andrew et al.'s sigma_b = expected clients / 20; z when that leaves the updates no noise
        budget (it must exceed z / 2), which gives them z_delta = z / sqrt(3/4)."""
        paper = self.expected_clients / 20
        return paper if not self.is_dp or 2 * paper > self.noise_multiplier * 1.01 else self.noise_multiplier

    def _update_noise_multiplier(self) -> float:
        if not (self.adaptive and self.is_dp):
            return self.noise_multiplier
        rest = self.noise_multiplier**-2 - (2 * self.clip_count_stddev) ** -2
        if rest <= 0:
            raise FedrunError(f"privacy.clip_count_stddev: {self.clip_count_stddev:.4g} is too small for noise "
                              f"multiplier z = {self.noise_multiplier:.4g}; it must exceed z / 2 = "
                              f"{self.noise_multiplier / 2:.4g} (the count's noise takes its share of the budget)")
        return rest**-0.5

    def _warn_about_delta(self) -> None:
        """delta is the probability that the bound fails outright: say so when it is not small."""
        limit = min(1e-3, 1 / (10 * self.num_clients))
        if self.is_dp and self.delta > limit:
            log.warning("privacy.delta = %.3g is above min(1e-3, 1 / (10 N)) = %.3g for N = %d clients: the bound "
                        "may fail outright with that probability; set privacy.delta lower", self.delta, limit,
                        self.num_clients)

    # ---- client side ------------------------------------------------------------------------

    def begin_round(self, ctx: RoundContext) -> None:
        """Secure aggregation's set-up (keys, shares) among the sampled clients, before training;
        a cohort below privacy.secagg_min_clients (or past the fixed-point capacity) skips the round."""
        self.secure_round, self.round_cost = None, {}
        if not self.secure_agg:
            return
        n = len(ctx.cohort)
        bits = self.secagg_bits or most_bits(max(n, 1))
        self.round_cost = {"secagg_skipped": 1}
        if n < self.secagg_min_clients or bits > most_bits(n):
            log.warning("round %d: secure aggregation skipped (%d sampled; at least privacy.secagg_min_clients=%d "
                        "and at most %d clients for %d bits); the global model is kept",
                        ctx.round_idx, n, self.secagg_min_clients, 2 ** (32 - bits), bits)
            return
        self.secure_round = SecureSumRound(
            list(ctx.cohort), round_seed=stream_seed(self.seed, Stream.SECAGG, ctx.round_idx, source=self.noise_source),
            threshold=shamir_threshold(n, self.secagg_threshold), length=self.num_params, value_range=self.clip_norm,
            bits=bits, counter_max=[1] if self.adaptive else [])

    def on_client(self, update: ClientUpdate, ctx: RoundContext) -> ClientUpdate:
        """Clip the update to the current clip norm; report (for adaptive clipping) whether it fit;
        with secure aggregation, send only the masked fixed-point vector, the bit inside it."""
        norm = float(torch.linalg.vector_norm(update.delta))
        unclipped = int(norm <= self.clip_norm)
        if norm > self.clip_norm:
            # float32 rounding of the scaled vector can land a few ulps above C; the bound must hold
            # for the vector sent, so aim a millionth below it.
            update.delta = update.delta * (self.clip_norm * (1 - 1e-6) / norm)
        update.bytes_up += 4 if self.adaptive else 0
        if not self.secure_agg:
            update.extras["unclipped"] = torch.tensor([float(unclipped)], device=update.delta.device)
        elif self.secure_round is None:  # a skipped round: nothing is sent
            update.delta, update.bytes_up = torch.zeros(0, dtype=torch.uint32), 0
        else:
            update.delta = self.secure_round.client_mask(update.client_id, update.delta,
                                                         [unclipped] if self.adaptive else [])
        return update

    # ---- server side ------------------------------------------------------------------------

    def allows_round(self, ctx: RoundContext) -> bool:
        """False when the next round would take epsilon past the target (privacy.stop_at_budget)."""
        if not (self.stop_at_budget and self.is_dp and self.target_epsilon is not None):
            return True
        return self._epsilon(self.accountant, extra=self._event(ctx, participants=0)) <= self.target_epsilon

    def _epsilon(self, accountant: str, extra: DPEvent | None = None) -> float:
        """The ledger's epsilon at the run's delta, less what skipped secure-aggregation rounds take."""
        rounds = len(self.ledger.events) + (extra is not None)
        return epsilon_with_skips(lambda d: self.ledger.epsilon(d, accountant=accountant, extra=extra),
                                  delta=self.delta, gamma=self.skip_gamma * rounds)

    def aggregate(self, updates: Sequence[ClientUpdate], ctx: RoundContext, strategy) -> torch.Tensor | None:
        """(sum of clipped updates + noise) / expected clients; None if secure aggregation aborted."""
        self.ledger.record(self._event(ctx, participants=len(updates), canaries=sum(u.canary for u in updates)))
        summed = self._sum(updates, ctx)
        if summed is None:
            return None
        total, unclipped = summed
        g = stream_generator(self.seed, Stream.NOISE, ctx.round_idx, source=self.noise_source)
        noise = torch.randn(total.shape, generator=g).to(total.device) * (self.update_noise * self.clip_norm)
        if self.adaptive:
            self._adapt_clip_norm(unclipped, len(updates), ctx)
        return ((total + noise) / self.expected_clients).to(torch.float32)

    def _sum(self, updates: Sequence[ClientUpdate], ctx: RoundContext) -> tuple[torch.Tensor, int] | None:
        """(sum of the clipped updates, how many were unclipped); None if secure aggregation skipped the round."""
        if not self.secure_agg:
            unclipped = sum(int(u.extras["unclipped"]) for u in updates) if self.adaptive else 0
            if not updates:  # nobody reported: the noise is still added (the round was sampled)
                return torch.zeros(self.num_params, dtype=torch.float64, device=self.device), 0
            return torch.stack([u.delta for u in updates]).double().sum(0), unclipped
        if self.secure_round is None:
            return None
        try:  # the server side holds masked uint32 vectors only
            sums = self.secure_round.server_sum({u.client_id: u.delta for u in updates})
        except SecAggAbort as e:
            log.warning("round %d: secure aggregation aborted (%s); the global model is kept", ctx.round_idx, e)
            return None
        finally:
            self.round_cost = self.secure_round.cost() | {"secagg_skipped": 1}
        self.round_cost["secagg_skipped"] = 0
        return sums.values.to(self.device), (sums.counters[0] if self.adaptive else 0)

    def _adapt_clip_norm(self, unclipped: int, reported: int, ctx: RoundContext) -> None:
        """C <- C exp(-clip_lr (b - target_quantile)), b the noisy fraction of unclipped updates."""
        g = stream_generator(self.seed, Stream.NOISE, ctx.round_idx, 1, source=self.noise_source)
        centred = unclipped - 0.5 * reported
        noisy = (centred + float(torch.randn((), generator=g)) * self.clip_count_stddev) / self.expected_clients + 0.5
        noisy = min(1.0, max(0.0, noisy))  # as TFF's QuantileEstimatorQuery: an estimate of a fraction
        self.clip_norm *= math.exp(-self.clip_lr * (noisy - self.target_quantile))

    def _event(self, ctx: RoundContext, *, participants: int, canaries: int = 0) -> DPEvent:
        return DPEvent(round=ctx.round_idx, sample_rate=self.sample_rate, noise_multiplier=self.noise_multiplier,
                       clip_norm=self.clip_norm, participants=participants, canaries=canaries,
                       mechanism="dp_fedavg" + ("+adaptive" if self.adaptive else "")
                       + ("+secagg" if self.secure_agg else ""))

    def round_metrics(self, *, tight: bool) -> dict[str, float | None]:
        """RDP epsilon every round (milliseconds); the PRV epsilon (a numerical composition of
        ~0.3-1 s) only where `tight` (evaluation rounds and the last)."""
        row: dict[str, float | None] = {"clip_norm": self.clip_norm, **self.round_cost}
        if self.is_dp:
            rdp = self._epsilon("rdp")
            prv = self._epsilon("prv") if tight else None
            row |= {"epsilon": prv if self.accountant == "prv" else rdp, "epsilon_rdp": rdp, "epsilon_prv": prv,
                    "noise_multiplier": self.noise_multiplier}
        return row

    def summary(self) -> dict:
        out: dict[str, Any] = {"mechanism": "central_dp" if self.is_dp else "secure_agg", "clip_norm": self.clip_norm,
               "secure_agg": self.secure_agg}
        if self.is_dp:
            final = self.round_metrics(tight=True)
            out |= {"epsilon": final["epsilon"], "delta": self.delta, "accountant": self.accountant,
                    "epsilon_rdp": final["epsilon_rdp"], "epsilon_prv": final["epsilon_prv"],
                    "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
                    "rounds_accounted": len(self.ledger.events), "noise_source": self.noise_source}
            if self.target_epsilon is not None:  # what the noise was calibrated to, or the budget stopped at
                out["target_epsilon"] = self.target_epsilon
            if self.skip_gamma:
                out["secagg_skip_delta"] = math.exp(out["epsilon"]) * self.skip_gamma * len(self.ledger.events)
        return out

    def state_dict(self) -> dict:
        return {"clip_norm": self.clip_norm, "ledger": self.ledger.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.clip_norm = state["clip_norm"]
        self.ledger.load_state_dict(state["ledger"])

    def round_events(self, round_idx: int) -> list[DPEvent]:
        return [e for e in self.ledger.events if e.round == round_idx]
