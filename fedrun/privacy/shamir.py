"""Shamir t-out-of-n secret sharing over a prime field, for secure aggregation's dropout recovery.

Shamir, "How to share a secret", CACM 1979. A secret s is the constant term of a random
polynomial f of degree t - 1 over GF(p); share x is (x, f(x)). Any t shares determine f,
hence s = f(0), by Lagrange interpolation; t - 1 shares are consistent with every secret.

Written here rather than taken from PyPI: the packages there are small single-author
projects (several over GF(256) only), and the whole scheme is the ~40 lines below.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

# The smallest prime above 2^256, so that any 32-byte secret (an X25519 private key, a
# mask seed) is one field element. Elements are sent as 33 bytes.
PRIME = 2**256 + 297
ELEMENT_BYTES = 33


def split(secret: int, *, threshold: int, xs: Iterable[int], seed: bytes, prime: int = PRIME) -> dict[int, int]:
    """Shares {x: f(x)} of `secret` for each x in `xs`; any `threshold` of them rebuild it.

    The t - 1 random coefficients come from a ChaCha20 keystream of the 32-byte `seed`
    (a real deployment draws `seed` from os.urandom). Each coefficient is reduced from 64
    bits more than the prime has, so its bias mod p is below 2^-64.
    """
    xs = list(xs)
    if not 0 <= secret < prime:
        raise ValueError(f"secret must lie in [0, prime), got {secret}")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold must lie in [1, {len(xs)}] (the number of shares), got {threshold}")
    if len(set(x % prime for x in xs)) != len(xs) or any(x % prime == 0 for x in xs):
        raise ValueError("share points must be distinct and nonzero mod the prime (x = 0 is the secret)")
    coefficients = [secret, *_random_elements(seed, count=threshold - 1, prime=prime)]
    return {x: _evaluate(coefficients, x, prime) for x in xs}


def reconstruct(shares: Mapping[int, int], *, prime: int = PRIME) -> int:
    """f(0) for the lowest-degree polynomial through `shares` ({x: y}).

    Given at least `threshold` shares this is the secret. Given fewer it is a value
    unrelated to the secret: callers must count shares before trusting the result.
    """
    if not shares:
        raise ValueError("need at least one share")
    secret = 0
    for xj, yj in shares.items():
        # Lagrange basis at 0: prod_{m != j} x_m / (x_m - x_j)
        num, den = 1, 1
        for xm in shares:
            if xm != xj:
                num = num * xm % prime
                den = den * (xm - xj) % prime
        secret = (secret + yj * num * pow(den, -1, prime)) % prime
    return secret


def _evaluate(coefficients: list[int], x: int, prime: int) -> int:
    """Horner's rule for sum_k c_k x^k mod prime."""
    y = 0
    for c in reversed(coefficients):
        y = (y * x + c) % prime
    return y


def _random_elements(seed: bytes, *, count: int, prime: int) -> list[int]:
    width = (prime.bit_length() + 64 + 7) // 8
    stream = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor().update(bytes(width * count))
    return [int.from_bytes(stream[i * width:(i + 1) * width], "little") % prime for i in range(count)]
