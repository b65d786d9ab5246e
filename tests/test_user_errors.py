"""What a new user meets on the paths of issue #20: every wrong input is one line naming the key
(exit 2, before any training), and what a run prints says what ran."""
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedrun import cli
from fedrun.cli import app
from tests.conftest import ROOT, TINY

SYNTHETIC = ["data=synthetic", "model=logreg", "data.num_clients=6", "sampler.clients_per_round=3", "rounds=1",
             "device=cpu"]


def fedrun(*args: str):
    return CliRunner().invoke(app, list(args))


def one_error_line(result, expected: str) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def synthetic_run(tmp_path) -> Path:
    run = tmp_path / "run"
    result = fedrun("train", *SYNTHETIC, f"run_dir={run}")
    assert result.exit_code == 0, result.output
    return run


# ---- A: errors that name the key -------------------------------------------------------------

def test_a_negative_seed_is_one_line(tmp_path):
    one_error_line(fedrun("train", "seed=-1", f"run_dir={tmp_path / 'r'}"),
                   "seed: -1 is not allowed; allowed: an integer >= 0")


@pytest.mark.parametrize("inside", ["", "/sub"])
def test_a_run_dir_that_is_a_file_is_refused_before_any_data_is_read(tmp_path, inside):
    file = tmp_path / "file"
    file.write_text("mine")
    line = one_error_line(fedrun("train", *SYNTHETIC, f"run_dir={file}{inside}"), f"run_dir: {file}{inside}")
    assert "is a file; allowed: a folder" in line
    assert file.read_text() == "mine"


def test_eval_with_an_unknown_data_key_names_it(synthetic_run):
    one_error_line(fedrun("eval", str(synthetic_run), "data.pathx=x"),
                   "data.pathx: unknown key; allowed keys here: alpha")
    one_error_line(fedrun("eval", str(synthetic_run), "data.alpha=x"), "data.alpha: 'x' is not allowed")


def test_report_out_at_an_existing_file_is_refused(synthetic_run, tmp_path):
    out = tmp_path / "report.txt"
    out.write_text("mine")
    one_error_line(fedrun("report", str(synthetic_run), "--out", str(out)), f"report --out: {out} is a file")
    assert out.read_text() == "mine"


@pytest.mark.parametrize("override", ["data._target_=foo.Bar", "data._target_=fedrun.data.synthetic.Synthetic",
                                      "+strategy._partial_=true"])
def test_a_target_is_chosen_by_an_option_not_set(override):
    key = override.split("=")[0].lstrip("+")
    line = one_error_line(fedrun("train", override), f"{key}: chosen by picking an option, not set directly")
    assert "allowed: " in line


def test_eval_refuses_a_target_too(synthetic_run):
    one_error_line(fedrun("eval", str(synthetic_run), "data._target_=os.system"), "data._target_: chosen by picking")


def test_a_key_of_another_strategy_says_which_strategy_has_it():
    one_error_line(fedrun("train", "strategy.mu=1"),
                   "strategy.mu: unknown key; strategy=fedavg has no keys; mu is a key of strategy=fedprox")
    line = one_error_line(fedrun("train", "strategy=fedadam", "strategy.momentum=0.5"),
                          "allowed keys of strategy=fedadam: server_lr, beta1, beta2, tau")
    assert line.endswith("momentum is a key of strategy=fedavgm")


def test_data_path_that_is_a_directory_says_so(tmp_path):
    line = one_error_line(fedrun("train", "data=shakespeare", f"data.path={tmp_path}", *TINY),
                          f"data.path: {tmp_path} is a directory; expected a file")
    assert "data=text_files" in line
    line = one_error_line(fedrun("train", "data=text_files", f"data.path={ROOT / 'README.md'}", *TINY),
                          "is a file; expected a folder of text files")


def test_a_missing_tinyshakespeare_says_where_to_get_it(tmp_path):
    line = one_error_line(fedrun("train", "data=shakespeare", f"data.path={tmp_path / 'no.txt'}", *TINY),
                          "data.path: file not found")
    assert "https://raw.githubusercontent.com/karpathy/char-rnn/" in line


