"""A run directory is untrusted input: its config.yaml builds only what fedrun ships, and its
files are read only when they are regular files (a FIFO or /dev/zero must not hang a command).

The payload is the one of issue #15: a nested `{_target_: torch.load, weights_only: false}` node
whose pickle, when loaded, creates a marker file. Every command that reads a run directory's
config must refuse it in one line (exit 2) without creating the marker.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf
from typer.testing import CliRunner

from fedrun import config, run_config, train
from fedrun.cli import app
from fedrun.core import FedrunError
from fedrun.report import collect_runs
from fedrun.run_config import load_run_config
from fedrun.rundir import RunDir, load_checkpoint, open_regular
from tests.conftest import ROOT
from tests.test_report import make_run

FEDRUN = str(Path(sys.executable).with_name("fedrun"))
SMALL = ["data=synthetic", "model=logreg", "rounds=2", "data.num_clients=20", "sampler.clients_per_round=3",
         "device=cpu", "checkpoint_every=1", "eval_every=1"]


class MarkerPayload:
    """Unpickling this creates `marker`: the stand-in for arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("finished")
    cfg = config.compose([f"run_dir={root / 'run'}", *SMALL])
    return train.train(config.build(cfg))[0]


@pytest.fixture
def run(finished_run: Path, tmp_path: Path) -> Path:
    """A fresh copy of a finished two-round run (synthetic data, logreg), checkpoints of rounds 1 and 2."""
    copied = tmp_path / "run"
    shutil.copytree(finished_run, copied)
    return copied


def read_tree(run: Path) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text())


def write_tree(run: Path, tree: dict) -> None:
    (run / "config.yaml").write_text(yaml.safe_dump(tree))


def plant_payload(run: Path, place: Callable[[dict, dict], None]) -> Path:
    """Save the pickle beside the config and place the node that loads it; return the marker path."""
    marker = run / "pwned"
    torch.save(MarkerPayload(marker), run / "notes.pt")
    node = {"_target_": "torch.load", "f": str(run / "notes.pt"), "weights_only": False}
    tree = read_tree(run)
    place(tree, node)
    write_tree(run, tree)
    return marker


def cli_args(command: str, run: Path, tmp_path: Path) -> list[str]:
    if command == "resume":
        (run / "summary.json").unlink()  # only an unfinished run is resumed
    return {"resume": ["resume", str(run)], "eval": ["eval", str(run)], "generate": ["generate", str(run)],
            "export": ["export", str(run), str(tmp_path / "export")]}[command]


def one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert lines[0].startswith("error: "), output
    return lines[0]


