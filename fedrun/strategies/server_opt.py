"""Adaptive server optimizers FedAdam, FedYogi and FedAdagrad (Reddi et al. 2021,
"Adaptive Federated Optimization", ICLR, Algorithm 2) as one torch.optim optimizer.

The server treats the aggregated client delta as a pseudo-gradient. Following the
torch.optim convention that `step()` descends along `.grad`, the server sets
`p.grad = -delta` and calls `step()`; the optimizer works with Δ = -grad = delta.
Per parameter:

    m_t = β1 m_{t-1} + (1 - β1) Δ                                (m_{-1} = 0)
    adagrad: v_t = v_{t-1} + Δ²
    yogi:    v_t = v_{t-1} - (1 - β2) Δ² sign(v_{t-1} - Δ²)
    adam:    v_t = β2 v_{t-1} + (1 - β2) Δ²
    x_{t+1} = x_t + lr m_t / (sqrt(v_t) + τ)

Algorithm 2 asks only for v_{-1} >= τ²; we start from v_{-1} = τ², the smallest value it
allows. There is no bias correction, as in the paper, so early Adam steps are damped
by (1 - β1) rather than rescaled.

`FedOptStrategy` is the server strategy of the three options (fedadam.py, fedyogi.py,
fedadagrad.py), which differ only in `kind`. FedAvgM (Hsu et al. 2019) needs no optimizer of
its own: it is `torch.optim.SGD` with `momentum=μ`, fed the same `-delta` gradient.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Annotated

import torch

from fedrun.components import Range
from fedrun.strategies.server import ServerStrategy

KINDS = ("adam", "yogi", "adagrad")


def _second_moment(v: torch.Tensor, delta_sq: torch.Tensor, *, kind: str, beta2: float) -> None:
    """Update v in place from Δ² by the rule of `kind`."""
    if kind == "adagrad":
        v.add_(delta_sq)
    elif kind == "yogi":
        # Yogi moves v towards Δ² by an additive step, so v cannot collapse as fast as Adam's.
        v.addcmul_(delta_sq, torch.sign(v - delta_sq), value=-(1.0 - beta2))
    else:
        v.mul_(beta2).add_(delta_sq, alpha=1.0 - beta2)


def _check_args(*, kind: str, lr: float, beta1: float, beta2: float, tau: float) -> None:
    if kind not in KINDS:
        raise ValueError(f"FedOpt kind must be one of {KINDS}; got {kind!r}")
    if not lr > 0:
        raise ValueError(f"FedOpt needs lr > 0; got lr={lr}")
    for name, beta in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"FedOpt needs 0 <= {name} < 1; got {name}={beta}")
    if not tau > 0:
        raise ValueError(f"FedOpt needs tau > 0 (it bounds the step when v is small); got tau={tau}")


class FedOpt(torch.optim.Optimizer):
    """FedAdam / FedYogi / FedAdagrad server optimizer; feed it `p.grad = -delta`."""

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], *, kind: str, lr: float,
                 beta1: float, beta2: float, tau: float) -> None:
        _check_args(kind=kind, lr=lr, beta1=beta1, beta2=beta2, tau=tau)
        super().__init__(params, dict(kind=kind, lr=lr, beta1=beta1, beta2=beta2, tau=tau))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        grad = p.grad
        assert grad is not None  # step() skips parameters without one
        if grad.is_sparse:
            raise RuntimeError("FedOpt does not support sparse gradients")
        state = self.state[p]
        if not state:
            state["m"] = torch.zeros_like(p)
            state["v"] = torch.full_like(p, group["tau"] ** 2)
        m, v = state["m"], state["v"]
        delta = -grad
        m.mul_(group["beta1"]).add_(delta, alpha=1.0 - group["beta1"])
        _second_moment(v, delta.square(), kind=group["kind"], beta2=group["beta2"])
        p.addcdiv_(m, v.sqrt().add_(group["tau"]), value=group["lr"])


class FedOptStrategy(ServerStrategy):
    """The example-weighted mean, then a step of the adaptive server optimizer of `kind`."""

    kind: str  # one of KINDS, set by each option
    secure_sum_weighting = "examples"

    def __init__(self, *, server_lr: Annotated[float, Range(gt=0)], beta1: Annotated[float, Range(ge=0, lt=1)],
                 beta2: Annotated[float, Range(ge=0, lt=1)], tau: Annotated[float, Range(gt=0)]):
        super().__init__()
        self.server_lr, self.beta1, self.beta2, self.tau = server_lr, beta1, beta2, tau

    def make_optimizer(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        return FedOpt(params, kind=self.kind, lr=self.server_lr, beta1=self.beta1, beta2=self.beta2, tau=self.tau)
