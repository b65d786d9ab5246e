"""fedrun on a workload, as a user runs it: compose, build, `fedrun.train.train` to a run directory.

Rounds are timed from the outside, between the callbacks `train` makes after each round, so
everything fedrun does per round counts (sampling, training, aggregation, its tables). The
initial evaluation (round 0) happens before the first round starts and so counts in the time
to first round; `eval_every` and `checkpoint_every` are set past the last round, so only the
last round evaluates and checkpoints (the median leaves it out).
`python -m benchmarks.contender_fedrun SPEC RESULT`.
"""
from __future__ import annotations

import json
import sys

from benchmarks.measure import RoundClock
from fedrun import config
from fedrun.train import train

NO_EXTRAS = ["eval_every=1000000", "checkpoint_every=1000000", "logger=[csv]"]


def main(spec_path: str, result_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    clock = RoundClock()
    cfg = config.compose(spec["overrides"] + spec.get("backend", []) + NO_EXTRAS
                         + [f"run_dir={spec['workdir']}/run"])
    exp = config.build(cfg)

    def on_round(row: dict) -> None:
        if row["round"] > 0:
            clock.end_round()
        if row["round"] < cfg.rounds:
            clock.start_round()

    _, summary = train(exp, on_round=on_round)
    clock.report(result_path, eval_loss=summary["final"]["eval_loss"], warmup=spec["warmup"],
                 backend=cfg.backend._target_.rsplit(".", 1)[-1])


if __name__ == "__main__":
    main(*sys.argv[1:])
