"""Secure aggregation inside the round loop, its client side and server side kept apart.

`begin` runs the protocol's set-up among the round's sampled clients (key advertisement and
encrypted Shamir shares, Bonawitz et al. 2017 steps 0-1) before local training. After training,
`client_mask` (client side) turns a clipped update into a masked uint32 vector; that is all the
client sends. `server_sum` (server side) only ever receives those masked vectors: it asks the
survivors for the shares it needs and recovers the sum of the survivors' fixed-point updates.
Clients sampled but gone before sending are dropouts after masking: their pairwise masks are
rebuilt from the survivors' shares.
"""
from __future__ import annotations

import math
import time
from typing import Mapping

import torch

from fedrun.core import Stream, derive_seed
from fedrun.privacy.fixedpoint import dequantize_sum, quantize, validate_capacity
from fedrun.privacy.masking import SEALED_SHARES_BYTES, PublicKeys
from fedrun.privacy.secagg import ClientSecAgg, ServerSecAgg


class SecureSumRound:
    def __init__(self, cohort: list[int], *, seed: int, round_idx: int, threshold_fraction: float,
                 length: int, clip: float, bits: int):
        start = time.perf_counter()
        validate_capacity(len(cohort), bits=bits)
        self.clip, self.bits, self.seed, self.round_idx = clip, bits, seed, round_idx
        round_seed = derive_seed(seed, Stream.SECAGG, round_idx)
        threshold = max(1, math.ceil(threshold_fraction * len(cohort)))
        # Client side: one protocol state per sampled client (it lives on that client).
        self._clients = {u: ClientSecAgg(u, round_seed=round_seed, threshold=threshold) for u in cohort}
        self.server = ServerSecAgg(threshold=threshold, length=length)
        roster = self.server.advertise({u: c.public_keys() for u, c in self._clients.items()})
        outboxes = {u: c.share_keys(roster) for u, c in self._clients.items()}
        inboxes = self.server.route_shares(outboxes)
        for u, c in self._clients.items():
            c.receive_shares(inboxes[u])
        n = len(cohort)
        self.setup_bytes = (PublicKeys.nbytes + SEALED_SHARES_BYTES * (n - 1)) * 2  # up and down, per client
        self.seconds = time.perf_counter() - start

    # ---- client side ------------------------------------------------------------------------

    def client_mask(self, client_id: int, delta: torch.Tensor) -> torch.Tensor:
        """The only thing a client sends: its clipped update, fixed point, masked (uint32)."""
        start = time.perf_counter()
        g = torch.Generator().manual_seed(derive_seed(self.seed, Stream.SECAGG, self.round_idx, client_id))
        masked = self._clients[client_id].masked_input(quantize(delta.cpu(), clip=self.clip, bits=self.bits, generator=g))
        self.seconds += time.perf_counter() - start
        return masked

    def _answer(self, client_id: int, survivors: frozenset[int], dropped: frozenset[int]):
        return self._clients[client_id].reveal_shares(survivors=survivors, dropped=dropped)

    # ---- server side ------------------------------------------------------------------------

    def server_sum(self, masked: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """Sum of the survivors' updates (float64), from masked vectors only; SecAggAbort if too few."""
        start = time.perf_counter()
        survivors, dropped = self.server.collect_masked(masked)
        reveals = {u: self._answer(u, survivors, dropped) for u in survivors}  # a request sent to survivors
        total = self.server.unmask(reveals)
        self.reveal_bytes = sum(r.nbytes for r in reveals.values()) / max(len(reveals), 1)
        self.seconds += time.perf_counter() - start
        return dequantize_sum(total, clip=self.clip, bits=self.bits, n=len(survivors))
