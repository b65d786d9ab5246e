"""Config groups compose and build; every bad input is one clear line and a non-zero exit."""
import json
import os

import pytest
import torch
from typer.testing import CliRunner

from fedrun import config
from fedrun.cli import app
from tests.conftest import TINY

GROUPS = ["data", "model", "client", "sampler", "strategy", "privacy", "backend", "attack"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (config.conf_dir() / group).glob("*.yaml"))


def test_every_options_keys_are_exactly_its_components_signature():
    """A component's signature is its schema: every key an option's YAML sets is a parameter of
    the class it names, and every parameter without a default has a value in the YAML."""
    from omegaconf import OmegaConf

    from fedrun.components import component, schema_of

    for group in [*GROUPS, "audit", "compression"]:
        for option in _options(group):
            cfg = config.compose([f"{group}={option}"], check_ranges=False)
            node = cfg[group]
            raw = OmegaConf.load(config.conf_dir() / group / f"{option}.yaml")
            # a value the user must give (data.path)
            required = {f"{group}.{k}" for k in raw if OmegaConf.is_missing(raw, k)}
            assert OmegaConf.missing_keys(node) == required, f"{group}/{option}.yaml leaves keys without a value"
            schema = config.ClientConfig if group == "client" else schema_of(component(node), group)
            fields = {f for f in schema.__dataclass_fields__ if f != "_target_"}
            assert set(node) - {"_target_"} == fields, f"{group}/{option}.yaml"


