"""W3's population points (100 clients a round of 1,000, 10,000 and 100,000) in one process,
their rounds interleaved: a round at 1,000, one at 10,000, one at 100,000, and again.

This machine's speed drifts by up to 2x for seconds to minutes at a time, and W3's separate
processes run minutes apart, so their ratios carry that drift. Here each population's run is
`fedrun.train.train` in its own thread, and a turnstile lets one round run at a time, in turn:
whatever the machine does, it does to every population alike. Only backends that train in
the main process can share it (`sequential`, `vectorized`).
`python -m benchmarks.w3_interleaved [BACKEND ...]` (default: sequential vectorized).
"""
from __future__ import annotations

import statistics
import sys
import threading
import time

from benchmarks.contender_fedrun import NO_EXTRAS
from benchmarks.measure import Turnstile
from benchmarks.run import RESULTS, has_cap
from benchmarks.workloads import w3
from fedrun import config
from fedrun.train import train

ROUNDS = 20
BACKENDS = ["sequential", "vectorized"]  # the backends that train in the main process
CLIENTS_PER_ROUND = 100


def measure(backend: str, workdir) -> dict[int, list[float]]:
    """Seconds of every round, per population, with the rounds interleaved."""
    points = [w for w in w3(quick=False, has_cap=has_cap()) if w.point["clients_per_round"] == CLIENTS_PER_ROUND]
    exps = []
    for w in points:
        overrides = [o for o in w.overrides if not o.startswith("rounds=")] + [f"rounds={ROUNDS}"]
        run_dir = workdir / f"{backend}_N{w.point['population']}"
        cfg = config.compose(overrides + [f"backend={backend}", *NO_EXTRAS, f"run_dir={run_dir}"])
        exps.append((w.point["population"], config.build(cfg)))
    gate = Turnstile(len(exps))
    seconds: dict[int, list[float]] = {n: [] for n, _ in exps}
    errors: list[BaseException] = []

    def one(i: int, population: int, exp) -> None:
        started = 0.0

        def on_round(row: dict) -> None:
            nonlocal started
            if row["round"] > 0:
                seconds[population].append(time.perf_counter() - started)
            started = gate.boundary(i)

        gate.wait_for(i)
        try:
            train(exp, on_round=on_round)
        except BaseException as e:  # noqa: BLE001 - reported after the others finish
            errors.append(e)
        finally:
            gate.pass_on(i, finished=True)

    threads = [threading.Thread(target=one, args=(i, n, exp)) for i, (n, exp) in enumerate(exps)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return seconds


def measure_all(*backends: str) -> dict:
    """{backend: {population: median, ratio to N=1,000's round by round, rounds}}."""
    import shutil

    workdir = RESULTS / "work" / "w3_interleaved"
    shutil.rmtree(workdir, ignore_errors=True)
    out = {}
    for backend in backends or BACKENDS:
        seconds = measure(backend, workdir)
        timed = {n: s[1:-1] for n, s in seconds.items()}  # no warm-up, no last round (it evaluates)
        base = timed[min(timed)]
        # Round r at N ran right after round r at 1,000: their ratio cancels the machine's drift.
        out[backend] = {str(n): {"median": statistics.median(s),
                                 "ratio": statistics.median(a / b for a, b in zip(s, base)),
                                 "rounds": seconds[n]} for n, s in timed.items()}
    return out


if __name__ == "__main__":
    from benchmarks.report import interleaved_table

    print(interleaved_table(measure_all(*sys.argv[1:])))
