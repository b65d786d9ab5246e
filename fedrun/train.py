"""Runs from start to end: train a built experiment, or resume one from its run directory."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import torch
from omegaconf import DictConfig, OmegaConf

import fedrun
from fedrun import config, loop, run_config, startup, threads
from fedrun.core import FedrunError
from fedrun.last_round import LastRound
from fedrun.loggers import LOGGER_NAMES, make_loggers
from fedrun.records import ROUND_TABLES
from fedrun.rundir import RunDir, atomic_write, is_run_dir

log = logging.getLogger(__name__)


TYPED_PATHS_FILE = "typed_paths.json"  # the paths as the user typed them; config.yaml has them absolute


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped a run; it is recorded as `interrupted` and can be resumed."""

    def __init__(self, run_dir: Path):
        super().__init__(f"interrupted: {run_dir}")
        self.run_dir = run_dir


def train(exp: loop.Experiment, *, on_round: Callable[[dict], None] | None = None) -> tuple[Path, dict]:
    """Run a built experiment to the end; return its run directory and the summary written there."""
    rundir = RunDir.create(exp.cfg.run_dir, exp.cfg)  # locked until the run ends
    with _closed_on_error(rundir):
        log.info("run directory: %s", rundir.path)
        for key, typed in exp.typed_paths.items():  # config.yaml has them absolute
            log.info("%s: %s, as typed: %s", key, OmegaConf.select(exp.cfg, key), typed)
        if exp.typed_paths:
            atomic_write(rundir.path / TYPED_PATHS_FILE, lambda p: p.write_text(json.dumps(exp.typed_paths, indent=1)))
        log.info("data: %s", exp.data.fingerprint)
        write_partition(rundir, exp)
    return rundir.path, _run_to_end(exp, rundir, on_round=on_round, checkpoint=None)


def load_for_resume(path: str | Path, overrides: list[str] | None = None
                    ) -> tuple[loop.Experiment, RunDir, dict | None]:
    """Rebuild a run from its config.yaml, with its newest intact checkpoint (None: from scratch).

    `overrides` may raise `rounds` (a finished run is then extended) and set the keys of
    RESUME_KEYS, which change nothing about the rounds already run."""
    rundir = RunDir(Path(path))
    if not is_run_dir(rundir.path):
        raise FedrunError(f"run_dir: {path} is not a run directory (no config.yaml and metrics.csv)")
    cfg = run_config.load_run_config(rundir.path)  # untrusted input: only components fedrun ships
    changes = resume_changes(overrides or [])
    _check_extension(cfg, changes)
    if (rundir.path / "summary.json").exists() and changes.get("rounds", cfg.rounds) <= cfg.rounds:
        raise FedrunError(f"run_dir: {path} has already finished (summary.json exists); "
                          f"extend it with `fedrun resume {path} rounds=N`, N > {cfg.rounds}")
    cfg.merge_with(changes)
    cfg.run_dir = str(rundir.path)
    exp = config.build(cfg)
    if changes:
        _record_changes(rundir, changes)
    return exp, rundir, rundir.latest_checkpoint()


RESUME_KEYS = ("rounds", "checkpoint_every", "checkpoint_keep")  # none changes a round already run


def resume_changes(overrides: list[str]) -> dict:
    """`key=value` overrides of a resume, checked: only RESUME_KEYS, each a positive integer."""
    changes: dict = {}
    for override in overrides:
        key, eq, value = override.partition("=")
        key = key.lstrip("+")
        if key not in RESUME_KEYS or not eq:
            raise FedrunError(f"{key or override}: cannot be changed on resume (the rounds already run would not "
                              f"match it); allowed: {', '.join(f'{k}=...' for k in RESUME_KEYS)}")
        if value.strip().lower() in ("null", "none") and key == "checkpoint_keep":
            changes[key] = None
            continue
        try:
            changes[key] = int(value)
        except ValueError:
            raise FedrunError(f"{key}: {value!r} is not an integer") from None
        if changes[key] < 1:
            raise FedrunError(f"{key}: {changes[key]} is not allowed; allowed: >= 1")
    return changes


