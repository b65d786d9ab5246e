"""The PRV accountant's memory stays flat in rounds: its transforms leave no plans behind.

scipy.fft caches the plans of its 16 latest transform lengths, each O(length). Every PRV
evaluation transforms a grid of a new length (it grows with the rounds), so each left its plan
behind: +305 MB of RSS over 20 evaluations up to 1000 rounds, +1.7 GB up to 4000 rounds.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from collections import Counter

import pytest
import scipy.fft._basic_backend as scipy_transforms
from opacus.accountants import PRVAccountant

from fedrun.privacy.accounting import calibrate_noise, epsilon_of

HISTORIES = [[(1.0, 0.1, 300)], [(1.1, 0.1, 30), (0.9, 0.05, 20), (2.0, 0.2, 7)]]  # (z, q, steps)
TRANSFORMS = ("fft", "ifft", "rfft", "irfft", "fftn", "ifftn", "rfftn", "irfftn")


def _opacus(history: list[tuple[float, float, int]]) -> float:
    accountant = PRVAccountant()
    accountant.history = list(history)
    return accountant.get_epsilon(1e-5)


def test_prv_transforms_never_reach_scipys_plan_cache(monkeypatch):
    expected = [_opacus(h) for h in HISTORIES]
    calibrated = calibrate_noise(target_epsilon=2.0, delta=1e-5, sample_rate=0.1, rounds=50, accountant="prv")

    def refuse(*args, **kwargs):
        raise AssertionError("scipy.fft computed a transform, and cached its plan")

    for name in TRANSFORMS:
        monkeypatch.setattr(scipy_transforms, name, refuse)
    with pytest.raises(AssertionError, match="cached its plan"):  # the patch does catch opacus' own transforms
        _opacus(HISTORIES[0])
    got = [epsilon_of(Counter({(z, q): n for z, q, n in h}), 1e-5, accountant="prv") for h in HISTORIES]
    assert got == expected  # bit-identical to opacus with scipy's transforms
    assert calibrate_noise(target_epsilon=2.0, delta=1e-5, sample_rate=0.1, rounds=50, accountant="prv") == calibrated


@pytest.mark.slow
def test_rss_stays_flat_over_20_prv_evaluations_up_to_1000_rounds():
    """RSS (not peak) after 19 more evaluations at 100..1000 rounds, against after the first.

    Before: +305 MB; now about 0 (one evaluation's own arrays, ~35 MB at 1000 rounds, are freed).
    The bound is generous because the allocator may keep some freed memory; it is not a timing."""
    script = textwrap.dedent("""
        from collections import Counter
        from fedrun.privacy.accounting import epsilon_of

        def rss():
            return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS")) / 1024

        epsilon_of(Counter({(1.0, 0.1): 50}), 1e-3, accountant="prv")
        start = rss()
        for steps in range(100, 1001, 50):
            epsilon_of(Counter({(1.0, 0.1): steps}), 1e-3, accountant="prv")
        print(rss() - start)
    """)
    growth = float(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)
    assert growth < 100, f"RSS grew by {growth:.0f} MB over 20 PRV evaluations"
