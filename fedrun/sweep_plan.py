"""A sweep's plan: its jobs and their overrides, in SWEEP_DIR/sweep.json before the first job starts.

Hydra makes a job's directory only when the job starts, so a sweep stopped half-way would
otherwise forget the jobs it never reached. With the plan, `fedrun resume SWEEP_DIR` finishes
every job (resumes those that stopped, starts those that never did) and `fedrun report` says
when a sweep is incomplete. A search sweeper (Optuna) picks its jobs as it goes: its plan lists
none, and only the jobs that started can be resumed.

A sweep directory may come from someone else: the plan is read as untrusted input (a regular
file of bounded size, checked shape, no Hydra or interpolated overrides).
"""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

from fedrun.core import FedrunError
from fedrun.rundir import atomic_write, read_regular_bytes

PLAN_FILE = "sweep.json"
MAX_PLAN_BYTES = 16 << 20


@dataclass(frozen=True)
class Job:
    num: int  # Hydra's job number, the name of its directory
    overrides: list[str]
    path: Path

    @property
    def finished(self) -> bool:
        return (self.path / "summary.json").exists()


def write_plan(sweep_dir: Path, *, overrides: list[str], jobs: list[list[str]] | None) -> None:
    """sweep.json: the sweep's command-line overrides and, for a grid, each job's overrides."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    plan = {"overrides": overrides,
            "jobs": None if jobs is None else [{"job": i, "overrides": job} for i, job in enumerate(jobs)]}
    atomic_write(sweep_dir / PLAN_FILE, lambda p: p.write_text(json.dumps(plan, indent=1) + "\n"))


def is_planned(path: Path) -> bool:
    return (Path(path) / PLAN_FILE).is_file()


def planned_jobs(sweep_dir: Path) -> list[Job] | None:
    """The jobs of the plan, in order; None for a search sweep (its jobs are not known ahead)."""
    path = Path(sweep_dir) / PLAN_FILE
    try:
        plan = json.loads(read_regular_bytes(path, limit=MAX_PLAN_BYTES))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FedrunError(f"{path}: not a sweep plan ({e})") from None
    jobs = plan.get("jobs") if isinstance(plan, dict) else []
    if jobs is None:
        return None
    if not isinstance(jobs, list) or not all(_is_job(j) for j in jobs):
        raise FedrunError(f"{path}: not a sweep plan (`jobs` must be a list of {{job, overrides}})")
    for job in jobs:
        if bad := next((o for o in job["overrides"] if o.startswith("hydra") or "${" in o), None):
            raise FedrunError(f"{path}: job {job['job']}: override {bad!r} refused (a sweep directory is "
                              "untrusted input)")
    return [Job(j["job"], list(j["overrides"]), Path(sweep_dir) / str(j["job"])) for j in jobs]


def _is_job(job: object) -> bool:
    return (isinstance(job, dict) and isinstance(job.get("job"), int) and not isinstance(job["job"], bool)
            and job["job"] >= 0 and isinstance(job.get("overrides"), list)
            and all(isinstance(o, str) for o in job["overrides"]))


def labels(jobs: list[list[str]]) -> list[str]:
    """Each job's overrides that not every job shares: what tells the jobs apart."""
    shared = set.intersection(*map(set, jobs)) if len(jobs) > 1 else set()
    return [" ".join(o for o in job if o not in shared) for job in jobs]


def incomplete(paths: list[Path]) -> list[str]:
    """A line for each planned sweep at or under `paths` whose jobs have not all finished."""
    lines = []
    for sweep_dir in find_sweeps(paths):
        jobs = planned_jobs(sweep_dir)
        if jobs is None:
            continue
        done = sum(job.finished for job in jobs)
        if done < len(jobs):
            lines.append(f"sweep incomplete: {done} of {len(jobs)} jobs finished; "
                         f"resume with: fedrun resume {shlex.quote(str(sweep_dir))}")
    return lines


def find_sweeps(paths: list[Path]) -> list[Path]:
    found: set[Path] = set()
    for path in map(Path, paths):
        if path.is_dir():
            found |= {p.parent for p in path.rglob(PLAN_FILE)}
    return sorted(found)
