"""Secure aggregation with double masking and dropout recovery, simulated in one process.

Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning",
CCS 2017 (the honest-but-curious protocol of section 4, without the signatures of the
active-adversary variant). Each client u in the round:

0. advertises two X25519 public keys (`masking.PublicKeys`);
1. Shamir-shares (t-out-of-n, `shamir`) the seed of its mask private key s_u^SK and a
   fresh self-mask seed b_u among all clients, each share encrypted to its recipient;
2. sends y_u = x_u + PRG(b_u) + sum_{v > u} PRG(s_uv) - sum_{v < u} PRG(s_uv) mod 2^32,
   where x_u is its fixed-point update and s_uv its key agreement with v;
3. for the server's list of survivors S and dropped D, reveals its shares of b_u for
   u in S and of s_u^SK for u in D (never both for one client).

The server then rebuilds b_u (u in S) and s_u^SK (u in D), strips the self masks and the
pairwise masks the survivors share with dropped clients, and obtains sum_{u in S} x_u.
A dropped client whose vector arrives late stays hidden by its self mask PRG(b_u).

Client and server are separate classes: `ServerSecAgg` is only ever handed public keys,
encrypted shares, masked uint32 vectors and the shares it asks for. The one driver of a round,
`fedrun.privacy.secure_round.SecureSumRound`, hands plain vectors to clients alone.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedrun.privacy import shamir
from fedrun.privacy.masking import (
    MODULUS,
    PublicKeys,
    SecAggAbort,
    client_secret,
    mask_seed,
    open_shares,
    prg_mask,
    private_key,
    public_bytes,
    seal_shares,
)

__all__ = ["ClientSecAgg", "Reveal", "SecAggAbort", "ServerSecAgg"]


@dataclass(frozen=True)
class Reveal:
    """A survivor's answer in step 3: its shares, keyed by the client they belong to."""

    client_id: int
    mask_key_shares: dict[int, int]  # u in D -> share of s_u^SK
    self_mask_shares: dict[int, int]  # u in S -> share of b_u

    @property
    def nbytes(self) -> int:
        return shamir.ELEMENT_BYTES * (len(self.mask_key_shares) + len(self.self_mask_shares))


def share_point(client_id: int) -> int:
    """Where client `client_id`'s shares are evaluated; x = 0 would be the secret itself."""
    return client_id + 1


class ClientSecAgg:
    """One client's side of one round: holds its secrets and the shares sent to it."""

    def __init__(self, client_id: int, *, round_seed: int, threshold: int):
        if client_id < 0:
            raise ValueError(f"client ids must be >= 0, got {client_id}")
        self.client_id, self.threshold, self._round_seed = client_id, threshold, round_seed
        self._cipher_key = private_key(self._secret(b"cipher key"))
        self._mask_key_seed = self._secret(b"mask key")  # s_u^SK: shared, rebuilt if u drops
        self._mask_key = private_key(self._mask_key_seed)
        self._self_mask_seed = self._secret(b"self mask")  # b_u: shared, rebuilt if u survives
        self._roster: dict[int, PublicKeys] = {}
        self._held: dict[int, tuple[int, int]] = {}  # u -> (share of s_u^SK, share of b_u) at my point
        # Whom I have declared a survivor (revealed b_u) or dropped (revealed s_u^SK) this round,
        # across every request: a second request must not get the other secret of one client.
        self._told_survivors: set[int] = set()
        self._told_dropped: set[int] = set()

    def _secret(self, purpose: bytes) -> bytes:
        return client_secret(self._round_seed, self.client_id, purpose)

    def public_keys(self) -> PublicKeys:
        return PublicKeys(cipher=public_bytes(self._cipher_key), mask=public_bytes(self._mask_key))

    def share_keys(self, roster: Mapping[int, PublicKeys]) -> dict[int, bytes]:
        """Step 1: encrypted shares of s_u^SK and b_u for every other client in `roster`."""
        if self.client_id not in roster or len(roster) < self.threshold:
            raise SecAggAbort(f"client {self.client_id}: roster of {len(roster)} clients, threshold {self.threshold}")
        self._roster = dict(roster)
        points = [share_point(v) for v in roster]
        # Independent polynomials (distinct coefficient seeds): shared coefficients would
        # let a share of one secret and a share of the other reveal their difference.
        key_shares = shamir.split(int.from_bytes(self._mask_key_seed, "little"), threshold=self.threshold,
                                  xs=points, seed=self._secret(b"shamir mask key"))
        seed_shares = shamir.split(int.from_bytes(self._self_mask_seed, "little"), threshold=self.threshold,
                                   xs=points, seed=self._secret(b"shamir self mask"))
        mine = {v: (key_shares[share_point(v)], seed_shares[share_point(v)]) for v in roster}
        self._held = {self.client_id: mine[self.client_id]}  # my own share never leaves me
        return {v: seal_shares(self._cipher_key, roster[v].cipher, mine[v], sender=self.client_id, recipient=v)
                for v in roster if v != self.client_id}

    def receive_shares(self, inbox: Mapping[int, bytes]) -> None:
        """Decrypt the shares other clients sent me; their senders are the round's U2."""
        for u, sealed in inbox.items():
            self._held[u] = open_shares(self._cipher_key, self._roster[u].cipher, sealed,
                                        sender=u, recipient=self.client_id)

    def masked_input(self, x_quantized: torch.Tensor) -> torch.Tensor:
        """Step 2: (D,) uint32, x + PRG(b_u) + pairwise masks mod 2^32; all the server sees of x."""
        if x_quantized.dtype != torch.int64 or x_quantized.ndim != 1:
            raise TypeError("masked_input takes a (D,) int64 tensor from quantize()")
        length = x_quantized.numel()
        y = x_quantized + prg_mask(self._self_mask_seed, length)
        for v in self._held:
            if v != self.client_id:
                pairwise = prg_mask(mask_seed(self._mask_key, self._roster[v].mask), length)
                y += pairwise if self.client_id < v else -pairwise
        return torch.remainder(y, MODULUS).to(torch.uint32)

    def reveal_shares(self, *, survivors: frozenset[int], dropped: frozenset[int]) -> Reveal:
        """Step 3. Refuses a request that would expose both secrets of one client, within this
        request or together with an earlier one (Bonawitz et al.'s consistency check: a server
        that names u a survivor once and dropped once would learn b_u and s_u^SK, hence x_u)."""
        if survivors & dropped or self.client_id not in survivors or not (survivors | dropped) <= self._held.keys():
            raise SecAggAbort(f"client {self.client_id}: inconsistent unmasking request")
        if survivors & self._told_dropped or dropped & self._told_survivors:
            raise SecAggAbort(f"client {self.client_id}: unmasking request contradicts an earlier one "
                              f"(clients {sorted(survivors & self._told_dropped | dropped & self._told_survivors)}); "
                              "refused")
        if len(survivors) < self.threshold:
            raise SecAggAbort(f"client {self.client_id}: {len(survivors)} survivors, threshold {self.threshold}")
        self._told_survivors |= survivors
        self._told_dropped |= dropped
        return Reveal(self.client_id, mask_key_shares={u: self._held[u][0] for u in dropped},
                      self_mask_shares={u: self._held[u][1] for u in survivors})