def _check_extension(cfg: DictConfig, changes: dict) -> None:
    """`rounds` is never lowered, nor raised where the run's noise was calibrated to its rounds."""
    if changes.get("rounds", cfg.rounds) < cfg.rounds:
        raise FedrunError(f"rounds: {changes['rounds']} is fewer than the run's {cfg.rounds}; a resume can only "
                          "extend a run")
    if changes.get("rounds", cfg.rounds) > cfg.rounds and "noise_multiplier" in cfg.privacy \
            and cfg.privacy.noise_multiplier is None:
        raise FedrunError(f"rounds: the noise of this run was calibrated to spend privacy.target_epsilon over "
                          f"{cfg.rounds} rounds; more rounds would exceed it (start a new run instead)")


def extends(path: Path, overrides: list[str]) -> bool:
    """Whether `overrides` raise the rounds of the run at `path` (a finished run then goes on)."""
    changes = resume_changes(overrides)
    if "rounds" not in changes:
        return False
    cfg = run_config.load_run_config(path)
    _check_extension(cfg, changes)  # fewer rounds: refused, not "nothing to resume"
    return changes["rounds"] > cfg.rounds


def _record_changes(rundir: RunDir, changes: dict) -> None:
    """config.yaml gets the new values, as written (only these keys change). summary.json goes first,
    so a crash in between leaves an unfinished run with its old config, which resumes as before."""
    from fedrun.run_config import MAX_CONFIG_BYTES, parse_yaml
    from fedrun.rundir import read_regular_bytes

    rundir.lock()
    try:
        tree = parse_yaml(read_regular_bytes(rundir.path / "config.yaml", limit=MAX_CONFIG_BYTES))
        if (rundir.path / "summary.json").exists():  # it goes first; status.json must not say finished without it
            (rundir.path / "summary.json").unlink()
            rundir.set_status("interrupted", round_idx=tree.get("rounds", 0))
        text = OmegaConf.to_yaml(OmegaConf.create(tree | changes))
        atomic_write(rundir.path / "config.yaml", lambda p: p.write_text(text))
    finally:
        rundir.close()
    log.info("%s: %s", rundir.path, ", ".join(f"{k}={v}" for k, v in changes.items()))


def resume(exp: loop.Experiment, rundir: RunDir, checkpoint: dict | None, *,
           on_round: Callable[[dict], None] | None = None) -> tuple[Path, dict]:
    """Continue a stopped run; its tables end exactly as an uninterrupted run's would."""
    rundir.lock()  # a run still training (or another resume) holds it: refused before anything changes
    with _closed_on_error(rundir, round_idx=checkpoint["round"] if checkpoint else 0):
        if (rundir.path / "summary.json").exists():  # it finished while this process was loading it
            raise FedrunError(f"run_dir: {rundir.path} has already finished (summary.json exists)")
        rundir.open_log()
        if checkpoint is None:  # stopped before its first checkpoint: start over in place
            log.warning("no intact checkpoint in %s: restarting from round 0", rundir.path)
            for name in ROUND_TABLES:  # emptied, not removed: killed now, it is still a run to resume
                if (rundir.path / name).exists():
                    atomic_write(rundir.path / name, lambda p: p.write_bytes(b""))
            write_partition(rundir, exp)  # whole again, whenever the first run was killed
        else:
            log.info("resuming %s from round %d", rundir.path, checkpoint["round"])
            torch.set_rng_state(checkpoint["rng"]["torch"])
    return rundir.path, _run_to_end(exp, rundir, on_round=on_round, checkpoint=checkpoint)


@contextlib.contextmanager
def _closed_on_error(rundir: RunDir, *, round_idx: int = 0) -> Iterator[None]:
    """Release the run directory (its lock and log) when a run fails before `_run_to_end` owns it;
    Ctrl-C there leaves it `interrupted` (resumable), as it does later."""
    try:
        yield
    except KeyboardInterrupt as e:
        _record_end(rundir, "interrupted", round_idx=round_idx)
        rundir.close()
        raise RunInterrupted(rundir.path) from e
    except BaseException:
        rundir.close()
        raise


