"""Time to first round: from the process start to the moment the first round begins.

Split into what happens before data preparation (interpreter start, imports, composing the
config), data preparation (`config.build_data`, from the cache or not), the rest of the build
(model, strategy, backend, run directory) and the initial model's evaluation (round 0).
The marks are per process; after a run ends the next run of the same process (a sweep job)
counts from there, not from the process start.
"""
from __future__ import annotations

import os
import time


def _process_start() -> float:
    """Wall-clock time the process started: from /proc on Linux (10 ms ticks), elsewhere the
    time this module was first imported (early: fedrun.config imports it)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - (uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time()


_marks: dict[str, float] = {"origin": _process_start()}


def mark(name: str) -> None:
    """Record that `name` happens now: data_start, data_end, or origin (a run has ended)."""
    _marks[name] = time.time()


def breakdown(first_round: float, *, initial_eval: float) -> dict:
    """startup_seconds and its parts, given when the first round began (time.time())."""
    origin = _marks["origin"]
    data_start = max(_marks.get("data_start", origin), origin)
    data_end = max(_marks.get("data_end", data_start), data_start)
    parts = {"imports": data_start - origin, "data": data_end - data_start,
             "build": max(first_round - data_end - initial_eval, 0.0), "initial_eval": initial_eval}
    return {"startup_seconds": first_round - origin, "startup": {k: round(v, 3) for k, v in parts.items()}}