def finishes(fn: Callable[[], Any], *, seconds: float = 60) -> Any:
    """fn() run in a thread: fails (rather than hangs the suite) if it is still blocked after `seconds`."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except BaseException as e:  # handed back to the test below
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds} s"
    if "error" in result:
        raise result["error"]
    return result["value"]


# ---- the payload, through every command ------------------------------------------------------

def test_the_payload_is_live(run):
    """The refusals below mean something: Hydra instantiating the planted node runs the pickle."""
    marker = plant_payload(run, lambda tree, node: tree["model"].update(extra=node))
    instantiate(OmegaConf.load(run / "config.yaml").model.extra)
    assert marker.exists()


@pytest.mark.parametrize("command", ["resume", "eval", "generate", "export"])
def test_every_command_refuses_the_payload_in_one_line(run, tmp_path, command):
    marker = plant_payload(run, lambda tree, node: tree["model"].update(extra=node))
    result = CliRunner().invoke(app, cli_args(command, run, tmp_path))
    assert not marker.exists(), f"the payload ran: {result.output}"
    assert result.exit_code == 2, result.output
    line = one_error_line(result.output)
    assert "model.extra._target_: 'torch.load' is not a component fedrun ships" in line
    assert "untrusted" in line


@pytest.mark.parametrize("command", ["resume", "eval", "generate"])
def test_broken_yaml_is_one_line_naming_the_line(run, tmp_path, command):
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text + "client: [unclosed\nrounds: 3\n")
    result = CliRunner().invoke(app, cli_args(command, run, tmp_path))
    assert result.exit_code == 2, result.output
    line = one_error_line(result.output)
    assert f"{run / 'config.yaml'} is not valid YAML (line {len(text.splitlines()) + 2}:" in line


# ---- what load_run_config refuses --------------------------------------------------------------

def _hetero(tree: dict, node: dict) -> None:
    tree["client"]["models"] = [{"name": "a", "option": "logreg", "fraction": 1.0, **node}]


PLACES = {  # where the payload goes -> the key the refusal must name
    "data.path._target_": lambda tree, node: tree["data"].update(path=node),
    "data._target_": lambda tree, node: tree.update(data=node),
    "client.models[0]._target_": _hetero,
    "client.models[0].init._target_": lambda tree, node: _hetero(tree, {"init": node}),
    "strategy.extra._target_": lambda tree, node: tree["strategy"].update(extra=node),
    "_target_": lambda tree, node: tree.update(node),
}


@pytest.mark.parametrize("key", PLACES)
def test_a_target_anywhere_but_a_shipped_option_is_refused(run, key):
    marker = plant_payload(run, PLACES[key])
    expected = rf"^run_dir: .*config.yaml: {re.escape(key)}: 'torch.load' is not a component fedrun ships; refused"
    with pytest.raises(FedrunError, match=expected):
        load_run_config(run)
    assert not marker.exists()


BAD = {  # a change to a real run's config -> the start of the refusal after `run_dir: PATH: `
    "a shipped target at another key": (lambda t: t["model"].update(_target_="fedrun.data.synthetic.Synthetic"),
                                        "model._target_: 'fedrun.data.synthetic.Synthetic' is not a component"),
    "_partial_": (lambda t: t["model"].update(_partial_=True), "model._partial_: True is not a setting"),
    "_args_": (lambda t: t["data"].update(_args_=["x"]), "data._args_: ['x'] is not a setting"),
    "_recursive_ in a list": (lambda t: t["client"].update(models=[{"_recursive_": False}]),
                              "client.models[0]._recursive_: False is not a setting"),
    "interpolation": (lambda t: t.update(name="${oc.env:HOME}"), "name: '${oc.env:HOME}' is an interpolation"),
    "unknown key": (lambda t: t["data"].update(extra=1), "data.extra: unknown key; allowed keys here: alpha,"),
    "unknown logger": (lambda t: t["logger"].update(evil=True), "logger.evil: unknown key"),
    "wrong type": (lambda t: t.update(rounds="many"), "rounds: 'many' is not allowed; allowed: an integer"),
    "out of range": (lambda t: t["data"].update(num_classes=1), "data.num_classes: 1 is not allowed"),
}


@pytest.mark.parametrize("case", BAD)
def test_the_rest_is_checked_against_schemas_and_ranges(run, case):
    change, message = BAD[case]
    tree = read_tree(run)
    change(tree)
    write_tree(run, tree)
    with pytest.raises(FedrunError) as e:
        load_run_config(run)
    assert str(e.value).startswith(f"run_dir: {run / 'config.yaml'}: {message}"), str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("text, message", [
    ("!!python/object/apply:os.system ['touch pwned']\n",
     " is not valid YAML (line 1: could not determine a constructor"),
    ("a: &x [1, 2]\nb: *x\n", " is not valid YAML (line 2: aliases (*name) are not allowed)"),
    ("a: " + "[" * 3000 + "]" * 3000 + "\n", " is not valid YAML (nested too deeply)"),
    ("", ": not a mapping of keys to values"),
    ("- 1\n", ": not a mapping of keys to values"),
    ("name: " + "x" * (2 << 20) + "\n", ": larger than 1048576 bytes"),
])
def test_unsafe_or_unreadable_yaml_is_one_line(tmp_path, text, message):
    (tmp_path / "config.yaml").write_text(text)
    with pytest.raises(FedrunError) as e:
        load_run_config(tmp_path)
    assert str(e.value).startswith(f"run_dir: {tmp_path / 'config.yaml'}{message}"), str(e.value)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("kind", ["fifo", "dev_zero"])
def test_config_that_is_not_a_regular_file_is_refused_without_blocking(tmp_path, kind):
    if kind == "fifo":
        os.mkfifo(tmp_path / "config.yaml")
    else:
        (tmp_path / "config.yaml").symlink_to("/dev/zero")
    with pytest.raises(FedrunError, match="config.yaml: not a regular file"):
        finishes(lambda: load_run_config(tmp_path))


OPTIONS = [f"{group}={option}" for group in ("data", "model", "client", "strategy", "privacy", "backend",
                                            "attack", "audit", "compression")
           for option in sorted(p.stem for p in (config.conf_dir() / group).glob("*.yaml"))]


def test_every_shipped_option_reads_back_as_written(tmp_path):
    """What fedrun writes, fedrun reads: each option of each group (and the logger list, and a
    non-default public corpus) survives config.yaml unchanged."""
    needs = {"data=shakespeare": ["data.path=/x.txt"], "data=text_files": ["data.path=/x"],
             "data=table": ["data.path=/x.jsonl", "data.prompt_key=q", "data.response_key=a", "data.client_key=u"],
             "data=shakespeare_dialogue": ["data.path=/x.txt"],
             "data=synthetic": ["model=logreg"], "model=logreg": SMALL,
             "model=mlp": SMALL, "model=hf": ["+model.from_config.n_positions=64"],
             "client=hetero": ["strategy=fed_distill"], "strategy=scaffold": ["client.optimizer=sgd"],
             "privacy=central_dp": ["sampler.kind=poisson"], "audit=epsilon": ["audit.canary_norm=1"]}
    jobs = [[option, *needs.get(option, [])] for option in OPTIONS]
    jobs += [["logger=[csv,tensorboard,mlflow]"],
             ["strategy=feddf", "data@strategy.public=shakespeare", "strategy.public.path=/x.txt"]]
    for overrides in jobs:
        cfg = config.compose(overrides)
        (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        assert OmegaConf.to_container(load_run_config(tmp_path)) == OmegaConf.to_container(cfg), overrides


def test_shipped_targets_are_known_at_their_paths():
    special = run_config.shipped().special
    assert "fedrun.data.shakespeare.Shakespeare" in special["strategy.public._target_"]
    assert "fedrun.models.small.LogReg" in special["model._target_"]
    assert not [key for key in special if key.endswith(("_partial_", "_args_", "_recursive_", "_convert_"))]


# ---- regular files only: report and checkpoints ------------------------------------------------

def test_report_skips_a_fifo_status_and_device_tables(tmp_path):
    run = make_run(tmp_path / "runs" / "r", summary=False)
    (run / "status.json").unlink(missing_ok=True)
    os.mkfifo(run / "status.json")
    (run / "clients.csv").unlink()
    os.mkfifo(run / "clients.csv")  # the html page reads clients.csv and partition.csv
    (run / "partition.csv").unlink()
    (run / "partition.csv").symlink_to("/dev/zero")
    done = subprocess.run([FEDRUN, "report", str(tmp_path / "runs"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "out" / "report.html").is_file()
    note = collect_runs([run]).iloc[0]["note"]
    assert "status.json skipped (not a regular file (a FIFO))" in note


def test_report_notes_a_binary_metrics_file(tmp_path):
    run = make_run(tmp_path / "r", summary=False)
    (run / "metrics.csv").write_bytes(b"\x00\xff\xfe" * 100 + b"\nround\n\x00\n")
    result = collect_runs([run]).iloc[0]
    assert result["status"] in ("running", "crashed") and "metrics.csv" in result["note"]


def test_report_does_not_resolve_interpolations(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDRUN_TEST_SECRET", "hunter2")
    run = make_run(tmp_path / "r")
    (run / "config.yaml").write_text("name: ${oc.env:FEDRUN_TEST_SECRET}\nclient:\n  lr: 0.1\n")
    configs = collect_runs([run])
    assert configs.iloc[0]["name"] == "${oc.env:FEDRUN_TEST_SECRET}"


@pytest.mark.parametrize("kind", ["dev_zero", "fifo"])
def test_resume_skips_a_newest_checkpoint_that_is_not_a_regular_file(run, kind, caplog):
    (run / "summary.json").unlink()
    newest = run / "checkpoints" / "round_0002.pt"
    newest.unlink()
    if kind == "fifo":
        os.mkfifo(newest)
    else:
        newest.symlink_to("/dev/zero")
    _, _, checkpoint = finishes(lambda: train.load_for_resume(run))
    assert checkpoint["round"] == 1
    assert "round_0002.pt is unreadable" in caplog.text
    with pytest.raises(FedrunError, match="not a regular file"):
        finishes(lambda: load_checkpoint(newest))


def test_resume_through_the_cli_continues_from_the_previous_checkpoint(run):
    (run / "summary.json").unlink()
    newest = run / "checkpoints" / "round_0002.pt"
    newest.unlink()
    newest.symlink_to("/dev/zero")
    done = subprocess.run([FEDRUN, "resume", str(run)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (run / "summary.json").exists()


def test_open_regular_refuses_folders_and_missing_files(tmp_path):
    with pytest.raises(FedrunError, match="not a regular file \\(a folder\\)"):
        open_regular(tmp_path)
    with pytest.raises(FedrunError, match="cannot be read \\(No such file"):
        open_regular(tmp_path / "absent")
    assert RunDir(tmp_path).latest_checkpoint() is None


@pytest.mark.parametrize("content", [b"", b"\x00\xff\xfe" * 100 + b"\n\x89PNG\x00\n"])
def test_resume_with_an_empty_or_binary_metrics_file_is_one_error_line(run, content):
    (run / "summary.json").unlink()
    (run / "metrics.csv").write_bytes(content)
    result = CliRunner().invoke(app, ["resume", str(run)])
    assert result.exit_code == 2, result.output
    assert len([line for line in result.output.splitlines() if line.startswith("error: ")]) == 1, result.output
    assert "Traceback" not in result.output and "metrics.csv" in result.output
