"""fedrun sweep: Hydra multirun jobs as ordinary run directories; failures recorded, not fatal."""
import json
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf
from typer.testing import CliRunner

from fedrun.cli import app
from fedrun.components import option_name

SMALL = ["data=synthetic", "model=logreg", "data.num_clients=6", "sampler.clients_per_round=3", "rounds=2",
         "eval_every=1", "data.num_features=10"]


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _sweep(*overrides):
    result = CliRunner().invoke(app, ["sweep", *SMALL, *overrides])
    return result, Path(result.output.strip().splitlines()[-1]) if result.exit_code == 0 else None


def _jobs(sweep_dir):
    return sorted((p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()), key=lambda p: int(p.name))


def test_grid_sweep_runs_every_combination_as_a_run_directory(tmp_path):
    result, sweep_dir = _sweep("strategy=fedavg,fedadam", "client.lr=0.05,0.1", "seed=0,1")
    assert result.exit_code == 0, result.output
    assert sweep_dir.parts[:2] == ("runs", "sweeps") and sweep_dir.name.endswith("_fedavg")
    jobs = _jobs(tmp_path / sweep_dir)
    assert len(jobs) == 8
    seen = set()
    for job in jobs:
        overrides = list(OmegaConf.load(job / ".hydra" / "overrides.yaml"))
        cfg = OmegaConf.load(job / "config.yaml")
        assert cfg.run_dir == str(job.resolve()) or Path(cfg.run_dir).resolve() == job.resolve()
        assert json.loads((job / "status.json").read_text())["state"] == "finished"
        assert len(pd.read_csv(job / "metrics.csv")) == 3
        seen.add((option_name("strategy", cfg.strategy._target_), cfg.client.lr, cfg.seed))
        assert f"seed={cfg.seed}" in overrides
    assert seen == {(s, lr, seed) for s in ("fedavg", "fedadam") for lr in (0.05, 0.1) for seed in (0, 1)}


def test_a_failing_job_is_recorded_and_the_sweep_goes_on(tmp_path):
    result, _ = _sweep("client.lr=0.1,-1")
    assert result.exit_code == 3, result.output  # the other jobs ran; the failure shows in the exit code
    ok, bad = _jobs(tmp_path / result.stdout.strip().splitlines()[-1])
    assert (ok / "summary.json").exists()
    status = json.loads((bad / "status.json").read_text())
    assert status["state"] == "failed" and "client.lr: -1.0 is not allowed" in status["error"]
    assert "failed" in result.output


def test_a_wrong_key_stops_the_sweep_before_any_job_runs(tmp_path):
    result = CliRunner().invoke(app, ["sweep", *SMALL, "strategy=fedavg,nope"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].startswith("error: strategy: unknown option 'nope'")
    assert not (tmp_path / "runs").exists()


def test_parallel_jobs_with_the_joblib_launcher(tmp_path):
    result, sweep_dir = _sweep("seed=0,1", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    assert result.exit_code == 0, result.output
    assert all((job / "summary.json").exists() for job in _jobs(tmp_path / sweep_dir))


def test_jobs_as_submitit_tasks(tmp_path):
    """hydra/launcher=submitit_local: each job a submitit task in its own process, as
    submitit_slurm submits them to SLURM (the same launcher code but for the executor)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    result, sweep_dir = _sweep("seed=0,1", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10")
    assert result.exit_code == 0, result.output
    jobs = _jobs(tmp_path / sweep_dir)
    assert len(jobs) == 2 and all((job / "summary.json").exists() for job in jobs)
    assert list((tmp_path / sweep_dir / ".submitit").glob("*/*_result.pkl"))  # what submitit's own tasks returned


def test_optuna_sweeper_searches_and_records_the_best(tmp_path):
    result, sweep_dir = _sweep("hydra/sweeper=optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.direction=minimize",
                               "client.lr=interval(0.01,0.2)")
    assert result.exit_code == 0, result.output
    jobs = _jobs(tmp_path / sweep_dir)
    assert len(jobs) == 3
    best = OmegaConf.load(tmp_path / sweep_dir / "optimization_results.yaml")
    finals = [json.loads((j / "summary.json").read_text())["final"]["eval_ppl"] for j in jobs]
    assert best.best_value == pytest.approx(min(finals))


def test_resume_a_sweep_resumes_every_unfinished_job(tmp_path):
    result, sweep_dir = _sweep("seed=0,1,2")
    jobs = _jobs(tmp_path / sweep_dir)
    before = [pd.read_csv(j / "metrics.csv").drop(columns="seconds") for j in jobs]
    for job in jobs[1:]:  # two jobs "stopped" after their last checkpoint
        (job / "summary.json").unlink()
    result = CliRunner().invoke(app, ["resume", str(tmp_path / sweep_dir)])
    assert result.exit_code == 0, result.output
    for job, expected in zip(jobs, before):
        assert (job / "summary.json").exists()
        pd.testing.assert_frame_equal(pd.read_csv(job / "metrics.csv").drop(columns="seconds"), expected)


def test_report_of_a_2x2_sweep_with_2_seeds_groups_by_seed_with_pandas_mean_and_std(tmp_path):
    from fedrun.report import collect_runs, distinguishing_keys, group_runs

    result, sweep_dir = _sweep("strategy=fedavg,fedavgm", "client.lr=0.05,0.1", "seed=0,1")
    assert result.exit_code == 0, result.output
    runs = collect_runs([tmp_path / sweep_dir])
    keys = distinguishing_keys(runs)
    groups = group_runs(runs, keys)
    assert len(groups) == 4 and (groups["n"] == 2).all()
    # Independent: read every job's metrics.csv and compute the same statistics with pandas.
    rows = []
    for job in _jobs(tmp_path / sweep_dir):
        cfg = OmegaConf.load(job / "config.yaml")
        final = pd.read_csv(job / "metrics.csv").dropna(subset=["eval_ppl"]).iloc[-1]
        rows.append({"strategy": option_name("strategy", cfg.strategy._target_), "lr": cfg.client.lr,
                     "ppl": final["eval_ppl"]})
    expected = pd.DataFrame(rows).groupby(["strategy", "lr"])["ppl"].agg(["mean", "std"])
    got = {(g["strategy"], float(g["client.lr"])): (g["final_eval_ppl_mean"], g["final_eval_ppl_std"])
           for _, g in groups.iterrows()}
    for (strategy, lr), (mean, std) in expected.iterrows():
        assert got[(strategy, lr)] == pytest.approx((mean, std), rel=1e-12)
    report = CliRunner().invoke(app, ["report", str(tmp_path / sweep_dir), "--out", str(tmp_path / "rep")])
    assert report.exit_code == 0, report.output
    assert (tmp_path / "rep" / "report.html").exists() and "fedavgm" in report.output
