"""`privacy=local_dp`: example-level DP-SGD on every client (Abadi et al. 2016), each client
with its own accountant; the run reports the worst client's epsilon.

Each participation of client i runs K DP-SGD steps with Poisson sampling rate
q_i = batch_size / n_i and noise multiplier z, i.e. K subsampled Gaussian steps: one DPEvent
in the client's own Ledger (the model central DP's ledger uses, fedrun.privacy.accounting),
replayed into opacus' accountants. This protects each example of a client's data (example-level DP),
not the client as a whole: see the README's Privacy section.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Annotated

from fedrun.components import Range
from fedrun.core import ClientUpdate, RoundContext
from fedrun.privacy.accounting import DPEvent, Ledger
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
        self.ledgers: dict[int, Ledger] = {}  # each client's own accountant

    def on_client(self, update: ClientUpdate, ctx: RoundContext) -> ClientUpdate:
        """The client's own accountant: its steps at its sampling rate (no data is touched)."""
        rate = min(1.0, self.batch_size / update.num_examples)
        self.ledgers.setdefault(update.client_id, Ledger()).record(self._event(ctx.round_idx, rate, update.num_steps))
        return update

    def _event(self, round_idx: int, rate: float, steps: int) -> DPEvent:
        return DPEvent(round=round_idx, sample_rate=rate, noise_multiplier=self.example_dp.noise_multiplier,
                       clip_norm=self.example_dp.max_grad_norm, participants=1, mechanism="dp_sgd", steps=steps)

    def worst_client(self) -> tuple[int | None, float]:
        if not self.ledgers:
            return None, 0.0
        eps = {c: ledger.epsilon(self.delta, accountant="rdp") for c, ledger in self.ledgers.items()}
        worst = max(eps, key=eps.__getitem__)
        return worst, eps[worst]

    def round_metrics(self, *, tight: bool) -> dict[str, float | None]:
        """Worst client's RDP epsilon every round; its PRV epsilon where `tight` (slower)."""
        worst, rdp = self.worst_client()
        prv = self.ledgers[worst].epsilon(self.delta, accountant="prv") if tight and worst is not None else None
        return {"epsilon": prv if self.accountant == "prv" else rdp, "epsilon_rdp": rdp, "epsilon_prv": prv}

    def summary(self) -> dict:
        worst, _ = self.worst_client()
        final = self.round_metrics(tight=True)
        return {"mechanism": "local_dp", "level": "example", "worst_client": worst, "delta": self.delta,
                "accountant": self.accountant, "epsilon": final["epsilon"], "epsilon_rdp": final["epsilon_rdp"],
                "epsilon_prv": final["epsilon_prv"], "max_grad_norm": self.example_dp.max_grad_norm,
                "noise_multiplier": self.example_dp.noise_multiplier}

    def state_dict(self) -> dict:
        return {"ledgers": {c: ledger.state_dict() for c, ledger in self.ledgers.items()}}

    def load_state_dict(self, state: dict) -> None:
        if "client_steps" in state:  # written before local DP recorded DPEvents: (z, q, steps) per client,
            # in the order first taken; their rounds were not kept (round 0 here)
            self.ledgers = {int(c): Ledger([replace(self._event(0, q, int(n)), noise_multiplier=z) for z, q, n in rows])
                            for c, rows in state["client_steps"].items()}
            return
        self.ledgers = {}
        for c, ledger_state in state["ledgers"].items():
            self.ledgers[int(c)] = Ledger()
            self.ledgers[int(c)].load_state_dict(ledger_state)
