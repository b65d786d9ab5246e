"""Run directory safety: torn tables, checkpoint order, the lock, new-run folders, a full disk, seeds."""
import errno
import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import fedrun.rundir
from fedrun import config, train
from fedrun.cli import app
from fedrun.core import FedrunError
from fedrun.rundir import CsvTable, RunDir
from tests.conftest import TINY

COLUMNS = ["round", "client_id", "loss"]


def _table(tmp_path: Path, text: bytes) -> CsvTable:
    (tmp_path / "t.csv").write_bytes(text)
    return CsvTable(tmp_path / "t.csv", COLUMNS)


def _cli_train(play: Path, run_dir: Path, *extra: str):
    args = ["train", "data=shakespeare", f"data.path={play}", f"run_dir={run_dir}", "device=cpu", *TINY, *extra]
    return CliRunner().invoke(app, args)


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


# ---- tables ---------------------------------------------------------------------------------

def test_torn_and_malformed_rows_are_dropped_and_the_cut_keeps_only_intact_rows(tmp_path):
    table = _table(tmp_path, b"round,client_id,loss\r\n0,1,0.5\r\n"
                             b"x,1,0.5\r\n"        # round not an integer
                             b"1,2\r\n"            # too few fields
                             b'1,"2,0.1\r\n'       # a stray quote must not swallow the next rows
                             b"1,2,0.25\r\n\r\n2,3,0.125\r\n"
                             b"3,4,0.0625")        # torn: no newline yet, although it parses
    assert [r["round"] for r in table.intact_rows()] == ["0", "1", "2"]
    assert table.truncate_after(1) == [{"round": "0", "client_id": "1", "loss": "0.5"},
                                       {"round": "1", "client_id": "2", "loss": "0.25"}]
    assert (tmp_path / "t.csv").read_bytes() == b"round,client_id,loss\r\n0,1,0.5\r\n1,2,0.25\r\n"


def test_a_table_of_another_layout_is_refused_and_an_empty_one_gets_its_header(tmp_path):
    with pytest.raises(FedrunError, match="t.csv: its columns .* are not this run's"):
        _table(tmp_path, b"\x00\xff\xfe binary\n1,2,3\n").intact_rows()
    table = _table(tmp_path, b"")
    assert (tmp_path / "t.csv").read_bytes() == b"round,client_id,loss\r\n"  # an emptied table starts over
    assert table.intact_rows() == []


# ---- checkpoints ----------------------------------------------------------------------------

def test_checkpoints_are_ordered_by_round_number_not_by_name(tmp_path):
    rundir = RunDir(tmp_path)
    rundir.checkpoints.mkdir()
    for round_idx in (9998, 9999, 10000, 10001):
        rundir.save_checkpoint(round_idx, {"round": round_idx}, keep=2)
        assert rundir.latest_checkpoint()["round"] == round_idx
    assert sorted(p.name for p in rundir.checkpoints.iterdir()) == [
        "round_10000.pt", "round_10000.sha256", "round_10001.pt", "round_10001.sha256"]


# ---- the lock and new-run folders -----------------------------------------------------------

def test_a_locked_run_directory_is_refused_with_the_holders_pid(tmp_path):
    first, second = RunDir(tmp_path), RunDir(tmp_path)
    first.lock()
    with pytest.raises(FedrunError, match=rf"in use by another fedrun process \(pid {os.getpid()}\)"):
        second.lock()
    first.close()
    second.lock()  # released with the first
    second.close()


def test_train_into_a_folder_with_a_config_but_no_metrics_is_refused(play, tmp_path):
    used = tmp_path / "used"
    used.mkdir()
    (used / "config.yaml").write_text("name: someone_elses\n")
    result = _cli_train(play, used)
    assert result.exit_code == 2, result.output
    assert _error_lines(result.output) == [f"error: run_dir: {used} is not empty (config.yaml) and holds no run "
                                           "fedrun can resume; choose a new or empty run_dir"]
    assert (used / "config.yaml").read_text() == "name: someone_elses\n"


def test_train_into_a_stopped_run_points_to_resume(play, tmp_path):
    run_dir = tmp_path / "run"
    assert _cli_train(play, run_dir).exit_code == 0
    (run_dir / "summary.json").unlink()
    result = _cli_train(play, run_dir)
    assert result.exit_code == 2 and f"`fedrun resume {run_dir}`" in result.output


# ---- a full disk, a negative seed -----------------------------------------------------------

def _fail_checkpoint_2(monkeypatch):
    real = torch.save

    def save(obj, f, *args, **kwargs):
        if "round_0002" in str(f):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(fedrun.rundir.torch, "save", save)
    return "checkpoints/round_0002.pt"


def _fail_third_clients_write(monkeypatch):
    real, calls = fedrun.rundir.csv.writer, []

    def writer(f, *args, **kwargs):
        if Path(f.name).name == "clients.csv":
            calls.append(f.name)
            if len(calls) == 3:  # the header, round 1's rows, round 2's rows
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(f, *args, **kwargs)

    monkeypatch.setattr(fedrun.rundir.csv, "writer", writer)
    return "clients.csv"


@pytest.mark.parametrize("fail", [_fail_checkpoint_2, _fail_third_clients_write])
def test_a_full_disk_names_the_file_and_records_the_run_as_failed(play, tmp_path, monkeypatch, fail):
    run_dir = tmp_path / "run"
    name = fail(monkeypatch)
    result = _cli_train(play, run_dir, "rounds=3", "checkpoint_every=1")
    assert result.exit_code == 2, result.output
    assert _error_lines(result.output) == [
        f"error: run_dir: cannot write {run_dir / name}: [Errno {errno.ENOSPC}] No space left on device"]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and str(run_dir / name) in status["error"] and status["round"] == 1
    assert not list(run_dir.rglob("*.tmp"))  # a failed write leaves no temp file behind


def test_a_negative_seed_is_one_line(play, tmp_path):
    result = _cli_train(play, tmp_path / "run", "seed=-1")
    assert result.exit_code == 2
    assert _error_lines(result.output) == ["error: seed: -1 is not allowed; allowed: an integer >= 0"]


# ---- a resume with no intact checkpoint -----------------------------------------------------

def test_a_resume_without_a_checkpoint_cuts_every_table_including_the_privacy_ledger(play, tmp_path):
    def build(run_dir: Path):
        return config.build(config.compose(["data=shakespeare", f"data.path={play}", f"run_dir={run_dir}",
                                            "device=cpu", *TINY, "rounds=3", "privacy=central_dp",
                                            "sampler.kind=poisson"]))

    whole, early = tmp_path / "whole", tmp_path / "early"
    for run_dir in (whole, early):
        train.train(build(run_dir))
    (early / "summary.json").unlink()  # stopped after its last row, its checkpoints lost
    for path in (early / "checkpoints").iterdir():
        path.unlink()
    exp, rundir, checkpoint = train.load_for_resume(early)
    assert checkpoint is None
    train.resume(exp, rundir, checkpoint)
    for name in ("metrics.csv", "clients.csv", "privacy_ledger.csv"):
        a, b = (pd.read_csv(d / name) for d in (whole, early))
        pd.testing.assert_frame_equal(a.drop(columns="seconds", errors="ignore"),
                                      b.drop(columns="seconds", errors="ignore"), check_exact=True)
    assert pd.read_csv(early / "partition.csv").equals(pd.read_csv(whole / "partition.csv"))
