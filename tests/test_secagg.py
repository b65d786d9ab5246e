"""Secure aggregation (Bonawitz et al. 2017): exact sums, dropout recovery, masking, Shamir, fixed point."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from fedrun.privacy import shamir
from fedrun.privacy.fixedpoint import dequantize_sum, quantize, validate_capacity
from fedrun.privacy.masking import mask_seed, prg_mask, private_key
from fedrun.privacy.secagg import ClientSecAgg, SecAggAbort, ServerSecAgg, share_point
from fedrun.privacy.secure_round import SecureSumRound

D = 1000
R = 2**32


def random_vectors(n: int, *, seed: int = 0, clip: float = 1.0) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {u: (torch.rand(D, generator=g) * 2 - 1) * clip for u in range(n)}


def random_words(n: int, *, seed: int = 0, high: int = R) -> dict[int, torch.Tensor]:
    rng = np.random.default_rng(seed)
    return {u: torch.from_numpy(rng.integers(0, high, D, dtype=np.int64)) for u in range(n)}


def sum_mod(words: dict[int, torch.Tensor], clients) -> torch.Tensor:
    return sum(words[u] for u in clients) % R


def secure_sum(vectors: dict[int, torch.Tensor], *, clip: float, bits: int, threshold: int, round_seed: int,
               dropped_after_masking=frozenset()) -> tuple[torch.Tensor, SecureSumRound]:
    """One round of the driver runs use: every client set up, the dropped ones never send."""
    rnd = SecureSumRound(sorted(vectors), round_seed=round_seed, threshold=threshold, length=D, value_range=clip,
                         bits=bits)
    masked = {u: rnd.client_mask(u, x) for u, x in vectors.items() if u not in dropped_after_masking}
    return rnd.server_sum(masked).values, rnd


def run_round(words: dict[int, torch.Tensor], *, threshold: int, round_seed: int,
              dropped_after_masking=frozenset(), silent_at_unmasking=frozenset()) -> torch.Tensor:
    """The protocol's four steps on integer inputs, with survivors that may not answer step 3."""
    clients, server, masked = protocol_until_masked(words, threshold=threshold, round_seed=round_seed)
    survivors, dropped = server.collect_masked({u: y for u, y in masked.items() if u not in dropped_after_masking})
    return server.unmask({u: clients[u].reveal_shares(survivors=survivors, dropped=dropped)
                          for u in survivors if u not in silent_at_unmasking})


# --- end to end: float sums -------------------------------------------------------------

@pytest.mark.parametrize("bits,dropped", [(16, set()), (16, {2, 5}), (24, {0})])
def test_secure_sum_is_the_plain_sum_within_the_quantisation_bound(bits, dropped):
    clip, n = 0.5, 7
    vectors = random_vectors(n, seed=bits, clip=clip)
    total, _ = secure_sum(vectors, clip=clip, bits=bits, threshold=4, dropped_after_masking=dropped, round_seed=11)
    survivors = [u for u in vectors if u not in dropped]
    plain = torch.stack([vectors[u].double() for u in survivors]).sum(0)
    bound = len(survivors) * 2 * clip / (2**bits - 1)  # one step per client
    assert total.shape == (D,)
    assert (total - plain).abs().max() <= bound
    assert (total - plain).abs().max() > 0  # it really went through fixed point


def test_secure_sum_is_reproducible_from_the_round_seed():
    vectors = random_vectors(5)
    a, _ = secure_sum(vectors, clip=1.0, bits=16, threshold=3, round_seed=1)
    b, _ = secure_sum(vectors, clip=1.0, bits=16, threshold=3, round_seed=1)
    assert torch.equal(a, b)


# --- exact sums mod 2^32 ----------------------------------------------------------------

def test_pairwise_masks_cancel_exactly_when_nobody_drops():
    words = random_words(6)  # full range: the sum wraps, and must wrap exactly
    assert torch.equal(run_round(words, threshold=4, round_seed=5), sum_mod(words, words))


@pytest.mark.parametrize("dropped", [{0}, {6}, {1, 3}, {0, 2, 5}, {4, 5, 6}])
def test_dropout_recovery_gives_the_exact_survivor_sum(dropped):
    words = random_words(7, seed=len(dropped))
    total = run_round(words, threshold=4, round_seed=9, dropped_after_masking=frozenset(dropped))
    assert torch.equal(total, sum_mod(words, set(words) - dropped))


def test_silent_survivors_still_count_when_enough_others_answer():
    words = random_words(6)
    total = run_round(words, threshold=3, round_seed=2, dropped_after_masking=frozenset({0}),
                      silent_at_unmasking=frozenset({1, 2}))
    assert torch.equal(total, sum_mod(words, {1, 2, 3, 4, 5}))


