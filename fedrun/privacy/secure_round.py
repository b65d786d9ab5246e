"""Secure aggregation inside the round loop, its client side and server side kept apart.

`SecureSumRound` runs the protocol's set-up among the round's sampled clients (key
advertisement and encrypted Shamir shares, Bonawitz et al. 2017 steps 0-1) before local
training. After training, `client_mask` (client side) turns what a client contributes into one
masked uint32 vector; that is all the client sends. `server_sum` (server side) only ever
receives those masked vectors: it asks the survivors for the shares it needs and recovers the
sums. Clients sampled but gone before sending are dropouts after masking: their pairwise masks
are rebuilt from the survivors' shares.

What a client contributes is a payload of two parts, summed in one masked vector:
- `values`, (D,) floats in fixed point (`fixedpoint`): each coordinate clamped to
  [-value_range, value_range] and stochastically rounded to a grid of 2^bits - 1 steps;
- `counters`, (k,) non-negative integers summed exactly (an example count, the number of
  clamped coordinates, adaptive clipping's unclipped bit): one more coordinate each, so the
  server learns their sums and never a client's own.
"""
from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fedrun.privacy.fixedpoint import MAX_BITS, MODULUS, dequantize_sum, quantize, validate_capacity
from fedrun.privacy.masking import SEALED_SHARES_BYTES, PublicKeys, client_secret
from fedrun.privacy.secagg import ClientSecAgg, ServerSecAgg

MIN_THRESHOLD = 2  # t = 1 would make every Shamir share equal to the secret


def shamir_threshold(cohort_size: int, fraction: float) -> int:
    """t = max(2, ceil(fraction * n)): the survivors needed to unmask a cohort of n."""
    return max(MIN_THRESHOLD, math.ceil(fraction * cohort_size))


def most_bits(cohort_size: int) -> int:
    """The most fixed-point bits whose sum over `cohort_size` clients cannot wrap modulo 2^32."""
    return min(MAX_BITS, 32 - (cohort_size - 1).bit_length()) if cohort_size > 1 else MAX_BITS


@dataclass
class SecureSums:
    """What the server learns: the survivors' decoded value sum and their counters' sums."""

    values: torch.Tensor  # (D,) float64
    counters: list[int]
    survivors: int


class SecureSumRound:
    def __init__(self, cohort: Sequence[int], *, round_seed: int, threshold: int, length: int,
                 value_range: float, bits: int, counter_max: Sequence[int] = ()):
        start = time.perf_counter()
        n = len(cohort)
        validate_capacity(n, bits=bits)
        for most in counter_max:  # a counter's sum over the whole cohort must not wrap either
            if n * most >= MODULUS:
                raise ValueError(f"secure aggregation: a counter of up to {most} per client overflows 2^32 "
                                 f"over {n} clients")
        self.value_range, self.bits, self.round_seed = value_range, bits, round_seed
        self.length, self.num_counters = length, len(counter_max)
        # Client side: one protocol state per sampled client (it lives on that client).
        self._clients = {u: ClientSecAgg(u, round_seed=round_seed, threshold=threshold) for u in cohort}
        self.server = ServerSecAgg(threshold=threshold, length=length + self.num_counters)
        roster = self.server.advertise({u: c.public_keys() for u, c in self._clients.items()})
        outboxes = {u: c.share_keys(roster) for u, c in self._clients.items()}
        inboxes = self.server.route_shares(outboxes)
        for u, c in self._clients.items():
            c.receive_shares(inboxes[u])
        # Per client, beside its masked vector (uint32: as many bytes as a float32 update):
        # up its two public keys and a sealed share pair for each other client; down the others'
        # keys and the sealed pairs addressed to it.
        self.setup_bytes_up = PublicKeys.nbytes + SEALED_SHARES_BYTES * (n - 1)
        self.setup_bytes_down = (PublicKeys.nbytes + SEALED_SHARES_BYTES) * (n - 1)
        self.reveal_bytes_up = self.reveal_bytes_down = 0.0
        self.seconds = time.perf_counter() - start

    # ---- client side ------------------------------------------------------------------------

    def client_mask(self, client_id: int, values: torch.Tensor, counters: Sequence[int] = ()) -> torch.Tensor:
        """The only thing a client sends: its values in fixed point and its counters, masked (uint32)."""
        start = time.perf_counter()
        if len(counters) != self.num_counters or any(c < 0 for c in counters):
            raise ValueError(f"client {client_id}: expected {self.num_counters} non-negative counters, got {counters}")
        seed = int.from_bytes(client_secret(self.round_seed, client_id, b"rounding")[:8], "little") >> 1
        fixed = quantize(values.detach().cpu(), clip=self.value_range, bits=self.bits,
                         generator=torch.Generator().manual_seed(seed))
        payload = torch.cat([fixed, torch.tensor(list(counters), dtype=torch.int64)])
        masked = self._clients[client_id].masked_input(payload)
        self.seconds += time.perf_counter() - start
        return masked

    def _answer(self, client_id: int, survivors: frozenset[int], dropped: frozenset[int]):
        return self._clients[client_id].reveal_shares(survivors=survivors, dropped=dropped)

    # ---- server side ------------------------------------------------------------------------

    def server_sum(self, masked: Mapping[int, torch.Tensor]) -> SecureSums:
        """The survivors' sums, from masked vectors only; SecAggAbort if too few survive."""
        start = time.perf_counter()
        survivors, dropped = self.server.collect_masked(masked)
        reveals = {u: self._answer(u, survivors, dropped) for u in survivors}  # a request sent to survivors
        total = self.server.unmask(reveals)
        # Each survivor is told who survived and who dropped (4 bytes an id) and answers one
        # 33-byte share per client named; averaged over the cohort, as setup is.
        self.reveal_bytes_up = sum(r.nbytes for r in reveals.values()) / len(self._clients)
        self.reveal_bytes_down = 4 * len(survivors | dropped) * len(reveals) / len(self._clients)
        self.seconds += time.perf_counter() - start
        values = dequantize_sum(total[:self.length], clip=self.value_range, bits=self.bits, n=len(survivors))
        return SecureSums(values=values, counters=[int(c) for c in total[self.length:]], survivors=len(survivors))

    def cost(self) -> dict[str, float]:
        """What the protocol adds per client of the cohort (up and down) and in seconds."""
        per_client = self.setup_bytes_up + self.setup_bytes_down + self.reveal_bytes_up + self.reveal_bytes_down
        return {"secagg_bytes_per_client": per_client, "secagg_seconds": self.seconds}
