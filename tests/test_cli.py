"""End to end through the command line: the run directory a user gets."""
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from typer.testing import CliRunner

from fedrun import config
from fedrun.cli import app
from fedrun.evaluation import evaluate
from tests.conftest import ROOT, TINY

METRICS = ["round", "clients", "examples", "train_loss", "eval_loss", "eval_ppl", "eval_acc",
           "bytes_up", "bytes_down", "seconds", "sampled", "reported", "dropped"]
CLIENTS = ["round", "client_id", "examples", "train_loss", "update_norm", "seconds", "status", "local_steps"]


def _check_run_dir(run_dir: Path, rounds: int) -> pd.DataFrame:
    for name in ("config.yaml", "metrics.csv", "clients.csv", "partition.csv", "model.safetensors",
                 "summary.json", "train.log", f"checkpoints/round_{rounds:04d}.pt"):
        assert (run_dir / name).is_file(), name
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert list(metrics.columns) == METRICS
    assert metrics["round"].tolist() == list(range(rounds + 1))
    assert list(pd.read_csv(run_dir / "clients.csv").columns) == CLIENTS
    ckpt = torch.load(run_dir / f"checkpoints/round_{rounds:04d}.pt", weights_only=True)
    assert ckpt["round"] == rounds and ckpt["weights"].dtype == torch.float32
    return metrics


def test_train_on_tinyshakespeare_through_the_console_script(shakespeare_path, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [str(Path(sys.executable).with_name("fedrun")), "train", "data=shakespeare", f"data.path={shakespeare_path}",
           f"run_dir={run_dir}", "rounds=4", "eval_every=2", "sampler.clients_per_round=4",
           "client.local_steps=5", "client.lr=0.01", "model.n_layer=1", "model.n_embd=32"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == str(run_dir)  # the last line is the run directory
    metrics = _check_run_dir(run_dir, 4)
    evals = metrics.dropna(subset=["eval_loss"])
    assert evals["round"].tolist() == [0, 2, 4]
    assert evals["eval_loss"].iloc[-1] < evals["eval_loss"].iloc[0] - 0.5
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["data"]["source"] == "shakespeare" and summary["data"]["partition"] == "natural"
    assert summary["final"]["eval_ppl"] < summary["initial"]["eval_ppl"]


def test_run_directory_round_trips_the_model_and_config(play, tmp_path):
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "data=shakespeare", f"data.path={play}", f"run_dir={run_dir}",
                                      *TINY, "rounds=3", "eval_every=1", "checkpoint_every=2"])
    assert result.exit_code == 0, result.output
    metrics = _check_run_dir(run_dir, 3)
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt")) == ["round_0002.pt", "round_0003.pt"]
    assert metrics["eval_loss"].iloc[-1] < metrics["eval_loss"].iloc[0]
    # The saved config composes the same run, and the saved model scores the logged final metrics.
    exp = config.build(OmegaConf.load(run_dir / "config.yaml"))
    model = exp.make_model()
    model.load_state_dict(load_file(run_dir / "model.safetensors"), strict=False)
    scores = evaluate(model, exp.data.test_examples(), torch.device("cpu"))
    assert abs(scores["eval_loss"] - metrics["eval_loss"].iloc[-1]) < 1e-6
    log = (run_dir / "train.log").read_text()
    assert "round 3:" in log and "'source': 'shakespeare'" in log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final"]["round"] == 3 and summary["versions"]["torch"] == torch.__version__
    assert summary["best"]["eval_loss"] == metrics["eval_loss"].min()


def test_help_reads_well():
    out = CliRunner().invoke(app, ["--help"]).output
    assert "train" in out and "Federated learning" in out
    out = CliRunner().invoke(app, ["train", "--help"]).output
    assert "--cfg" in out and "overrides" in out.lower()
