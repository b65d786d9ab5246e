"""Interrupted sweeps and runs (#20): a sweep records its grid and `resume` finishes every job;
Ctrl-C is its own state and checkpoints the last finished round; `resume RUN rounds=N` extends a
finished run; sweeps show a line per job and exit 3 when a job failed; `train` logs evaluation
rounds to stderr when its output is not a terminal."""
import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from fedrun import loop
from fedrun.cli import JOBS_FAILED, app
from fedrun.report import collect_runs

SMALL = ["data=synthetic", "model=logreg", "data.num_clients=6", "sampler.clients_per_round=3", "eval_every=1",
         "data.num_features=10", "checkpoint_every=10"]
# Server and client state that a round changes in place: Adam's moments, error-feedback residuals.
STATEFUL = ["strategy=fedadam", "compression=topk"]


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _invoke(*args):
    return CliRunner().invoke(app, list(map(str, args)))


def _interrupt_at(mp: pytest.MonkeyPatch, *, round_idx: int, seed: int | None = None) -> None:
    """Ctrl-C during round `round_idx` (of the run with `seed`), after its clients trained: the
    round has already changed some state when the interrupt lands."""
    real = loop.server_step

    def step(exp, weights, updates, ctx):
        if ctx.round_idx == round_idx and seed in (None, exp.cfg.seed):
            raise KeyboardInterrupt
        return real(exp, weights, updates, ctx)

    mp.setattr(loop, "server_step", step)


def _table(run_dir: Path, name: str = "metrics.csv") -> pd.DataFrame:
    return pd.read_csv(run_dir / name).drop(columns="seconds")


def _assert_same_tables(a: Path, b: Path) -> None:
    for name in ("metrics.csv", "clients.csv"):
        pd.testing.assert_frame_equal(_table(a, name), _table(b, name), check_exact=True)


def _status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


def _sweep_dirs(tmp_path: Path) -> list[Path]:
    return sorted(p.parent for p in (tmp_path / "runs" / "sweeps").glob("*/*/sweep.json"))


def test_an_interrupted_sweep_resumes_every_job_and_report_says_it_is_incomplete(tmp_path):
    grid = [*SMALL, *STATEFUL, "rounds=4", "seed=0,1,2"]
    assert _invoke("sweep", *grid).exit_code == 0
    whole = _sweep_dirs(tmp_path)[0]

    with pytest.MonkeyPatch.context() as mp:
        _interrupt_at(mp, round_idx=3, seed=1)  # Ctrl-C during job 1's round 3
        result = _invoke("sweep", *grid)
    stopped = next(d for d in _sweep_dirs(tmp_path) if d != whole)
    assert result.exit_code == 130, result.output
    assert f"interrupted; resume with: fedrun resume {stopped.relative_to(tmp_path)}" in result.output
    plan = json.loads((stopped / "sweep.json").read_text())
    assert [job["overrides"][-1] for job in plan["jobs"]] == ["seed=0", "seed=1", "seed=2"]
    assert (stopped / "0" / "summary.json").exists() and not (stopped / "2").exists()
    assert _status(stopped / "1")["state"] == "interrupted"

    report = _invoke("report", stopped)
    assert report.exit_code == 0, report.output
    assert f"sweep incomplete: 1 of 3 jobs finished; resume with: fedrun resume {stopped}" in report.output

    result = _invoke("resume", stopped)
    assert result.exit_code == 0, result.output
    assert "job 2 of 3 (seed=1): resumed from round 2, finished, final eval_ppl" in result.output
    assert "job 3 of 3 (seed=2): finished, final eval_ppl" in result.output
    for job in ("0", "1", "2"):
        assert (stopped / job / "summary.json").exists()
        _assert_same_tables(whole / job, stopped / job)
    report = _invoke("report", stopped)
    assert "sweep incomplete" not in report.output and "│ 3 │" in report.output


def test_ctrl_c_records_interrupted_checkpoints_the_last_finished_round_and_resumes_exactly(tmp_path):
    args = [*SMALL, *STATEFUL, "rounds=6"]
    assert _invoke("train", *args, "run_dir=whole").exit_code == 0

    with pytest.MonkeyPatch.context() as mp:
        _interrupt_at(mp, round_idx=4)
        result = _invoke("train", *args, "run_dir=stopped")
    assert result.exit_code == 130
    assert "interrupted; resume with: fedrun resume stopped" in result.output
    status = _status(tmp_path / "stopped")
    assert status["state"] == "interrupted" and status["round"] == 3 and "error" not in status
    # checkpoint_every=10: round 3's checkpoint is the one Ctrl-C wrote
    assert sorted(p.name for p in (tmp_path / "stopped" / "checkpoints").glob("*.pt")) == ["round_0003.pt"]
    runs = collect_runs([tmp_path / "stopped"])
    assert list(runs["status"]) == ["interrupted"]

    result = _invoke("resume", "stopped")
    assert result.exit_code == 0, result.output
    assert "restarting from round 0" not in result.output
    _assert_same_tables(tmp_path / "whole", tmp_path / "stopped")


