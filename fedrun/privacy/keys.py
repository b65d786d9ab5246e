"""The config keys several privacy mechanisms share, typed and ranged once (their schemas are
the mechanisms' signatures, fedrun/components.py): CentralPrivacy, SecureAggregation and
LocalPrivacy annotate their parameters with these."""
from __future__ import annotations

import math
from typing import Annotated

from fedrun.components import OneOf, Range
from fedrun.privacy.accounting import ACCOUNTANTS
from fedrun.privacy.fixedpoint import MAX_BITS, MIN_BITS
from fedrun.privacy.randomness import NOISE_SOURCES

MIN_COHORT = 2  # a secure "sum" of one client is that client's update

Accountant = Annotated[str, OneOf(*ACCOUNTANTS)]
NoiseSource = Annotated[str, OneOf(*NOISE_SOURCES)]
NoiseMultiplier = Annotated[float, Range(ge=0, null="calibrate from privacy.target_epsilon")]
TargetEpsilon = Annotated[float, Range(gt=0, lt=math.inf, words="a finite number > 0")]
Delta = Annotated[float, Range(gt=0, lt=1)]
ClipNorm = Annotated[float, Range(gt=0)]
SecaggBits = Annotated[int, Range(ge=MIN_BITS, le=MAX_BITS, null="the most the cohort allows")]
SecaggThreshold = Annotated[float, Range(gt=0, le=1)]  # a fraction of the round's cohort
SecaggMinClients = Annotated[int, Range(ge=MIN_COHORT)]