def _run_to_end(exp: loop.Experiment, rundir: RunDir, *, on_round, checkpoint) -> dict:
    loggers: list = []
    started: dict = {}
    done = {"round": checkpoint["round"] if checkpoint else 0}  # the last round whose row is written
    last_round = LastRound()  # its state, for Ctrl-C to checkpoint

    def each_round(row: dict) -> None:
        done["round"] = row["round"]
        if not started:  # round 0 is logged just before round 1 starts; a resumed run's first row after its round
            first_round = time.time() - (row["seconds"] if row["round"] else 0.0)
            started.update(startup.breakdown(first_round, initial_eval=0.0 if row["round"] else row["seconds"]))
            started["startup"]["data_cache"] = exp.data.provenance.get("cache", "off")
            log.info("startup: %.2f s to the first round %s", started["startup_seconds"], started["startup"])
        for logger in loggers:
            logger.log_round(row)
        if on_round is not None:
            on_round(row)

    try:  # from here every way out records the run's state and releases its directory
        names = [name for name in LOGGER_NAMES if exp.cfg.logger.get(name)]
        loggers = make_loggers(names, rundir.path, tracking_uri=exp.cfg.logger.get("tracking_uri"))
        for logger in loggers:
            logger.log_config(cast(dict, OmegaConf.to_container(exp.cfg)))
        summary = loop.run(exp, rundir, on_round=each_round, checkpoint=checkpoint, last_round=last_round)
        summary |= {
            "name": exp.cfg.name,
            **started,
            "data": exp.data.fingerprint,
            **({"public_data": exp.strategy.public_fingerprint} if hasattr(exp.strategy, "public_fingerprint") else {}),
            "parameters": sum(p.numel() for p in exp.make_model().parameters()),
            "device": str(exp.device),
            "threads": threads.budget(),  # fedrun/threads.py: what threads=auto resolved to
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),  # fedrun/__init__.py: passive unless set
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "fedrun": fedrun.__version__},
        }
        rundir.write_json("summary.json", summary)
        rundir.set_status("finished", round_idx=summary["rounds"])
        for logger in loggers:
            logger.log_summary(summary)
        return summary
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (the CLI raises it too): resumable, not failed
        saved = last_round.save(rundir, keep=exp.cfg.checkpoint_keep)
        _record_end(rundir, "interrupted", round_idx=max(done["round"], saved or 0))
        raise RunInterrupted(rundir.path) from e
    except BaseException as e:
        _record_end(rundir, "failed", round_idx=done["round"], error=f"{type(e).__name__}: {e}")
        raise
    finally:
        exp.backend.close()  # worker processes and Ray actors end with the run, also on Ctrl-C
        for logger in loggers:
            logger.close()
        rundir.close()


def _record_end(rundir: RunDir, state: str, *, round_idx: int, error: str | None = None) -> None:
    try:
        rundir.set_status(state, round_idx=round_idx, error=error)
    except FedrunError as e:  # a full disk may refuse status.json too; the run's own error matters more
        log.error("%s", e)


def write_partition(rundir: RunDir, exp: loop.Experiment) -> None:
    """partition.csv: each client's name and its numbers of train and test examples (written at
    once), and for a table's instruction examples the file rows in each split (space-separated
    row numbers; empty for other data)."""
    data, source = exp.data, exp.data.source_rows
    sizes = zip(data.client_names(), data.client_sizes("train").tolist(), data.client_sizes("test").tolist())

    def numbers(k: int, split: str) -> str:
        return "" if source is None else " ".join(map(str, source.client(k, split).tolist()))

    rows = ({"client_id": i, "name": name, "train_examples": train, "test_examples": test,
             "train_rows": numbers(i, "train"), "test_rows": numbers(i, "test")}
            for i, (name, train, test) in enumerate(sizes))
    rundir.table("partition.csv", ["client_id", "name", "train_examples", "test_examples", "train_rows",
                                   "test_rows"]).replace(rows)
