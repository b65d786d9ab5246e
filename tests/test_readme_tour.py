"""The README's "A tour of the CLI" as a new user follows it: every command runs (in a few small
rounds) from a clean working directory, and every documented error line is what fedrun prints."""
from __future__ import annotations

import re
import shlex

import pytest
from typer.testing import CliRunner

from fedrun.cli import app
from fedrun.core import FedrunError
from tests.conftest import ROOT, SHAKESPEARE

SMALL = ["rounds=2", "eval_every=2", "data.max_client_bytes=1024", "client.local_steps=2", "device=cpu"]
SHARED = "../shared/data/tinyshakespeare.txt"  # relative to the clone, as the README writes it
WORKING_DIR = "/home/you/fedrun"  # where the README's example session runs


def _section() -> str:
    return (ROOT / "README.md").read_text().split("\n## A tour of the CLI\n", 1)[1].split("\n## ", 1)[0]


def tour_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", _section(), flags=re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip().startswith("fedrun")]


def documented_errors() -> list[tuple[str, str]]:
    """($ command, the error line printed under it) of the section's example session."""
    return re.findall(r"^\$ (fedrun [^\n]+)\n(error: [^\n]+)$", _section(), flags=re.M)


def test_the_section_has_its_commands_and_errors():
    assert len(tour_commands()) >= 10 and len(documented_errors()) >= 5


@pytest.mark.parametrize("command", tour_commands())
def test_a_tour_command_runs_from_a_clean_directory(command, tmp_path, monkeypatch):
    args = shlex.split(command)[1:]
    if SHARED in command:
        if not SHAKESPEARE.is_file():
            pytest.skip(f"needs the shared corpus at {SHAKESPEARE} (the README says where to download it)")
        args = [a.replace(SHARED, str(SHAKESPEARE)) for a in args]
    monkeypatch.chdir(tmp_path)  # nothing of the clone around: the command must not need it
    trains = args[0] == "train" and not {"--help", "--cfg", "--debug"} & set(args)
    if trains:
        args += SMALL + [f"run_dir={tmp_path / 'run'}"]
    result = CliRunner().invoke(app, args)
    if "--debug" in args:  # the documented way to see a traceback: the error is raised, not caught
        assert result.exit_code == 1 and isinstance(result.exception, FedrunError), result.output
        assert str(result.exception) == "rounds: 'abc' is not allowed; allowed: an integer"
        return
    assert result.exit_code == 0, result.output
    if trains:
        assert (tmp_path / "run" / "summary.json").is_file()


@pytest.mark.parametrize("command,printed", documented_errors())
def test_a_documented_error_is_the_line_fedrun_prints(command, printed, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, shlex.split(command)[1:])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [printed.replace(WORKING_DIR, str(tmp_path))]
