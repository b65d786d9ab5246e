"""The run's CPU threads: one budget for torch's pools, shared by the processes that run at once.

torch sizes its intra-op pool (OpenMP here) and MKL's to every core of the machine, in every
process. Two runs at once, a joblib sweep's n_jobs processes or backend=process's workers then
put several threads on each core, and OpenMP threads that spin while they wait for each other
turn a 2.6 s round into a minute. The `threads` key (default `auto`) fixes the budget:
- auto: the cores this process may use (its CPU affinity), divided by the number of runs the
  sweep's launcher starts at once (hydra/launcher=joblib's n_jobs);
- an integer: exactly that many.
It is applied before the run's first tensor operation and recorded in summary.json; a backend
with worker processes splits it among them. torch splits some reductions by thread, so runs
compared bit for bit (a resume against an uninterrupted run) need the same count.
"""
from __future__ import annotations

import logging
import os

import torch

from fedrun.core import FedrunError

log = logging.getLogger(__name__)

AUTO = "auto"
_applied: dict[str, int] = {}


def usable_cores() -> int:
    """The CPUs this process may run on (a taskset or a container's cpuset narrows them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def concurrent_runs() -> int:
    """How many runs the sweep's launcher runs at once (1 outside a parallel sweep)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        launcher = HydraConfig.get().launcher if HydraConfig.initialized() else None
    except Exception:  # noqa: BLE001 (no Hydra job context of any kind: a plain run)
        return 1
    n_jobs = launcher.get("n_jobs") if launcher is not None else None
    if not isinstance(n_jobs, int) or n_jobs == 0:
        return 1
    return usable_cores() if n_jobs < 0 else n_jobs  # joblib: -1 means one per core


def resolve(setting: str | int) -> int:
    """The thread count `threads=setting` means in this process."""
    if str(setting) == AUTO:
        return max(1, usable_cores() // concurrent_runs())
    try:
        count = int(setting)
    except (TypeError, ValueError):
        count = 0
    if count < 1:
        raise FedrunError(f"threads: {setting!r} is not allowed; allowed: auto, or an integer >= 1")
    return count


def apply(setting: str | int) -> int:
    """Size torch's intra-op (OpenMP, MKL) and inter-op pools; returns the count."""
    count = resolve(setting)
    torch.set_num_threads(count)
    if _applied.get("interop") != count:
        try:  # allowed once per process, before any inter-op work
            torch.set_num_interop_threads(count)
            _applied["interop"] = count
        except RuntimeError:
            log.debug("threads: torch's inter-op pool is already running; left at %d", torch.get_num_interop_threads())
    # Worker processes a backend starts read these before their libraries size their own pools.
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(count)
    _applied["threads"] = count
    return count


def budget() -> int:
    """The threads this run may use in all (what `apply` set; every usable core before it)."""
    return _applied.get("threads", usable_cores())


def per_worker(workers: int) -> int:
    """Threads for each of `workers` processes that share the run's budget."""
    return max(1, budget() // max(workers, 1))
