"""Where a privacy mechanism's randomness comes from: the run's seed, or the operating system.

fedrun simulates its mechanisms, and by default every random draw derives from the run's seed
(kept in config.yaml), so a run is reproducible and resumes exactly. The flip side: anyone
with the run directory can regenerate the DP noise and secure aggregation's secrets, and so
remove the noise from a released model. `privacy.noise_source=os` seeds those streams from
os.urandom instead: runs are then no longer reproducible (nor exactly resumable), which is the
point. torch's generator is still a Mersenne twister and the noise is floating-point Gaussian
(see Mironov 2012 on its low bits): a deployment needs a cryptographic sampler on the device.
"""
from __future__ import annotations

import os

import torch

from fedrun.core import Stream, derive_seed

NOISE_SOURCES = ("seed", "os")


def stream_seed(seed: int, stream: Stream, *keys: int, source: str) -> int:
    """A 63-bit seed for `(seed, stream, *keys)`, or fresh from os.urandom when source is `os`."""
    if source == "os":
        return int.from_bytes(os.urandom(8), "little") >> 1
    return derive_seed(seed, stream, *keys)


def stream_generator(seed: int, stream: Stream, *keys: int, source: str) -> torch.Generator:
    return torch.Generator().manual_seed(stream_seed(seed, stream, *keys, source=source))
