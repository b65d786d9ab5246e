"""threads: one CPU-thread budget per run, split among the processes that run at once."""
from __future__ import annotations

import json
import os

import pytest
import torch

from fedrun import config, threads, train
from fedrun.core import FedrunError


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
    threads._applied.pop("threads", None)


def test_auto_is_the_cores_this_process_may_use(monkeypatch, restore_threads):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 5, 7})
    assert threads.usable_cores() == 5
    assert threads.resolve("auto") == 5
    assert threads.resolve(3) == threads.resolve("3") == 3
    assert threads.apply(2) == 2 and torch.get_num_threads() == 2 and threads.budget() == 2
    assert os.environ["OMP_NUM_THREADS"] == "2"  # what backend=process's workers start with
    assert threads.per_worker(2) == 1 and threads.per_worker(4) == 1 and threads.per_worker(1) == 2


@pytest.mark.parametrize("value", ["0", "-1", "many", "1.5"])
def test_other_values_are_refused_in_one_line(value, tmp_path):
    with pytest.raises(FedrunError, match=r"^threads: .* allowed: auto, or an integer >= 1$"):
        config.compose([f"threads={value}", f"run_dir={tmp_path}"])


def test_a_run_applies_and_records_its_threads(tmp_path, restore_threads):
    cfg = config.compose(["data=synthetic", "data.num_clients=6", "sampler.clients_per_round=3", "model=logreg",
                          "rounds=1", "threads=1", "device=cpu", f"run_dir={tmp_path / 'run'}"])
    run_dir, summary = train.train(config.build(cfg))
    assert torch.get_num_threads() == 1
    recorded = json.loads((run_dir / "summary.json").read_text())
    assert recorded["threads"] == 1
    assert recorded["omp_wait_policy"] == os.environ["OMP_WAIT_POLICY"] == "PASSIVE"  # fedrun/__init__.py's default


@pytest.mark.skipif(threads.usable_cores() < 2, reason="needs 2 usable cores to split between 2 parallel jobs")
def test_a_parallel_sweeps_jobs_share_the_cores(tmp_path, monkeypatch):
    """hydra/launcher=joblib with n_jobs=2: each job gets half the cores (one each on 2 cores)."""
    from typer.testing import CliRunner

    from fedrun.cli import app

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["sweep", "seed=0,1", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                                      "data=synthetic", "data.num_clients=6", "sampler.clients_per_round=3",
                                      "model=logreg", "rounds=1",
                                      "device=cpu"])
    assert result.exit_code == 0, result.output
    summaries = sorted(tmp_path.glob("runs/sweeps/*/*/*/summary.json"))
    assert len(summaries) == 2
    expected = threads.usable_cores() // 2
    assert [json.loads(p.read_text())["threads"] for p in summaries] == [expected, expected]


SMALL_SWEEP = ["seed=0,1", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "backend=process", "backend.workers=2",
               "data=synthetic", "data.num_clients=6", "sampler.clients_per_round=3", "model=logreg", "rounds=1",
               "device=cpu"]


def test_backend_process_runs_inside_a_joblib_sweep(tmp_path, monkeypatch):
    """joblib's default loky workers are not daemonic: each job starts its own worker processes."""
    from typer.testing import CliRunner

    from fedrun.cli import app

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["sweep", *SMALL_SWEEP])
    assert result.exit_code == 0, result.output
    assert len(list(tmp_path.glob("runs/sweeps/*/*/*/summary.json"))) == 2


def test_backend_process_where_it_cannot_start_workers_is_refused_in_one_line(tmp_path, monkeypatch):
    import multiprocessing

    from typer.testing import CliRunner

    from fedrun.cli import app

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["sweep", *SMALL_SWEEP, "hydra.launcher.backend=multiprocessing"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].startswith("error: hydra.launcher.backend: multiprocessing runs "
                                                             "jobs in daemonic processes")
    assert not list(tmp_path.glob("runs/sweeps/*/*/*"))  # before any job
    # a daemonic process of any other origin: the backend says so before its first round
    monkeypatch.setitem(multiprocessing.current_process()._config, "daemon", True)
    cfg = config.compose(SMALL_SWEEP[3:] + [f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(FedrunError, match=r"^backend: backend=process starts worker processes, which this process"):
        train.train(config.build(cfg))
