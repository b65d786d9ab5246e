"""Resume: a run killed with SIGKILL and resumed ends with the same tables as one never stopped."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
from typer.testing import CliRunner

from fedrun import config, train
from fedrun.cli import app
from tests.conftest import ROOT, TINY

FEDRUN = str(Path(sys.executable).with_name("fedrun"))


def _args(play, run_dir, *extra):
    return ["train", "data=shakespeare", f"data.path={play}", f"run_dir={run_dir}", *TINY, "rounds=12",
            "eval_every=1", "checkpoint_every=3", "model.n_embd=32", "client.local_steps=20",
            "sampler.dropout=0.2", "strategy=fedadam", *extra]


def _tables(run_dir):
    return [pd.read_csv(run_dir / name).drop(columns="seconds") for name in ("metrics.csv", "clients.csv")]


def _assert_same_tables(a, b):
    for x, y in zip(_tables(a), _tables(b)):
        pd.testing.assert_frame_equal(x, y, check_exact=True)


def test_sigkill_mid_run_then_resume_gives_identical_metrics(play, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert CliRunner().invoke(app, _args(play, whole)).exit_code == 0
    proc = subprocess.Popen([FEDRUN, *_args(play, killed)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill between the checkpoints of rounds 6 and 9
        metrics = killed / "metrics.csv"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 1 + 8:
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists(), "the run finished before it could be killed"
    result = CliRunner().invoke(app, ["resume", str(killed)])
    assert result.exit_code == 0, result.output
    _assert_same_tables(whole, killed)
    assert (killed / "summary.json").exists()


def test_corrupt_last_checkpoint_falls_back_to_the_previous_one(play, tmp_path, caplog):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    for run_dir in (whole, broken):
        assert CliRunner().invoke(app, _args(play, run_dir)).exit_code == 0
    (broken / "summary.json").unlink()  # pretend it stopped after writing its last checkpoint
    last = broken / "checkpoints" / "round_0012.pt"
    last.write_bytes(last.read_bytes()[:-100] + b"x" * 100)
    exp, rundir, checkpoint = train.load_for_resume(broken)
    assert checkpoint["round"] == 9
    assert "round_0012.pt is torn or corrupt" in caplog.text
    train.resume(exp, rundir, checkpoint)
    _assert_same_tables(whole, broken)


def test_resume_before_any_checkpoint_starts_over(play, tmp_path):
    whole, early = tmp_path / "whole", tmp_path / "early"
    assert CliRunner().invoke(app, _args(play, whole)).exit_code == 0
    assert CliRunner().invoke(app, _args(play, early)).exit_code == 0
    (early / "summary.json").unlink()
    for p in (early / "checkpoints").iterdir():
        p.unlink()
    assert CliRunner().invoke(app, ["resume", str(early)]).exit_code == 0
    _assert_same_tables(whole, early)


def test_checkpoint_keep_limits_checkpoints_on_disk(compose_cfg):
    run_dir, _ = train.train(config.build(compose_cfg("rounds=5", "checkpoint_every=1", "checkpoint_keep=2")))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "round_0004.pt", "round_0004.sha256", "round_0005.pt", "round_0005.sha256"]


def test_resuming_a_finished_run_or_a_non_run_is_a_clear_error(compose_cfg, tmp_path):
    run_dir, _ = train.train(config.build(compose_cfg("rounds=1")))
    result = CliRunner().invoke(app, ["resume", str(run_dir)])
    assert result.exit_code == 0 and "nothing to resume" in result.output
    result = CliRunner().invoke(app, ["resume", str(tmp_path / "empty")])
    assert result.exit_code == 2 and "no run directory" in result.output


def test_status_file_tracks_the_run(compose_cfg):
    import json

    run_dir, _ = train.train(config.build(compose_cfg("rounds=2")))
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "finished" and status["round"] == 2 and status["pid"] == os.getpid()
