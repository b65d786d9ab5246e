"""Fixed-point encoding of float updates into Z_{2^32} for secure aggregation.

Bonawitz et al., CCS 2017, mask integer vectors in Z_R; updates must first become
integers whose sum over the cohort does not wrap around R = 2^32. Each coordinate is
clipped to [-clip, clip], shifted to [0, 2 clip] and cut into 2^bits - 1 steps of
scale = 2 clip / (2^bits - 1), so it encodes to an integer in [0, 2^bits - 1]; rounding
to a neighbouring step is stochastic and unbiased (E[q] = (x + clip) / scale).

A sum of n encodings is at most n (2^bits - 1) < 2^32 whenever n 2^bits <= 2^32, and
then decodes exactly as sum * scale - n clip. Each client's rounding moves a coordinate
by less than one step, so for inputs inside [-clip, clip] the decoded sum is within
n * scale of the true sum in every coordinate (with variance at most n scale^2 / 4).
Coordinates outside [-clip, clip] are clipped first: that error is not bounded here, so
choose clip >= the largest coordinate (an L2 clip norm C bounds every coordinate by C).
"""
from __future__ import annotations

import torch

MODULUS = 2**32
# The fixed-point widths an encoding may have: one home for the range of privacy.secagg_bits
# (the signatures of CentralPrivacy and SecureAggregation mark it with these). 32 bits fit a
# lone client only; a cohort of n fits at most 32 - ceil(log2 n) (`validate_capacity`).
MIN_BITS, MAX_BITS = 1, 32


def validate_capacity(n: int, *, bits: int) -> None:
    """Raise ValueError unless n encodings of `bits` bits sum without wrapping mod 2^32."""
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"privacy.secagg_bits: must lie in [{MIN_BITS}, {MAX_BITS}], got {bits}")
    if n < 1:
        raise ValueError(f"secure aggregation needs at least one client, got n={n}")
    if n * 2**bits > MODULUS:
        most = 32 - (n - 1).bit_length()  # the largest b with n 2^b <= 2^32
        raise ValueError(f"privacy.secagg_bits: {bits} bits overflow 32-bit sums over {n} clients "
                         f"(n * 2^bits = {n * 2**bits} > 2^32); use at most {most}")


def scale(*, clip: float, bits: int) -> float:
    """The value of one integer step."""
    if clip <= 0:
        raise ValueError(f"privacy.secagg_clip: must be > 0, got {clip}")
    return 2 * clip / (2**bits - 1)


def quantize(x: torch.Tensor, *, clip: float, bits: int, generator: torch.Generator) -> torch.Tensor:
    """(D,) float -> (D,) int64 in [0, 2^bits - 1], stochastically rounded; clips to [-clip, clip]."""
    validate_capacity(1, bits=bits)
    steps = (x.double().clamp(-clip, clip) + clip) / scale(clip=clip, bits=bits)
    # floor(s + U), U ~ U[0, 1): rounds up with probability frac(s), so E[q] = s.
    noise = torch.rand(steps.shape, generator=generator, dtype=torch.float64)
    # The clamp only guards float round-off at the top step.
    return torch.floor(steps + noise).to(torch.int64).clamp_(0, 2**bits - 1)


def dequantize_sum(s: torch.Tensor, *, clip: float, bits: int, n: int) -> torch.Tensor:
    """(D,) sum mod 2^32 of n encodings -> (D,) float64 sum of the decoded vectors.

    float64 so that decoding adds no error comparable to the n * scale bound.
    """
    validate_capacity(n, bits=bits)
    return s.double() * scale(clip=clip, bits=bits) - n * clip