@pytest.mark.parametrize("override", ["seed=0,1", "strategy=fedavg,fedprox", "seed=range(3)"])
def test_several_values_on_train_point_to_sweep(override):
    line = one_error_line(fedrun("train", override), f"{override.split('=')[0]}: ")
    assert "fedrun sweep" in line


# ---- E: strategies that need plain SGD select it ----------------------------------------------

def test_scaffold_alone_selects_plain_sgd_visibly():
    result = fedrun("train", "--cfg", "strategy=scaffold")
    assert result.exit_code == 0, result.output
    client = re.search(r"^client:\n((?:  .*\n)+)", result.output, re.M).group(1)
    assert "optimizer: sgd" in client and "momentum: 0.0" in client
    # a command-line value still wins, and Adam is refused with the override to copy
    assert "lr: 0.05" in fedrun("train", "--cfg", "strategy=scaffold", "client.lr=0.05").output
    line = one_error_line(fedrun("train", "strategy=scaffold", "client.optimizer=adam"),
                          "client.optimizer: strategy=scaffold needs plain local SGD")
    assert line.endswith("allowed: client.optimizer=sgd client.momentum=0")


def test_every_strategy_that_needs_plain_sgd_selects_it():
    from fedrun import config
    from fedrun.components import capability

    for path in sorted((config.conf_dir() / "strategy").glob("*.yaml")):
        cfg = config.compose([f"strategy={path.stem}"], check_ranges=False)
        if capability(cfg.strategy, "strategy", "needs_plain_sgd"):
            assert cfg.client.optimizer == "sgd" and cfg.client.momentum == 0, path.stem


# ---- B: on screen -----------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, suffix", [([], "_fedavg"), (["strategy=fedprox"], "_fedprox"),
                                               (["privacy=central_dp", "sampler.kind=poisson"], "_fedavg_central_dp"),
                                               (["strategy=scaffold", "privacy=secure_agg"], "_scaffold_secure_agg"),
                                               (["name=mine"], "_mine")])
def test_run_directories_are_named_after_what_ran(overrides, suffix):
    from fedrun import config

    cfg = config.compose(overrides)
    assert cfg.run_dir.endswith(suffix) and cfg.name == suffix[1:]


def printed(fn, *args, **kwargs) -> str:
    with cli.console.capture() as captured:
        fn(*args, **kwargs)
    return captured.get()


def dp_summary(*, delta: float, clients: int) -> dict:
    final = {"eval_loss": 2.0, "eval_ppl": 7.389, "eval_acc": 0.3, "round": 5}
    return {"rounds": 5, "initial": {"eval_loss": 5.0, "eval_ppl": 148.4, "eval_acc": 0.1}, "final": final,
            "best": {**final, "round": 3}, "bytes_up": 1e6, "bytes_down": 1e6, "seconds": 2.0,
            "data": {"clients": clients},
            "privacy": {"mechanism": "central_dp", "epsilon": 2.345, "delta": delta, "accountant": "prv"}}


def test_a_dp_runs_results_show_epsilon_delta_and_the_accountant():
    out = printed(cli._print_summary, dp_summary(delta=1e-6, clients=1000))
    header = next(line for line in out.splitlines() if "eval ppl" in line)
    assert "epsilon" in header
    final = next(line for line in out.splitlines() if "final" in line)
    assert final.split()[-2] == "2.345"  # beside the utility metrics, in the final row
    assert "privacy: (2.345, 1e-06)-DP per user (central_dp, prv accountant)" in out
    assert "warning" not in out


def test_a_delta_above_one_over_ten_n_is_warned_about():
    out = " ".join(printed(cli._print_summary, dp_summary(delta=2e-3, clients=200)).split())
    assert "warning: delta 0.002 is above min(1e-3, 1/(10 N)) = 0.0005 for N = 200 clients" in out


