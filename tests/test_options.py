"""`fedrun options [GROUP]`: what can be set, from the sources validation reads."""
import pytest
from omegaconf import OmegaConf
from typer.testing import CliRunner

from fedrun import config, options
from fedrun.cli import app
from fedrun.components import component, config_keys


def fedrun(*args: str):
    return CliRunner().invoke(app, list(args))


def test_options_lists_every_group_its_options_and_the_default():
    result = fedrun("options")
    assert result.exit_code == 0, result.output
    for group in ("data", "model", "client", "strategy", "privacy", "backend", "attack", "compression", "logger"):
        names = sorted(p.stem for p in (config.conf_dir() / group).glob("*.yaml"))
        row = next(line for line in result.output.splitlines() if line.startswith(f"│ {group} "))
        assert all(name in row for name in names), (group, row)
    assert "fedavg*" in result.output and "tiny_gpt*" in result.output and "pystdlib*" in result.output
    assert "rounds" in result.output and "an integer >= 1" in result.output  # the top-level keys


def test_options_of_a_group_list_each_key_with_default_and_range():
    result = fedrun("options", "strategy")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    mu = next(line for line in lines if "│ mu " in line)
    assert "fedprox" in mu and "0.01" in mu and "a number >= 0" in mu
    assert any("fedavg (default)" in line and "(no keys)" in line for line in lines)
    assert "strategy=scaffold also sets client.optimizer=sgd client.momentum=0.0 client.lr=0.1" in result.output


def test_an_unknown_group_is_one_line():
    result = fedrun("options", "strategies")
    assert result.exit_code == 2
    assert result.output.strip().startswith("error: group: unknown group 'strategies'; allowed: data, model")


@pytest.mark.parametrize("group", ["privacy", "model"])
def test_listed_defaults_and_ranges_are_those_composition_and_validation_use(group):
    for option in options.options(group):
        node = config.compose([f"{group}={option.name}"], check_ranges=False)[group]
        keys = {k.name: k for k in config_keys(component(node), group)}
        for info in option.keys:
            value = OmegaConf.select(node, info.name)
            assert info.default == options.show(value), (option.name, info.name)
            top = info.name.split(".")[0]
            if top in keys and not info.name.count("."):
                assert info.allowed == options.allowed(keys[top]), (option.name, info.name)
        assert {info.name.split(".")[0] for info in option.keys} >= set(keys) - {"cache"}


def test_train_help_names_the_options_command():
    assert "fedrun options" in fedrun("train", "--help").output
