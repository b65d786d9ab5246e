"""Resume: a run killed (SIGKILL, SIGTERM, Ctrl-C) and resumed ends with the same tables as one never
stopped; a resume continues from its checkpoint, refuses what it cannot resume exactly, and never
runs beside another process writing the same run directory."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from fedrun import config, train
from fedrun.cli import app
from fedrun.rundir import is_run_dir
from tests.conftest import ROOT, TINY, make_play

FEDRUN = str(Path(sys.executable).with_name("fedrun"))


def _args(play, run_dir, *, rounds=12):
    return ["train", "data=shakespeare", f"data.path={play}", f"run_dir={run_dir}", *TINY, f"rounds={rounds}",
            "eval_every=1", "checkpoint_every=3", "model.n_embd=32", "client.local_steps=20",
            "sampler.dropout=0.2", "strategy=fedadam"]


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """(play, run_dir): one uninterrupted run, shared by the tests that compare against it."""
    tmp = tmp_path_factory.mktemp("whole")
    play, run_dir = make_play(tmp / "play.txt"), tmp / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDRUN_CACHE", str(tmp / "cache"))
        result = subprocess.run([FEDRUN, *_args(play, run_dir)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return play, run_dir


def _copy_stopped(whole_dir: Path, to: Path) -> Path:
    """The finished run as if it had stopped after its last row (a crashed run's files are a prefix)."""
    shutil.copytree(whole_dir, to)
    (to / "summary.json").unlink()
    return to


def _tables(run_dir):
    return [pd.read_csv(run_dir / name).drop(columns="seconds") for name in ("metrics.csv", "clients.csv")]


def _assert_same_tables(a, b):
    for x, y in zip(_tables(a), _tables(b)):
        pd.testing.assert_frame_equal(x, y, check_exact=True)


def _start(args) -> subprocess.Popen:
    return subprocess.Popen([FEDRUN, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended first: {proc.stderr.read()}"
        assert time.time() < deadline, "timed out"
        time.sleep(0.005)


def _rows(run_dir: Path) -> int:
    metrics = run_dir / "metrics.csv"
    return len(metrics.read_text().splitlines()) - 1 if metrics.exists() else 0


def _running(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "status.json").read_text())["state"] == "running"
    except (FileNotFoundError, json.JSONDecodeError):
        return False


# ---- killed and resumed ---------------------------------------------------------------------

def _kill_at_a_random_moment(proc: subprocess.Popen, metrics: Path, rng: random.Random) -> None:
    """SIGKILL after a random number (0-4) of writes to metrics.csv (the cut, then rows), then a
    random delay: in start-up (never shorter than 1.5 s), or just after a row, where the clients'
    rows, the ledger and a checkpoint are written, or mid-round; whatever the machine's load."""
    def version() -> tuple:
        try:
            st = metrics.stat()
        except FileNotFoundError:
            return ()
        return st.st_ino, st.st_size, st.st_mtime_ns

    writes, last = rng.randint(0, 4), version()
    delay = rng.uniform(0, 0.15 if writes else 1.5)
    while writes and proc.poll() is None:
        if version() != last:
            writes, last = writes - 1, version()
        time.sleep(0.002)
    time.sleep(delay)
    proc.kill()


@pytest.mark.parametrize("kills", [3, pytest.param(20, marks=pytest.mark.slow)])
def test_sigkill_at_random_moments_then_resume_gives_identical_tables(whole, tmp_path, kills):
    """The train, then every resume, killed at a random moment of its life; the first kill mid-run.
    20 kills get a run of 30 rounds: each process gains about one round, so the run outlasts them."""
    play, whole_dir = whole
    rounds = 12 if kills <= 3 else 30
    if rounds != 12:
        whole_dir = tmp_path / "whole"
        assert CliRunner().invoke(app, _args(play, whole_dir, rounds=rounds)).exit_code == 0
    killed, rng = tmp_path / "killed", random.Random(kills)
    landed = 0
    for i in range(kills):
        if (killed / "summary.json").exists():  # a process outran its kill to the end
            break
        proc = _start(["resume", str(killed)] if is_run_dir(killed) else _args(play, killed, rounds=rounds))
        if i == 0:  # between the checkpoints of rounds 6 and 9
            _wait_for(lambda: _rows(killed) >= 8, proc)
            proc.kill()
        else:
            _kill_at_a_random_moment(proc, killed / "metrics.csv", rng)
        landed += proc.wait() == -signal.SIGKILL and not (killed / "summary.json").exists()
        proc.stderr.close()
    assert landed >= 1, "no kill landed before the run finished"
    result = subprocess.run([FEDRUN, "resume", str(killed)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    _assert_same_tables(whole_dir, killed)
    assert (killed / "summary.json").exists()
    print(f"{kills} kills, {landed} before the run finished")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_record_interrupted_and_print_the_resume_command(whole, tmp_path, sig):
    play, whole_dir = whole
    stopped = tmp_path / "stopped"
    proc = _start(_args(play, stopped))
    _wait_for(lambda: _rows(stopped) >= 5, proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, stderr
    assert [line for line in stderr.splitlines() if "interrupted" in line] == [
        f"interrupted; resume with: fedrun resume {stopped}"]
    status = json.loads((stopped / "status.json").read_text())
    assert status["state"] == "interrupted" and 3 <= status["round"] <= _rows(stopped) - 1, status
    assert "error" not in status
    result = CliRunner().invoke(app, ["resume", str(stopped)])
    assert result.exit_code == 0, result.output
    _assert_same_tables(whole_dir, stopped)


def test_corrupt_last_checkpoint_falls_back_to_the_previous_one(whole, tmp_path, caplog):
    _, whole_dir = whole
    broken = _copy_stopped(whole_dir, tmp_path / "broken")
    last = broken / "checkpoints" / "round_0012.pt"
    last.write_bytes(last.read_bytes()[:-100] + b"x" * 100)
    exp, rundir, checkpoint = train.load_for_resume(broken)
    assert checkpoint["round"] == 9
    assert "round_0012.pt is torn or corrupt" in caplog.text
    train.resume(exp, rundir, checkpoint)
    _assert_same_tables(whole_dir, broken)


def test_resume_before_any_checkpoint_starts_over(whole, tmp_path):
    _, whole_dir = whole
    early = _copy_stopped(whole_dir, tmp_path / "early")
    for p in (early / "checkpoints").iterdir():
        p.unlink()
    assert CliRunner().invoke(app, ["resume", str(early)]).exit_code == 0
    _assert_same_tables(whole_dir, early)


# ---- resume continues from the checkpoint ---------------------------------------------------

def _metrics_lines(run_dir: Path) -> list[bytes]:
    return (run_dir / "metrics.csv").read_bytes().splitlines(keepends=True)


def _cut_metrics(run_dir: Path, last_round: int, tail: bytes = b"") -> None:
    """Keep metrics.csv's rows up to `last_round`, then `tail`."""
    (run_dir / "metrics.csv").write_bytes(b"".join(_metrics_lines(run_dir)[:last_round + 2]) + tail)


def test_resume_refuses_when_rows_up_to_the_checkpoint_are_lost(whole, tmp_path):
    """Rows are appended without fsync, checkpoints are fsynced: a power cut can keep checkpoint 12
    and lose rows 11 and 12. Continuing from row 10 with round 12's weights would be wrong."""
    _, whole_dir = whole
    lost = _copy_stopped(whole_dir, tmp_path / "lost")
    _cut_metrics(lost, 10)
    before = {p.name: p.read_bytes() for p in lost.glob("*.csv")}
    result = CliRunner().invoke(app, ["resume", str(lost)])
    assert result.exit_code == 2, result.output
    assert [line for line in result.output.splitlines() if line.startswith("error:")] == [
        "error: metrics.csv: the rows of rounds 11-12 are missing up to the checkpoint of round 12 (lost in a "
        "crash); the run cannot resume exactly; start it again with `fedrun train`"]
    assert {p.name: p.read_bytes() for p in lost.glob("*.csv")} == before  # nothing rewritten


@pytest.mark.parametrize("damage", ["torn_as_round_1", "malformed_rows"])
def test_resume_drops_torn_and_malformed_rows_and_continues_from_the_checkpoint(whole, tmp_path, damage):
    """Resume from checkpoint 9 (12's is lost) with the rows up to 10 on disk, damaged by a crash."""
    _, whole_dir = whole
    torn = _copy_stopped(whole_dir, tmp_path / "torn")
    for p in (torn / "checkpoints").glob("round_0012.*"):
        p.unlink()
    row_11 = _metrics_lines(torn)[12]
    _cut_metrics(torn, 10)
    if damage == "torn_as_round_1":  # "11,3,..." torn after its first byte: parses as round 1
        _cut_metrics(torn, 10, row_11[:1])
    else:
        lines = _metrics_lines(torn)
        lines[4:4] = [b"3,garbage\r\n", b"x" + lines[4][1:], b"\r\n"]
        (torn / "metrics.csv").write_bytes(b"".join(lines))
        with open(torn / "clients.csv", "ab") as f:
            f.write(b"5,zz\r\n11,0,12")
    result = CliRunner().invoke(app, ["resume", str(torn)])
    assert result.exit_code == 0, result.output
    _assert_same_tables(whole_dir, torn)
    for path in sorted((whole_dir / "checkpoints").glob("*.pt")):  # no checkpoint overwritten with other weights
        assert torch.equal(torch.load(path, weights_only=True)["weights"],
                           torch.load(torn / "checkpoints" / path.name, weights_only=True)["weights"])


# ---- one process per run directory ----------------------------------------------------------

def test_a_second_train_or_resume_of_a_training_run_is_refused(whole, tmp_path):
    play, _ = whole
    busy = tmp_path / "busy"
    proc = _start(_args(play, busy, rounds=20))
    _wait_for(lambda: _running(busy), proc)
    for args in (["resume", str(busy)], _args(play, busy)):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, result.output
        assert [line for line in result.output.splitlines() if line.startswith("error:")] == [
            f"error: run_dir: {busy} is in use by another fedrun process (pid {proc.pid}); wait for it to end, "
            f"or stop it and `fedrun resume {busy}`"]
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    proc.stderr.close()
    assert pd.read_csv(busy / "metrics.csv")["round"].tolist() == list(range(21))


def test_two_trains_racing_on_a_new_run_dir_one_runs_the_other_is_refused(whole, tmp_path):
    play, whole_dir = whole
    shared = tmp_path / "shared"
    procs = [_start(_args(play, shared)) for _ in range(2)]
    codes = [p.wait(timeout=300) for p in procs]
    errors = [p.stderr.read() for p in procs]
    for p in procs:
        p.stderr.close()
    assert sorted(codes) == [0, 2], errors
    loser = [line for line in errors[codes.index(2)].splitlines() if line.startswith("error:")]
    assert len(loser) == 1 and loser[0].startswith(f"error: run_dir: {shared} "), errors
    _assert_same_tables(whole_dir, shared)


# ---- small cases ----------------------------------------------------------------------------

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
    run_dir, _ = train.train(config.build(compose_cfg("rounds=2")))
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "finished" and status["round"] == 2 and status["pid"] == os.getpid()
