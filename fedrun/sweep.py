"""`fedrun sweep`: many runs through Hydra's own multirun machinery (its sweeper and launcher).

Every job is an ordinary run directory under one sweep directory, with Hydra's record of the
job (`.hydra/overrides.yaml`, `.hydra/config.yaml`) beside it. Any Hydra sweeper or launcher
plugin works by config: `hydra/launcher=joblib` runs jobs in parallel processes,
`hydra/launcher=submitit_slurm` on a SLURM cluster, `hydra/sweeper=optuna` searches
hyperparameters, minimising or maximising the value each job returns (the final value of the
`objective` metric). A job whose config is out of range, or whose training fails or diverges,
is recorded as failed in its run directory (status.json) and the sweep goes on.

The grid's jobs are written to the sweep directory before the first starts (fedrun/sweep_plan.py),
so `resume_sweep` finishes every job of an interrupted sweep. Each job reports its start and end
to `on_job` (the CLI's progress lines) when it runs in this process, as the default launcher does.
"""
from __future__ import annotations

import datetime as dt
import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from fedrun import config, run_config, sweep_plan
from fedrun.core import FedrunError
from fedrun.records import METRIC_COLUMNS

log = logging.getLogger(__name__)

OnJob = Callable[[dict], None]  # {"job", "of", "label", "state": started/finished/failed, "value"/"error", ...}
_sweep: dict = {}  # the running sweep's count, labels and on_job, for run_job (Hydra calls it with a config only)


def sweep_dir_for(overrides: list[str], *, now: dt.datetime) -> Path:
    """runs/sweeps/YYYY-MM-DD/HH-MM-SS_<name>, with <name> from a `name=` override if given."""
    names = [o.split("=", 1)[1] for o in overrides if o.startswith("name=")]
    name = names[-1] if names and "," not in names[-1] else config.compose([], check_ranges=False).name
    base = Path("runs") / "sweeps" / now.strftime("%Y-%m-%d") / f"{now:%H-%M-%S}_{name}"
    path, n = base, 1
    while path.exists():  # two sweeps started within the same second
        path, n = base.with_name(f"{base.name}_{n}"), n + 1
    return path


def grid_jobs(overrides: list[str]) -> list[list[str]] | None:
    """Compose every job of a grid sweep before running any: a wrong key, option or type stops
    the sweep with one line. Out-of-range values are left to fail their own job. Returns each
    job's overrides in Hydra's order (its job numbers); None for a search sweeper."""
    if any(o.startswith("hydra/sweeper=") for o in overrides):
        return None  # a search sweeper's overrides (interval(...), tag(...)) are not a grid
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    parsed = OverridesParser.create().parse_overrides([o for o in overrides if not o.startswith("hydra")])
    jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    for job in jobs:
        config.compose(job, check_ranges=False)
    return jobs


def _check_launcher(overrides: list[str], jobs: list[list[str]] | None) -> None:
    """backend=process starts worker processes, which a daemonic pool worker may not have: refuse
    joblib's multiprocessing backend with it before any job (its default, loky, is fine)."""
    if "hydra.launcher.backend=multiprocessing" not in overrides:
        return
    uses_process = any(o.split("=", 1)[0] == "backend" and "process" in o.split("=", 1)[1].split(",")
                       for o in overrides) if jobs is None else \
        any(config.compose(job, check_ranges=False).backend._target_.endswith("ProcessBackend") for job in jobs)
    if uses_process:
        raise FedrunError("hydra.launcher.backend: multiprocessing runs jobs in daemonic processes, where "
                          "backend=process cannot start its workers; allowed with backend=process: loky (the "
                          "default), or pick backend=sequential or vectorized")


def run_sweep(overrides: list[str], *, on_job: OnJob | None = None) -> Path:
    """Run the sweep in-process through hydra.main's multirun; return the sweep directory."""
    from fedrun.train import RunInterrupted

    jobs = grid_jobs(overrides)
    _check_launcher(overrides, jobs)
    sweep_dir = sweep_dir_for(overrides, now=dt.datetime.now())
    sweep_plan.write_plan(sweep_dir, overrides=overrides, jobs=jobs)  # before any job: resume knows them all
    log.info("sweep of %s jobs into %s", "searched" if jobs is None else len(jobs), sweep_dir)
    # Absolute for the launcher: joblib's loky workers outlive a sweep, with the working directory
    # they started in, and would put a later sweep's jobs under that one.
    argv = ["fedrun-sweep", "--multirun", f"hydra.sweep.dir={sweep_dir.resolve()}",
            "hydra.sweep.subdir=${hydra.job.num}", "hydra/job_logging=none", "hydra/hydra_logging=none", *overrides]
    saved, sys.argv = sys.argv, argv
    _sweep.update(of=None if jobs is None else len(jobs), on_job=on_job, overrides=overrides,
                  labels=None if jobs is None else sweep_plan.labels(jobs))
    try:
        hydra.main(config_path=str(config.conf_dir()), config_name="config", version_base=None)(run_job)()
    except SystemExit as e:  # hydra exits on a broken sweep; the message is already printed
        if e.code:
            raise FedrunError(f"sweep: Hydra stopped the sweep (exit code {e.code}); see the message above") from None
    except KeyboardInterrupt as e:  # the sweep, not only its current job, is what to resume
        raise RunInterrupted(sweep_dir) from e
    finally:
        sys.argv = saved
        _sweep.clear()
    return sweep_dir