def test_a_run_without_dp_shows_no_epsilon(synthetic_run):
    summary = json.loads((synthetic_run / "summary.json").read_text())
    out = printed(cli._print_summary, summary)
    assert "epsilon" not in out and "privacy:" not in out


def test_a_real_dp_run_prints_its_guarantee(tmp_path):
    result = fedrun("train", *SYNTHETIC, "privacy=central_dp", "sampler.kind=poisson", f"run_dir={tmp_path / 'r'}")
    assert result.exit_code == 0, result.output
    assert re.search(r"privacy: \([0-9.e+-]+, [0-9.e+-]+\)-DP per user \(central_dp, rdp accountant\)", result.output)
    assert "delta" in result.output and "1/(10 N)" in result.output  # 6 clients: 1/N^1.1 is far above 1/(10 N)


def test_help_of_train_points_to_options():
    assert "fedrun options" in fedrun("train", "--help").output


# ---- C: report over mixed runs ----------------------------------------------------------------

MIXED = {  # run name: its components' targets (and attack kind), as fedrun writes them in config.yaml
    "gpt": {"model": "fedrun.models.tiny_gpt.TinyGPT", "privacy": "fedrun.privacy.none.NoPrivacy"},
    "lstm": {"model": "fedrun.models.lstm.CharLSTM", "privacy": "fedrun.privacy.none.NoPrivacy"},
    "dp": {"model": "fedrun.models.tiny_gpt.TinyGPT", "privacy": "fedrun.privacy.central.CentralPrivacy"},
    "flip": {"model": "fedrun.models.tiny_gpt.TinyGPT", "privacy": "fedrun.privacy.none.NoPrivacy",
             "attack": "sign_flip"},
    "scale": {"model": "fedrun.models.tiny_gpt.TinyGPT", "privacy": "fedrun.privacy.none.NoPrivacy",
              "attack": "scale"},
}


def mixed_runs(root: Path) -> Path:
    for name, parts in MIXED.items():
        run = root / name
        run.mkdir(parents=True)
        attack = (f"attack:\n  _target_: fedrun.attacks.ModelPoisoning\n  kind: {parts['attack']}\n  fraction: 0.2\n"
                  if "attack" in parts else "attack:\n  _target_: fedrun.attacks.NoAttack\n")
        (run / "config.yaml").write_text(
            f"name: x\nrounds: 2\nseed: 0\nrun_dir: {run}\nmodel:\n  _target_: {parts['model']}\n"
            f"privacy:\n  _target_: {parts['privacy']}\nsampler:\n  kind: {'poisson' if name == 'dp' else 'uniform'}\n"
            f"{attack}")
        (run / "metrics.csv").write_text("round,eval_loss,eval_ppl,eval_acc,bytes_up,bytes_down,seconds\n"
                                         "0,5.0,148.4,0.1,0,0,0.1\n1,,,,1000,1000,0.5\n2,4.0,54.6,0.2,1000,1000,0.5\n")
        (run / "summary.json").write_text(json.dumps({"rounds": 2}))
    return root


def rendered(table, width: int) -> str:
    import io

    from rich.console import Console

    console = Console(width=width, record=True, file=io.StringIO())
    console.print(table)
    return console.export_text()


def test_report_names_options_not_classes_and_cuts_no_header(tmp_path):
    from fedrun.report import report

    table, _ = report([mixed_runs(tmp_path / "runs")])
    for width in (80, 250):
        text = rendered(table, width)
        assert "…" not in text, text
        for name in ("tiny_gpt", "lstm", "central_dp", "sign_flip", "scale", "reached", "eval ppl"):
            assert name in text.replace("\n", " ") or name.split()[0] in text, (name, text)
        for cls in ("TinyGPT", "CharLSTM", "CentralPrivacy", "ModelPoisoning", "attack.kind"):
            assert cls not in text, (cls, text)
        assert all(len(line) <= width for line in text.splitlines())
    narrow = rendered(table, 80)
    assert "settings of each # above" in narrow and re.search(r"│ A │ model=lstm", narrow)  # keyed by letter