def test_the_survivor_sum_is_exact_in_counters_and_within_the_bound_in_values():
    vectors = random_vectors(6, clip=0.5)
    rnd = SecureSumRound(list(range(6)), round_seed=3, threshold=3, length=D, value_range=0.5, bits=20,
                         counter_max=[1000, D])
    masked = {u: rnd.client_mask(u, x, [100 * u + 7, u]) for u, x in vectors.items() if u != 4}
    sums = rnd.server_sum(masked)
    assert sums.counters == [sum(100 * u + 7 for u in masked), sum(masked)] and sums.survivors == 5
    plain = torch.stack([vectors[u].double() for u in masked]).sum(0)
    assert (sums.values - plain).abs().max() <= 5 * 1.0 / (2**20 - 1)


def test_too_few_survivors_abort_the_round():
    words = random_words(7)
    with pytest.raises(SecAggAbort, match="threshold is 4"):
        run_round(words, threshold=4, round_seed=3, dropped_after_masking=frozenset({0, 1, 2, 3}))
    with pytest.raises(SecAggAbort, match="answered"):
        run_round(words, threshold=4, round_seed=3, dropped_after_masking=frozenset({0, 1}),
                  silent_at_unmasking=frozenset({2, 3}))
    with pytest.raises(SecAggAbort):
        secure_sum(random_vectors(5), clip=1.0, bits=16, threshold=4, dropped_after_masking={1, 2}, round_seed=0)


# --- what the server sees ---------------------------------------------------------------

def protocol_until_masked(words: dict[int, torch.Tensor], *, threshold: int, round_seed: int):
    """Steps 0-2 by hand: the clients, the server, and every client's masked vector."""
    clients = {u: ClientSecAgg(u, round_seed=round_seed, threshold=threshold) for u in words}
    server = ServerSecAgg(threshold=threshold, length=D)
    roster = server.advertise({u: c.public_keys() for u, c in clients.items()})
    inboxes = server.route_shares({u: c.share_keys(roster) for u, c in clients.items()})
    for u, c in clients.items():
        c.receive_shares(inboxes[u])
    return clients, server, {u: c.masked_input(words[u]) for u, c in clients.items()}