def test_the_readme_configuration_table_names_every_option():
    """The README's group table is where a user finds the options (conf/config.yaml points there)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for group in [*GROUPS, "audit", "compression"]:
        row = re.search(rf"^\| `{group}` \| (.*?) \|", readme, re.M)
        assert row, f"README: no row for {group}"
        assert set(_options(group)) <= set(re.findall(r"`(\w+)`", row.group(1))), f"README row of {group}"


SMALL = {"model=tiny_gpt": ["model.n_embd=16", "model.n_head=2"], "model=lstm": ["model.hidden_size=16"],
         "data=pystdlib": ["data.max_client_bytes=2000"], "strategy=scaffold": ["client.optimizer=sgd"],
         "client=hetero": ["strategy=fed_distill", "strategy.public.max_client_bytes=2000"],
         "strategy=fed_distill": ["strategy.public.max_client_bytes=2000"],
         "data=synthetic": ["model=logreg", "data.num_clients=6"], "privacy=central_dp": ["sampler.kind=poisson"],
         "strategy=krum": ["strategy.num_byzantine=1", "sampler.clients_per_round=5"]}


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_of_every_group_composes_and_builds(group, play, tmp_path):
    for option in _options(group):
        choice = f"{group}={option}"
        data = [] if group == "data" else ["data=shakespeare", f"data.path={play}", "data.min_samples=4"]
        if choice == "data=shakespeare":
            data = [f"data.path={play}", "data.min_samples=4"]
        if choice == "data=text_files":  # one client per file: four copies of the play
            (tmp_path / "texts").mkdir(exist_ok=True)
            for i in range(4):
                (tmp_path / "texts" / f"{i}.txt").write_bytes(play.read_bytes())
            data = [f"data.path={tmp_path / 'texts'}", "data.min_samples=4"]
        if choice == "data=table":  # one instruction per row, three users
            rows = [{"user": f"u{i % 3}", "q": f"question {i}?", "a": f"answer {i}."} for i in range(30)]
            (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            data = [f"data.path={tmp_path / 'rows.jsonl'}", "data.prompt_key=q", "data.response_key=a",
                    "data.client_key=user", "data.seq_len=32"]
        if choice == "data=shakespeare_dialogue":  # one client per responding speaker
            data = [f"data.path={play}", "data.min_samples=2", "data.seq_len=32"]
        if choice == "data=pystdlib_functions":  # the stdlib's documented functions, a few per module
            data = ["data.max_client_examples=4", "data.seq_len=32"]
        if choice in ("model=logreg", "model=mlp"):
            data = ["data=synthetic", "data.num_clients=6"]
        overrides = [choice, *data, f"run_dir={tmp_path}", "device=cpu", "sampler.clients_per_round=3",
                     *SMALL.get(choice, [])]
        exp = config.build(config.compose(overrides))
        assert exp.data.num_clients >= 3
        x, y = exp.data.clients[0].train[:2].inputs_targets(exp.device)
        assert exp.make_model()(x).shape[:-1] == y.shape


def test_defaults_compose_to_the_documented_values():
    cfg = config.compose([])
    assert cfg.data._target_.endswith("PyStdlib") and cfg.model._target_.endswith("TinyGPT")
    assert cfg.data.seq_len == 80 and cfg.data.test_fraction == 0.2
    assert cfg.run_dir.startswith("runs/") and cfg.run_dir.endswith("_fedavg")


def _fedrun(*args):
    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize("overrides, expected", [
    (["rounds=abc"], "rounds: 'abc' is not allowed; allowed: an integer"),
    (["strategy=nope"], "strategy: unknown option 'nope'; allowed: centralized, fed_distill, fedadagrad, fedadam,"),
    (["client.lr=-1"], "client.lr: -1.0 is not allowed; allowed: a number > 0"),
    (["sampler.clients_per_round=7"], "sampler.clients_per_round: 7 is more than the 6 clients"),
    (["data.path=/no/such/file.txt"], "data.path: file not found: /no/such/file.txt"),
    (["device=gpu"], "device: 'gpu' is not allowed; allowed: one of auto, cpu, cuda"),
    (["roundz=3"], "roundz: unknown key; allowed keys here: name, rounds"),
    (["client.local_epochs=1"], "client.local_steps: set exactly one of"),
    (["data.partition=speakers"], "data.partition: 'speakers' is not allowed; allowed: one of natural, iid"),
    (["model.n_embd=17"], "model.n_embd: 17 is not a multiple of model.n_head=2"),
    (["rounds"], "Error parsing override 'rounds'"),
])
def test_bad_input_is_one_line_naming_the_key(overrides, expected, play, tmp_path):
    result = _fedrun("train", "data=shakespeare", f"data.path={play}", f"run_dir={tmp_path / 'r'}", *TINY, *overrides)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "r" / "metrics.csv").exists()


def test_missing_mandatory_path_names_the_key():
    result = _fedrun("train", "data=shakespeare")
    assert result.exit_code == 2
    assert result.output.strip().startswith("error: data.path: no value given")


def test_debug_shows_the_traceback(play):
    result = _fedrun("train", "rounds=abc", "--debug")
    assert result.exit_code != 0 and result.exception is not None


def test_cfg_prints_the_composed_config_without_running(tmp_path):
    result = _fedrun("train", "--cfg", "rounds=7", "model=lstm", f"run_dir={tmp_path / 'x'}")
    assert result.exit_code == 0, result.output
    assert "rounds: 7" in result.output and "CharLSTM" in result.output
    assert not (tmp_path / "x").exists()


def test_data_command_prints_partition_statistics():
    result = _fedrun("data", "data=synthetic", "data.partition=dirichlet", "data.num_clients=20",
                     "data.dirichlet_alpha=0.1")
    assert result.exit_code == 0, result.output
    assert "clients" in result.output and "20" in result.output and "label_entropy_mean_bits" in result.output


def test_model_that_does_not_fit_the_data_is_refused():
    result = _fedrun("train", "data=synthetic", "model=tiny_gpt")
    assert result.exit_code == 2 and "model: TinyGPT does not fit this data" in result.output


@pytest.mark.parametrize("backend, expected", [("sequential", "cuda"), ("vectorized", "cuda"), ("process", "cpu"),
                                               ("ray", "cpu")])
def test_device_auto_picks_cuda_only_for_backends_that_train_in_the_main_process(monkeypatch, backend, expected):
    """Forked workers cannot use CUDA and Ray actors get no GPU: auto means the CPU for them."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    target = config.compose([f"backend={backend}"]).backend._target_
    assert config.resolve_device("auto", target).type == expected
    assert config.resolve_device("cpu", target).type == "cpu"


def test_cuda_runs_ask_for_deterministic_kernels_and_cpu_runs_change_nothing(monkeypatch):
    from fedrun.core import make_deterministic
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    was = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        make_deterministic(torch.device("cpu"))
        assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
        make_deterministic(torch.device("cuda"))  # sets flags only: it touches no CUDA device
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])
