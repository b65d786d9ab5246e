"""One training run from a composed config: build it, run the loop, write the run directory."""
from __future__ import annotations

import logging
import platform
from pathlib import Path
from typing import Callable

import torch
import fedrun
from fedrun import loop
from fedrun.rundir import RunDir

log = logging.getLogger(__name__)


def train(exp: loop.Experiment, *, on_round: Callable[[dict], None] | None = None) -> tuple[Path, dict]:
    """Run a built experiment to the end; return its run directory and the summary written there."""
    cfg = exp.cfg
    rundir = RunDir.create(cfg.run_dir, cfg)
    try:
        log.info("run directory: %s", rundir.path)
        log.info("data: %s", exp.data.fingerprint)
        write_partition(rundir, exp)
        summary = loop.run(exp, rundir, on_round=on_round)
        summary |= {
            "name": cfg.name,
            "data": exp.data.fingerprint,
            "parameters": sum(p.numel() for p in exp.make_model().parameters()),
            "device": str(exp.device),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "fedrun": fedrun.__version__},
        }
        rundir.write_json("summary.json", summary)
    finally:
        rundir.close()
    return rundir.path, summary


def write_partition(rundir: RunDir, exp: loop.Experiment) -> None:
    """partition.csv: each client's name and its numbers of train and test examples."""
    rows = ({"client_id": i, "name": c.name, "train_examples": len(c.train), "test_examples": len(c.test)}
            for i, c in enumerate(exp.data.clients))
    rundir.table("partition.csv", ["client_id", "name", "train_examples", "test_examples"]).append(rows)