def assert_looks_uniform_and_independent(masked: torch.Tensor, x: torch.Tensor) -> None:
    y = masked.to(torch.int64).double()
    corr = np.corrcoef(y.numpy(), x.double().numpy())[0, 1]
    assert abs(corr) < 0.15  # sd of r under independence is 1/sqrt(1000) = 0.032
    u = y / R
    assert abs(u.mean() - 0.5) < 4 * (1 / 12 / D) ** 0.5
    assert abs(u.var() - 1 / 12) < 0.01
    counts = torch.bincount((y // 2**28).long(), minlength=16).double()
    chi2 = float(((counts - D / 16) ** 2 / (D / 16)).sum())
    assert chi2 < 37.70  # 99.9% quantile of chi-square with 15 degrees of freedom


def test_each_masked_vector_is_uniform_and_uncorrelated_with_its_input():
    ramp = torch.arange(D, dtype=torch.int64) * 4000  # strongly structured, up to 2^22
    words = {u: ramp + u for u in range(5)}
    _, _, masked = protocol_until_masked(words, threshold=3, round_seed=4)
    for u, y in masked.items():
        assert y.dtype == torch.uint32
        assert_looks_uniform_and_independent(y, words[u])


def test_a_late_vector_stays_hidden_by_its_self_mask():
    ramp = torch.arange(D, dtype=torch.int64) * 4000
    words = {u: ramp for u in range(5)}
    clients, server, masked = protocol_until_masked(words, threshold=3, round_seed=8)
    late = 0
    survivors, dropped = server.collect_masked({u: y for u, y in masked.items() if u != late})
    reveals = {v: clients[v].reveal_shares(survivors=survivors, dropped=dropped) for v in survivors}
    # The server rebuilds the late client's mask key, as recovery requires, and strips
    # every pairwise mask from its vector: what remains is x + PRG(b_late).
    seed = shamir.reconstruct({share_point(v): r.mask_key_shares[late] for v, r in reveals.items()})
    key = private_key(seed.to_bytes(32, "little"))
    stripped = masked[late].to(torch.int64)
    for v in survivors:
        stripped = stripped + prg_mask(mask_seed(key, server.roster[v].mask), D)  # late < v: it added them
    assert_looks_uniform_and_independent(torch.remainder(stripped, R), words[late])
    assert torch.equal(server.unmask(reveals), sum_mod(words, survivors))


def test_server_accepts_only_masked_uint32_vectors():
    words = random_words(3)
    _, server, _ = protocol_until_masked(words, threshold=2, round_seed=0)
    with pytest.raises(SecAggAbort, match="uint32"):
        server.collect_masked({u: w for u, w in words.items()})


def test_client_refuses_to_reveal_both_secrets_of_one_client():
    clients, _, _ = protocol_until_masked(random_words(4), threshold=2, round_seed=0)
    with pytest.raises(SecAggAbort, match="inconsistent"):
        clients[0].reveal_shares(survivors=frozenset({0, 1, 2}), dropped=frozenset({2, 3}))


def test_tampered_shares_fail_authentication():
    clients = {u: ClientSecAgg(u, round_seed=0, threshold=2) for u in range(3)}
    roster = {u: c.public_keys() for u, c in clients.items()}
    sealed = clients[0].share_keys(roster)[1]
    clients[1].share_keys(roster)
    with pytest.raises(SecAggAbort, match="authentication"):
        clients[1].receive_shares({0: sealed[:-1] + bytes([sealed[-1] ^ 1])})


# --- Shamir -----------------------------------------------------------------------------

def test_shamir_textbook_example():
    # Wikipedia's worked example: f(x) = 1234 + 166 x + 94 x^2 over GF(1613).
    shares = {1: 1494, 2: 329, 3: 965, 4: 176, 5: 1188, 6: 775}
    for xs in itertools.combinations(shares, 3):
        assert shamir.reconstruct({x: shares[x] for x in xs}, prime=1613) == 1234


def test_shamir_any_t_shares_rebuild_the_secret_and_t_minus_1_do_not():
    secret, t = 2**256 - 12345, 3  # as large as a 32-byte seed gets
    shares = shamir.split(secret, threshold=t, xs=range(1, 7), seed=bytes(32))
    for xs in itertools.combinations(shares, t):
        assert shamir.reconstruct({x: shares[x] for x in xs}) == secret
    for xs in itertools.combinations(shares, t - 1):
        assert shamir.reconstruct({x: shares[x] for x in xs}) != secret


def test_shamir_prime_is_prime_and_holds_any_32_byte_secret():
    p = shamir.PRIME
    assert p > 2**256 and p.bit_length() <= 8 * shamir.ELEMENT_BYTES
    d, s = p - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41):  # Miller-Rabin
        x = pow(a, d, p)
        assert x in (1, p - 1) or any(pow(x, 2**r, p) == p - 1 for r in range(1, s))


# --- fixed point ------------------------------------------------------------------------

def test_stochastic_rounding_is_unbiased():
    clip, bits, repeats = 1.0, 4, 20000
    x = torch.tensor([-0.93, -0.31, 0.01, 0.44, 0.77], dtype=torch.float64)
    q = quantize(x.repeat(repeats), clip=clip, bits=bits, generator=torch.Generator().manual_seed(0))
    step = 2 * clip / (2**bits - 1)
    decoded = (q.double() * step - clip).view(repeats, -1)
    assert ((decoded - x).abs() < step).all()  # only the two neighbouring steps
    mean, se = decoded.mean(0), decoded.std(0) / repeats**0.5
    assert ((mean - x).abs() < 3 * se).all()


def test_quantize_clips_and_keeps_grid_points():
    g = torch.Generator().manual_seed(0)
    q = quantize(torch.tensor([-5.0, -1.0, 1.0, 5.0]), clip=1.0, bits=8, generator=g)
    assert q.tolist() == [0, 0, 255, 255]
    assert dequantize_sum(q[1:3], clip=1.0, bits=8, n=1).tolist() == [-1.0, 1.0]


def test_capacity_check_names_the_config_key():
    validate_capacity(2**16, bits=16)  # 2^16 * (2^16 - 1) < 2^32: fits
    with pytest.raises(ValueError, match="privacy.secagg_bits"):
        validate_capacity(2**16 + 1, bits=16)
    with pytest.raises(ValueError, match="privacy.secagg_bits"):
        secure_sum(random_vectors(3), clip=1.0, bits=31, threshold=2, round_seed=0)
    with pytest.raises(ValueError, match="a counter of up to"):
        SecureSumRound([0, 1], round_seed=0, threshold=2, length=4, value_range=1.0, bits=16, counter_max=[2**31])
    with pytest.raises(ValueError, match="privacy.secagg_bits"):
        dequantize_sum(torch.zeros(3, dtype=torch.int64), clip=1.0, bits=31, n=3)


# --- cost -------------------------------------------------------------------------------

@pytest.mark.parametrize("dropped", [frozenset(), frozenset({1, 3})])
def test_cost_counts_keys_shares_and_reveals(dropped):
    n = 5
    _, rnd = secure_sum(random_vectors(n), clip=1.0, bits=16, threshold=3, round_seed=0, dropped_after_masking=dropped)
    sealed, survivors = 2 * 33 + 16, n - len(dropped)  # two 33-byte field elements + AES-GCM tag
    up = 64 + (n - 1) * sealed + survivors * (n * 33) / n  # keys, shares; each survivor reveals n shares
    down = (n - 1) * (64 + sealed) + survivors * (4 * n) / n  # others' keys and shares; the request
    cost = rnd.cost()
    assert cost["secagg_bytes_per_client"] == pytest.approx(up + down) and cost["secagg_seconds"] > 0
