"""`privacy=secure_agg`: the strategy's own aggregate, computed without the server seeing any term.

Secure aggregation (Bonawitz et al., CCS 2017) is a way of computing a sum, not a change to
the algorithm: with it, FedAvg must give FedAvg's model. Each client puts w_i delta_i / w_max
(its update scaled by its aggregation weight: its number of examples for FedAvg and the FedOpt
family, 1 for a plain mean) into the masked vector, plus two exact integer counters: w_i and
the number of its coordinates that fell outside the fixed-point range. The server recovers
sum_i w_i delta_i / w_max and W = sum_i w_i, and forms the weighted mean
w_max / W * sum_i (w_i delta_i / w_max) = sum_i (w_i / W) delta_i, as without secure
aggregation. Nothing is clipped: the fixed-point range is a bound on coordinates
(`secagg_range`), and what falls outside is clamped and reported (`secagg_clamped`).
A strategy whose server step needs more sums (SCAFFOLD's control deltas) names them in
`secure_sum_extras`; they are summed in the same masked vector and handed to its `aggregate_sums`.

Error bound. Each coordinate is rounded stochastically (unbiased) to a grid of step
s = 2 R / (2^b - 1), moving it by less than s, so for coordinates inside [-R, R] the decoded
weighted mean is within n s w_max / W of the exact one in every coordinate (n the survivors).

A round whose cohort is smaller than `secagg_min_clients` is skipped (the model is kept,
the round is counted in `secagg_skipped`): a "sum" of one client is that client's update.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Annotated

import torch

from fedrun.components import Range
from fedrun.core import ClientUpdate, FedrunError, RoundContext, Strategy, Stream
from fedrun.privacy.fixedpoint import MODULUS
from fedrun.privacy.keys import NoiseSource, SecaggBits, SecaggMinClients, SecaggThreshold
from fedrun.privacy.masking import SecAggAbort
from fedrun.privacy.none import NoPrivacy
from fedrun.privacy.randomness import stream_seed
from fedrun.privacy.secure_round import SecureSumRound, most_bits, shamir_threshold

log = logging.getLogger(__name__)

WEIGHTS = ("examples", "uniform")  # what a strategy's `secure_sum_weighting` may say


class SecureAggregation(NoPrivacy):
    """Not DP: nothing is accounted and every round is allowed (NoPrivacy's)."""

    secure_sum = True
    metric_columns = ["secagg_clamped", "secagg_skipped", "secagg_bits", "secagg_bytes_per_client", "secagg_seconds"]
    hides_client_stats = True  # clients.csv keeps only what the server sees (see log_client_stats)

    def __init__(self, *, secagg_bits: SecaggBits | None, secagg_threshold: SecaggThreshold,
                 secagg_min_clients: SecaggMinClients, secagg_range: Annotated[float, Range(gt=0)],
                 log_client_stats: bool, noise_source: NoiseSource, strategy: Strategy,
                 num_params: int, max_examples: int, seed: int, device: torch.device = torch.device("cpu")):
        weighting = getattr(strategy, "secure_sum_weighting", None)
        if weighting not in WEIGHTS:
            raise FedrunError(f"strategy: {type(strategy).__name__} needs the individual client updates (or keeps "
                              "per-client state on the server), which secure aggregation hides; use fedavg, fedavgm, "
                              "fedprox, scaffold or an adaptive strategy (fedadam, fedyogi, fedadagrad)")
        self.bits, self.threshold_fraction, self.min_clients = secagg_bits, secagg_threshold, secagg_min_clients
        self.value_range, self.noise_source, self.seed = secagg_range, noise_source, seed
        self.hides_client_stats = not log_client_stats
        self.by_examples = weighting == "examples"
        self.weight_max = max_examples if self.by_examples else 1
        self.extras: tuple[str, ...] = tuple(getattr(strategy, "secure_sum_extras", ()))
        self.num_params, self.device = num_params, device
        self.secure_round: SecureSumRound | None = None
        self.row: dict[str, float] = {}
        self.skipped = 0

    # ---- set-up, before local training ------------------------------------------------------

    def begin_round(self, ctx: RoundContext) -> None:
        self.secure_round, n = None, len(ctx.cohort)
        bits = self.bits or most_bits(n)
        self.row = {"secagg_skipped": 0, "secagg_bits": bits}
        if n < self.min_clients or n * 2**bits > MODULUS:
            why = (f"{n} sampled, below privacy.secagg_min_clients={self.min_clients}" if n < self.min_clients else
                   f"{n} clients would overflow {bits}-bit sums modulo 2^32")
            self._skip(ctx, why)
            return
        self.secure_round = SecureSumRound(
            list(ctx.cohort), round_seed=stream_seed(self.seed, Stream.SECAGG, ctx.round_idx, source=self.noise_source),
            threshold=shamir_threshold(n, self.threshold_fraction), length=self.num_params * (1 + len(self.extras)),
            value_range=self.value_range, bits=bits,
            counter_max=[self.weight_max, self.num_params * (1 + len(self.extras))])

    def _skip(self, ctx: RoundContext, why: str) -> None:
        log.warning("round %d: secure aggregation skipped (%s); the global model is kept", ctx.round_idx, why)
        self.row["secagg_skipped"] = 1
        self.skipped += 1

    # ---- client side ------------------------------------------------------------------------

    def on_client(self, update: ClientUpdate, ctx: RoundContext) -> ClientUpdate:
        """Send w_i delta_i / w_max (and the strategy's extra sums), w_i and the clamped count,
        masked; in a skipped round, nothing."""
        if self.secure_round is None:
            update.delta, update.bytes_up, update.extras = torch.zeros(0, dtype=torch.uint32), 0, {}
            return update
        weight = min(update.num_examples, self.weight_max) if self.by_examples else 1
        values = torch.cat([update.delta.double().cpu() * (weight / self.weight_max),
                            *(update.extras[name].double().cpu() for name in self.extras)])
        clamped = int((values.abs() > self.value_range).sum())
        update.delta = self.secure_round.client_mask(update.client_id, values, [weight, clamped])
        update.extras = {}  # everything the server gets is inside the masked vector
        update.bytes_up += 4 * 2  # the two counters, one uint32 each
        return update

    # ---- server side ------------------------------------------------------------------------

    def aggregate(self, updates: Sequence[ClientUpdate], ctx: RoundContext, strategy) -> torch.Tensor | None:
        """The weighted mean of the survivors' updates; None (keep the model) if skipped or aborted."""
        if self.secure_round is None:
            return None
        try:
            sums = self.secure_round.server_sum({u.client_id: u.delta for u in updates})
        except SecAggAbort as e:
            log.warning("round %d: secure aggregation aborted (%s); the global model is kept", ctx.round_idx, e)
            self.row["secagg_skipped"] = 1
            self.skipped += 1
            return None
        finally:
            self.row |= self.secure_round.cost()
        total_weight, clamped = sums.counters
        self.row["secagg_clamped"] = clamped / (sums.survivors * sums.values.numel())
        if clamped:
            log.warning("round %d: %.3g%% of the coordinates fell outside privacy.secagg_range=%g and were clamped",
                        ctx.round_idx, 100 * self.row["secagg_clamped"], self.value_range)
        parts = sums.values.to(self.device).split(self.num_params)
        mean = (parts[0] * (self.weight_max / total_weight)).to(torch.float32)
        if not self.extras:
            return mean
        extras = {name: part.to(torch.float32) for name, part in zip(self.extras, parts[1:])}
        return strategy.aggregate_sums(mean, extras)

    def round_metrics(self, *, tight: bool) -> dict[str, float | None]:
        return dict(self.row)

    def summary(self) -> dict:
        return {"mechanism": "secure_agg", "secure_agg": True, "secagg_range": self.value_range,
                "skipped_rounds": self.skipped, "noise_source": self.noise_source}

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = int(state.get("skipped", 0))
