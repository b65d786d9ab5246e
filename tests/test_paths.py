"""Paths travel: a key that names a local file or folder (LocalPath) is made absolute when a run
is built, so eval, generate, resume and export work from any working directory; what the user
typed is kept in typed_paths.json."""
import json
import shutil

import pytest
from omegaconf import OmegaConf
from typer.testing import CliRunner

from fedrun.cli import app
from tests.conftest import TINY, make_play


def test_a_run_made_with_relative_paths_works_from_another_directory(tmp_path, monkeypatch):
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    make_play(here / "play.txt")
    (here / "mc.jsonl").write_text(json.dumps({"question": "Who?", "choices": ["a", "b"], "answer": 0}) + "\n")
    monkeypatch.chdir(here)
    args = ["train", "data=shakespeare", "data.path=play.txt", "eval.choices=./mc.jsonl", "run_dir=runs/r",
            "device=cpu", "checkpoint_every=1", *TINY]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    run = here / "runs" / "r"
    cfg = OmegaConf.load(run / "config.yaml")
    assert cfg.data.path == str(here / "play.txt") and cfg.eval.choices == str(here / "mc.jsonl")
    assert json.loads((run / "typed_paths.json").read_text()) == {"data.path": "play.txt",
                                                                  "eval.choices": "./mc.jsonl"}
    from fedrun.rundir import FILE_MODE

    for name in ("model.safetensors", "config.yaml", "checkpoints/round_0002.pt"):  # safetensors alone wrote 0600
        assert (run / name).stat().st_mode & 0o777 == FILE_MODE
    monkeypatch.chdir(elsewhere)  # where play.txt and mc.jsonl are not
    for command in (["eval", str(run)], ["generate", str(run), "--prompt", "A", "--max-new-tokens", "3"]):
        out = CliRunner().invoke(app, command)
        assert out.exit_code == 0, out.output
    stopped = tmp_path / "stopped"  # and a resume: killed after round 1
    shutil.copytree(run, stopped)
    for name in ("summary.json", "checkpoints/round_0002.pt", "checkpoints/round_0002.sha256"):
        (stopped / name).unlink()
    out = CliRunner().invoke(app, ["resume", str(stopped)])
    assert out.exit_code == 0, out.output
    assert (stopped / "summary.json").exists()


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_an_adapter_records_its_base_as_an_absolute_path(tmp_path, monkeypatch):
    pytest.importorskip("peft", reason="model=hf's LoRA needs the [llm] extra: pip install -e .[llm]")
    monkeypatch.chdir(tmp_path)
    make_play(tmp_path / "play.txt")
    hf = ["model=hf", "model.from_config.n_embd=16", "model.from_config.n_layer=1", "data=shakespeare",
          "data.path=play.txt", "data.seq_len=16", "data.min_samples=4", "sampler.clients_per_round=3", "rounds=1",
          "device=cpu"]
    out = CliRunner().invoke(app, ["train", *hf, "model.lora.enabled=false", "run_dir=runs/base"])
    assert out.exit_code == 0, out.output
    out = CliRunner().invoke(app, ["export", "runs/base", "checkpoints/base"])
    assert out.exit_code == 0, out.output
    out = CliRunner().invoke(app, ["train", *hf, "model.name_or_path=checkpoints/base", "model.from_config=null",
                                   "run_dir=runs/lora"])
    assert out.exit_code == 0, out.output
    adapter = json.loads((tmp_path / "runs" / "lora" / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tmp_path / "checkpoints" / "base")