class ServerSecAgg:
    """The server's side of one round. It never receives an unmasked client vector."""

    def __init__(self, *, threshold: int, length: int):
        self.threshold, self.length = threshold, length
        self.roster: dict[int, PublicKeys] = {}  # U1 and their keys
        self.sharers: frozenset[int] = frozenset()  # U2: clients whose shares went out
        self.survivors: frozenset[int] = frozenset()  # U3: clients whose masked vector arrived
        self._masked_sum = torch.zeros(length, dtype=torch.int64)

    def advertise(self, keys: Mapping[int, PublicKeys]) -> dict[int, PublicKeys]:
        """Step 0: the roster U1 broadcast to every client."""
        self._require(len(keys), "clients advertised keys")
        if len({k.mask for k in keys.values()}) < len(keys):
            raise SecAggAbort("two clients advertised the same public key")
        self.roster = dict(keys)
        return dict(keys)

    def route_shares(self, outboxes: Mapping[int, Mapping[int, bytes]]) -> dict[int, dict[int, bytes]]:
        """Step 1: forward each sealed share to its recipient; the senders form U2."""
        self.sharers = frozenset(outboxes) & self.roster.keys()
        self._require(len(self.sharers), "clients sent shares")
        return {v: {u: outboxes[u][v] for u in self.sharers if u != v} for v in self.sharers}

    def collect_masked(self, masked: Mapping[int, torch.Tensor]) -> tuple[frozenset[int], frozenset[int]]:
        """Step 2: add up the masked vectors that arrived; returns (survivors, dropped) to ask about."""
        self.survivors = frozenset(masked) & self.sharers
        self._require(len(self.survivors), "masked vectors arrived")
        for u in self.survivors:
            if masked[u].dtype != torch.uint32 or masked[u].shape != (self.length,):
                raise SecAggAbort(f"client {u}: expected a ({self.length},) uint32 masked vector")
            self._masked_sum += masked[u].to(torch.int64)
        return self.survivors, self.sharers - self.survivors

    def unmask(self, reveals: Mapping[int, Reveal]) -> torch.Tensor:
        """Step 3: (D,) int64, sum of the survivors' inputs mod 2^32, or SecAggAbort."""
        responders = sorted(frozenset(reveals) & self.survivors)
        self._require(len(responders), "survivors answered the unmasking request")
        use = responders[:self.threshold]  # any t shares determine the secret
        total = self._masked_sum.clone()
        for u in self.survivors:
            b_u = shamir.reconstruct({share_point(r): reveals[r].self_mask_shares[u] for r in use})
            total -= prg_mask(_seed_bytes(b_u), self.length)
        for u in self.sharers - self.survivors:
            total -= self._pairwise_masks_with(u, [reveals[r] for r in use])
        return torch.remainder(total, MODULUS)

    def _pairwise_masks_with(self, dropped: int, reveals: list[Reveal]) -> torch.Tensor:
        """What the survivors' pairwise masks with a dropped client add to the sum."""
        seed = shamir.reconstruct({share_point(r.client_id): r.mask_key_shares[dropped] for r in reveals})
        key = private_key(_seed_bytes(seed))
        if public_bytes(key) != self.roster[dropped].mask:
            raise SecAggAbort(f"rebuilt key of client {dropped} does not match its public key")
        total = torch.zeros(self.length, dtype=torch.int64)
        for v in self.survivors:
            pairwise = prg_mask(mask_seed(key, self.roster[v].mask), self.length)
            total += pairwise if v < dropped else -pairwise  # the sign v used when masking
        return total

    def _require(self, count: int, what: str) -> None:
        if count < self.threshold:
            raise SecAggAbort(f"secure aggregation aborted: only {count} {what}, threshold is {self.threshold}")


def _seed_bytes(value: int) -> bytes:
    if value >= 2 ** (8 * 32):
        raise SecAggAbort("a rebuilt secret is out of range: inconsistent shares")
    return value.to_bytes(32, "little")