def test_resume_rounds_extends_a_finished_run_as_if_it_had_run_them_all(tmp_path):
    assert _invoke("train", *SMALL, *STATEFUL, "rounds=4", "run_dir=four").exit_code == 0
    assert _invoke("train", *SMALL, *STATEFUL, "rounds=2", "run_dir=two").exit_code == 0

    result = _invoke("resume", "two", "rounds=4")
    assert result.exit_code == 0, result.output
    _assert_same_tables(tmp_path / "four", tmp_path / "two")
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["rounds"] == 4
    assert "rounds: 4" in (tmp_path / "two" / "config.yaml").read_text()


def test_resume_rounds_of_a_sweep_extends_every_job(tmp_path):
    assert _invoke("sweep", *SMALL, "rounds=2", "seed=0,1").exit_code == 0
    sweep_dir = _sweep_dirs(tmp_path)[0]
    result = _invoke("resume", sweep_dir, "rounds=3")
    assert result.exit_code == 0, result.output
    for job in ("0", "1"):
        assert list(_table(sweep_dir / job)["round"]) == [0, 1, 2, 3]
        assert json.loads((sweep_dir / job / "summary.json").read_text())["rounds"] == 3


@pytest.mark.parametrize(("override", "message"), [
    ("client.lr=0.5", "error: client.lr: cannot be changed on resume"),
    ("seed=3", "error: seed: cannot be changed on resume"),
    ("rounds=1", "error: rounds: 1 is fewer than the run's 2"),
    ("rounds=two", "error: rounds: 'two' is not an integer"),
])
def test_resume_refuses_overrides_that_would_change_past_rounds(tmp_path, override, message):
    assert _invoke("train", *SMALL, "rounds=2", "run_dir=run").exit_code == 0
    result = _invoke("resume", "run", override)
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].startswith(message), result.output
    assert "rounds: 2" in (tmp_path / "run" / "config.yaml").read_text()


def test_resume_of_a_finished_run_says_how_to_extend_it(tmp_path):
    assert _invoke("train", *SMALL, "rounds=2", "run_dir=run").exit_code == 0
    result = _invoke("resume", "run")
    assert "have finished; extend with rounds=N" in result.output


def test_extending_a_run_whose_noise_was_calibrated_to_its_rounds_is_refused(tmp_path):
    dp = ["privacy=central_dp", "privacy.noise_multiplier=null", "privacy.target_epsilon=8", "privacy.delta=1e-3",
          "sampler.kind=poisson"]
    assert _invoke("train", *SMALL, *dp, "rounds=2", "run_dir=run").exit_code == 0
    result = _invoke("resume", "run", "rounds=4")
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].startswith("error: rounds: the noise of this run was calibrated")


def test_a_sweep_prints_a_line_per_job_and_exits_3_when_a_job_failed(tmp_path):
    result = _invoke("sweep", *SMALL, "rounds=2", "client.lr=0.1,-1")
    assert result.exit_code == JOBS_FAILED == 3, result.output
    lines = result.stderr.splitlines()
    assert any(line.startswith("job 1 of 2 (client.lr=0.1): finished, final eval_ppl ") for line in lines)
    assert any(line.startswith("job 2 of 2 (client.lr=-1): failed: client.lr: -1.0 is not allowed")
               for line in lines)
    sweep_dir = _sweep_dirs(tmp_path)[0]
    assert result.stdout.strip().splitlines()[-1] == str(sweep_dir.relative_to(tmp_path))
    assert (sweep_dir / "0" / "summary.json").exists() and _status(sweep_dir / "1")["state"] == "failed"


def test_sweep_progress_in_a_terminal_uses_rich(monkeypatch):
    from io import StringIO

    from rich.console import Console

    from fedrun import cli

    out = StringIO()
    monkeypatch.setattr(cli, "console", Console(file=out, force_terminal=True, width=200))
    monkeypatch.setattr(cli, "_plain_output", lambda: False)
    with cli._job_progress() as on_job:
        event = {"job": 0, "of": 2, "label": "seed=0", "run_dir": "runs/x/0"}
        on_job(event | {"state": "started"})
        on_job(event | {"state": "finished", "objective": "eval_ppl", "value": 7.25})
    assert "job 1 of 2 (seed=0): finished, final eval_ppl 7.2500" in out.getvalue()
    assert "\x1b[" in out.getvalue()  # styled, not a plain line


def test_train_logs_each_evaluation_round_to_stderr_when_stdout_is_not_a_terminal(tmp_path):
    result = _invoke("train", *SMALL, "rounds=3", "eval_every=2", "run_dir=run")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "run"
    rounds = [line.split(":")[0] for line in result.stderr.splitlines() if line.startswith("round ")]
    assert rounds == ["round 0 of 3", "round 2 of 3", "round 3 of 3"]
    assert any(line.startswith("round 2 of 3: train loss ") and "eval ppl" in line
               for line in result.stderr.splitlines())