def resume_sweep(sweep_dir: Path, overrides: list[str], *, on_job: OnJob | None = None) -> int:
    """Finish every job of a planned sweep: resume the stopped ones, start the ones never started,
    retry the failed ones; `overrides` (rounds=N) apply to each. Returns the number that failed."""
    from fedrun import train
    from fedrun.rundir import is_run_dir
    from fedrun.train import RunInterrupted

    jobs = sweep_plan.planned_jobs(sweep_dir)
    if jobs is None:  # a search: only its jobs that started are known
        jobs = [sweep_plan.Job(int(p.name), [], p) for p in sorted(Path(sweep_dir).iterdir(), key=lambda p: p.name)
                if p.name.isdigit() and is_run_dir(p)]
        jobs.sort(key=lambda j: j.num)
    names = sweep_plan.labels([job.overrides for job in jobs])
    train.resume_changes(overrides)  # a key that may not change stops the resume before any job
    failed = 0
    for job, label in zip(jobs, names):
        if job.finished and not train.extends(job.path, overrides):
            continue
        event = {"job": job.num, "of": len(jobs), "label": label, "run_dir": str(job.path)}
        try:
            if is_run_dir(job.path):
                exp, rundir, checkpoint = train.load_for_resume(job.path, overrides)
                event["from_round"] = checkpoint["round"] if checkpoint else 0
                _report(on_job, event | {"state": "started"})
                _, summary = train.resume(exp, rundir, checkpoint)
                _report(on_job, event | _finished(exp.cfg, summary))
                continue
        except KeyboardInterrupt as e:
            raise RunInterrupted(sweep_dir) from e
        except Exception as e:  # the job stays as it was (its status says why); the others go on
            failed += 1
            _report(on_job, event | {"state": "failed", "error": _error(e)})
            continue
        _report(on_job, event | {"state": "started"})
        try:
            failed += math.isnan(_run_one(_job_config(job, overrides), event, on_job))
        except KeyboardInterrupt as e:
            raise RunInterrupted(sweep_dir) from e
        except FedrunError as e:  # the plan's overrides no longer compose (a plan from elsewhere)
            failed += 1
            _report(on_job, event | {"state": "failed", "error": str(e)})
    return failed


def _job_config(job: sweep_plan.Job, overrides: list[str]) -> DictConfig:
    """The config Hydra would give a planned job that never started. The plan is untrusted: the
    composed config passes the checks of a run directory's config.yaml (only shipped components)."""
    cfg = config.compose([*job.overrides, *overrides], check_ranges=False)
    cfg.run_dir = str(job.path.resolve())  # as Hydra gives it
    run_config.check_untrusted(OmegaConf.to_container(cfg))
    return cfg


def run_job(cfg: DictConfig) -> float:
    """One job of the sweep: a normal run in the job's directory. Returns the final objective
    (NaN when the job failed, which search sweepers such as Optuna treat as a failed trial)."""
    hydra_cfg = HydraConfig.get()
    cfg.run_dir = hydra_cfg.runtime.output_dir
    job = hydra_cfg.job.num
    labels = _sweep.get("labels")
    label = labels[job] if labels and job < len(labels) else \
        " ".join(o for o in hydra_cfg.overrides.task if o not in _sweep.get("overrides", ()))
    event = {"job": job, "of": _sweep.get("of"), "label": label, "run_dir": cfg.run_dir}
    _report(_sweep.get("on_job"), event | {"state": "started"})
    return _run_one(cfg, event, _sweep.get("on_job"))


def _run_one(cfg: DictConfig, event: dict, on_job: OnJob | None) -> float:
    from fedrun import train
    from fedrun.rundir import RunDir

    try:
        OmegaConf.resolve(cfg)
        cfg = config.typed(cfg)  # as `fedrun train` types it: `client.lr=1` is the float 1.0
        config.validate(cfg)
        _, summary = train.train(config.build(cfg))
    except Exception as e:  # recorded in the job's run directory; the sweep goes on
        error = _error(e)
        if not (Path(cfg.run_dir) / "metrics.csv").exists():
            rundir = RunDir.create(cfg.run_dir, cfg)
            rundir.table("metrics.csv", METRIC_COLUMNS)
            rundir.set_status("failed", round_idx=0, error=error)
            rundir.close()
        log.log(logging.INFO if on_job else logging.WARNING, "job %s failed: %s", event["job"], error)
        _report(on_job, event | {"state": "failed", "error": error})
        return math.nan
    done = _finished(cfg, summary)
    log.info("job %s finished: final %s %.4f", event["job"], cfg.objective, done["value"])
    _report(on_job, event | done)
    return done["value"]


def _finished(cfg: DictConfig, summary: dict) -> dict:
    return {"state": "finished", "objective": cfg.objective, "value": summary["final"][cfg.objective]}


def _error(e: Exception) -> str:
    return str(e) if isinstance(e, FedrunError) else f"{type(e).__name__}: {e}"


def _report(on_job: OnJob | None, event: dict) -> None:
    if on_job is not None:
        on_job(event)
