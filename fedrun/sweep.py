"""`fedrun sweep`: many runs through Hydra's own multirun machinery (its sweeper and launcher).

Every job is an ordinary run directory under one sweep directory, with Hydra's record of the
job (`.hydra/overrides.yaml`, `.hydra/config.yaml`) beside it. Any Hydra sweeper or launcher
plugin works by config: `hydra/launcher=joblib` runs jobs in parallel processes,
`hydra/launcher=submitit_slurm` on a SLURM cluster, `hydra/sweeper=optuna` searches
hyperparameters, minimising or maximising the value each job returns (the final value of the
`objective` metric). A job whose config is out of range, or whose training fails or diverges,
is recorded as failed in its run directory (status.json) and the sweep goes on.
"""
from __future__ import annotations

import datetime as dt
import logging
import math
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from fedrun import config
from fedrun.core import FedrunError
from fedrun.records import METRIC_COLUMNS

log = logging.getLogger(__name__)


def sweep_dir_for(overrides: list[str], *, now: dt.datetime) -> Path:
    """runs/sweeps/YYYY-MM-DD/HH-MM-SS_<name>, with <name> from a `name=` override if given."""
    names = [o.split("=", 1)[1] for o in overrides if o.startswith("name=")]
    name = names[-1] if names and "," not in names[-1] else config.compose([], check_ranges=False).name
    base = Path("runs") / "sweeps" / now.strftime("%Y-%m-%d") / f"{now:%H-%M-%S}_{name}"
    path, n = base, 1
    while path.exists():  # two sweeps started within the same second
        path, n = base.with_name(f"{base.name}_{n}"), n + 1
    return path


def check_jobs(overrides: list[str]) -> int:
    """Compose every job of a grid sweep before running any: a wrong key, option or type stops
    the sweep with one line. Out-of-range values are left to fail their own job."""
    if any(o.startswith("hydra/sweeper=") for o in overrides):
        return 0  # a search sweeper's overrides (interval(...), tag(...)) are not a grid
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    parsed = OverridesParser.create().parse_overrides([o for o in overrides if not o.startswith("hydra")])
    jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    for job in jobs:
        config.compose(job, check_ranges=False)
    return len(jobs)


def run_sweep(overrides: list[str]) -> Path:
    """Run the sweep in-process through hydra.main's multirun; return the sweep directory."""
    count = check_jobs(overrides)
    sweep_dir = sweep_dir_for(overrides, now=dt.datetime.now())
    log.info("sweep of %s jobs into %s", count or "searched", sweep_dir)
    argv = ["fedrun-sweep", "--multirun", f"hydra.sweep.dir={sweep_dir}", "hydra.sweep.subdir=${hydra.job.num}",
            "hydra/job_logging=none", "hydra/hydra_logging=none", *overrides]
    saved, sys.argv = sys.argv, argv
    try:
        hydra.main(config_path=str(config.conf_dir()), config_name="config", version_base=None)(run_job)()
    except SystemExit as e:  # hydra exits on a broken sweep; the message is already printed
        if e.code:
            raise FedrunError(f"sweep: Hydra stopped the sweep (exit code {e.code}); see the message above") from None
    finally:
        sys.argv = saved
    return sweep_dir


def run_job(cfg: DictConfig) -> float:
    """One job of the sweep: a normal run in the job's directory. Returns the final objective
    (NaN when the job failed, which search sweepers such as Optuna treat as a failed trial)."""
    from fedrun import train
    from fedrun.rundir import RunDir

    cfg.run_dir = HydraConfig.get().runtime.output_dir
    job = HydraConfig.get().job.num
    try:
        OmegaConf.resolve(cfg)
        cfg = config.typed(cfg)  # as `fedrun train` types it: `client.lr=1` is the float 1.0
        config.validate(cfg)
        _, summary = train.train(config.build(cfg))
    except Exception as e:  # recorded in the job's run directory; the sweep goes on
        error = str(e) if isinstance(e, FedrunError) else f"{type(e).__name__}: {e}"
        if not (Path(cfg.run_dir) / "metrics.csv").exists():
            rundir = RunDir.create(cfg.run_dir, cfg)
            rundir.table("metrics.csv", METRIC_COLUMNS)
            rundir.set_status("failed", round_idx=0, error=error)
            rundir.close()
        log.warning("job %s failed: %s", job, error)
        return math.nan
    value = summary["final"][cfg.objective]
    log.info("job %s finished: final %s %.4f", job, cfg.objective, value)
    return value