def test_report_explains_reached_and_keys_its_legend_to_the_table(tmp_path, monkeypatch):
    from fedrun.report import plots, report
    from fedrun.report.table import LEGEND_CHARS

    legends = []
    real = plots.learning_curves
    monkeypatch.setattr(plots, "learning_curves", lambda metric, curves: legends.append([c[0] for c in curves])
                        or real(metric, curves))
    table, files = report([mixed_runs(tmp_path / "runs")], out=tmp_path / "out")
    assert legends and all(len(label) <= LEGEND_CHARS for labels in legends for label in labels)
    assert legends[0] == ["A", "B", "C", "D", "E"]
    md = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "| # | model |" in md and "| A | lstm |" in md  # the letters' key
    assert "reached: the last round the runs logged" in md
    assert "reached: the last round" in rendered(table, 120)
    assert "reached: the last round" in (tmp_path / "out" / "report.html").read_text(encoding="utf-8")


# ---- F: small items ---------------------------------------------------------------------------

def test_generate_writes_valid_utf8_without_control_characters(play, tmp_path, monkeypatch):
    from fedrun import generate as generation

    run = tmp_path / "text"
    result = fedrun("train", "data=shakespeare", f"data.path={play}", *TINY, "rounds=1", f"run_dir={run}")
    assert result.exit_code == 0, result.output
    sampled = b"\xff\xfe ok \x1b[2J\x07 \xe2\x82"  # invalid bytes, a clear-screen sequence, a bell
    monkeypatch.setattr(generation, "generate", lambda model, prompt, **kw: prompt + sampled)
    out = CliRunner().invoke(app, ["generate", str(run), "--prompt", "hi"])
    assert out.exit_code == 0, out.output
    text = out.stdout_bytes.decode("utf-8")  # strict: raises on invalid UTF-8
    assert text == "hi\ufffd\ufffd ok \\x1b[2J\\x07 \ufffd\n"


def test_vectorized_on_a_cpu_says_so_in_train_log(play, tmp_path):
    run = tmp_path / "run"
    result = fedrun("train", "data=shakespeare", f"data.path={play}", *TINY, "rounds=1", "backend=vectorized",
                    "device=cpu", f"run_dir={run}")
    assert result.exit_code == 0, result.output
    assert "backend=vectorized: TinyGPT is batched with vmap; on a CPU" in (run / "train.log").read_text()


def test_export_of_a_lora_run_built_from_config_writes_its_base(play, tmp_path):
    pytest.importorskip("peft", reason="needs the [llm] extra: pip install -e .[llm]")
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedrun.generate import load_model

    run, out = tmp_path / "run", tmp_path / "export"
    result = fedrun("train", "model=hf", "model.from_config.n_embd=16", "model.from_config.n_layer=1",
                    "data=shakespeare", f"data.path={play}", "data.seq_len=16", "data.min_samples=4",
                    "sampler.clients_per_round=3", "rounds=1", "device=cpu", f"run_dir={run}")
    assert result.exit_code == 0, result.output
    result = fedrun("export", str(run), str(out))
    assert result.exit_code == 0, result.output
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str((out / "base").resolve())
    exported = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base"), out).eval()
    ours, _ = load_model(run, device="cpu")
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(exported(input_ids=x).logits[..., :256], ours(x), atol=1e-5)


def test_the_readmes_fedrun_data_output_is_what_the_command_prints():
    readme = (ROOT / "README.md").read_text()
    command, printed = re.search(r"\n\$ (fedrun data [^\n]*)\n(.*?)\n```", readme, re.S).groups()
    rows = dict(re.findall(r"│ (\w+) +│ ([\d.]+) +│", printed))
    assert len(rows) == 7
    result = fedrun(*command.split()[1:])
    assert result.exit_code == 0, result.output
    assert dict(re.findall(r"│ (\w+) +│ ([\d.]+) +│", result.output)) == rows
