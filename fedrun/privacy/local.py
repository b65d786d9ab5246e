"""`privacy=local_dp`: example-level DP-SGD on every client (Abadi et al. 2016), each client
with its own accountant; the run reports the worst client's epsilon.

Each participation of client i runs K DP-SGD steps with Poisson sampling rate
q_i = batch_size / n_i and noise multiplier z, i.e. K subsampled Gaussian steps, replayed
into opacus' accountants. This protects each example of a client's data (example-level DP),
not the client as a whole: see the README's Privacy section.
"""
from __future__ import annotations

from collections import Counter
from typing import Annotated

from fedrun.components import Range
from fedrun.core import ClientUpdate, RoundContext
from fedrun.privacy.accounting import epsilon_of
from fedrun.privacy.keys import Accountant, Delta, NoiseSource
from fedrun.privacy.local_dp import ExampleDP
from fedrun.privacy.none import NoPrivacy


class LocalPrivacy(NoPrivacy):
    """Aggregation is the strategy's own (NoPrivacy's); the privacy happens inside local training."""

    dp_level = "example"  # DP-SGD bounds each example's gradient, not a client's whole contribution
    metric_columns = ["epsilon", "epsilon_rdp", "epsilon_prv"]

    def __init__(self, *, max_grad_norm: Annotated[float, Range(gt=0)], noise_multiplier: Annotated[float, Range(ge=0)],
                 delta: Delta, accountant: Accountant, batch_size: int, noise_source: NoiseSource):
        self.example_dp = ExampleDP(max_grad_norm=max_grad_norm, noise_multiplier=noise_multiplier,
                                    noise_source=noise_source)
        self.delta, self.accountant, self.batch_size = delta, accountant, batch_size
        self.client_steps: dict[int, Counter] = {}

    def on_client(self, update: ClientUpdate, ctx: RoundContext) -> ClientUpdate:
        """The client's own accountant: its steps at its sampling rate (no data is touched)."""
        rate = min(1.0, self.batch_size / update.num_examples)
        steps = self.client_steps.setdefault(update.client_id, Counter())
        steps[(self.example_dp.noise_multiplier, rate)] += update.num_steps
        return update

    def worst_client(self) -> tuple[int | None, float]:
        if not self.client_steps:
            return None, 0.0
        eps = {c: epsilon_of(steps, self.delta, accountant="rdp") for c, steps in self.client_steps.items()}
        worst = max(eps, key=eps.get)
        return worst, eps[worst]

    def round_metrics(self, *, tight: bool) -> dict[str, float]:
        """Worst client's RDP epsilon every round; its PRV epsilon where `tight` (slower)."""
        worst, rdp = self.worst_client()
        prv = epsilon_of(self.client_steps[worst], self.delta, accountant="prv") if tight and worst is not None else None
        return {"epsilon": prv if self.accountant == "prv" else rdp, "epsilon_rdp": rdp, "epsilon_prv": prv}

    def summary(self) -> dict:
        worst, _ = self.worst_client()
        final = self.round_metrics(tight=True)
        return {"mechanism": "local_dp", "level": "example", "worst_client": worst, "delta": self.delta,
                "accountant": self.accountant, "epsilon": final["epsilon"], "epsilon_rdp": final["epsilon_rdp"],
                "epsilon_prv": final["epsilon_prv"], "max_grad_norm": self.example_dp.max_grad_norm,
                "noise_multiplier": self.example_dp.noise_multiplier}

    def state_dict(self) -> dict:
        return {"client_steps": {c: [[z, q, n] for (z, q), n in steps.items()] for c, steps in self.client_steps.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.client_steps = {int(c): Counter({(z, q): int(n) for z, q, n in rows})
                             for c, rows in state["client_steps"].items()}
