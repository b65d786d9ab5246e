"""Every `fedrun train` command of the README's Privacy section runs as written, in a few small rounds."""
from __future__ import annotations

import re
import shlex

import pytest
from typer.testing import CliRunner

from fedrun.cli import app
from tests.conftest import ROOT

SMALL = ["rounds=2", "eval_every=2", "model.n_layer=1", "model.n_head=2", "model.n_embd=16", "data.seq_len=32",
         "data.max_client_bytes=1024", "client.local_steps=2", "device=cpu"]


def privacy_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Privacy\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip().startswith("fedrun train")]


def test_the_section_has_its_commands():
    assert len(privacy_commands()) >= 7


@pytest.mark.parametrize("command", privacy_commands())
def test_a_readme_privacy_command_runs(command, tmp_path):
    args = shlex.split(command)[1:] + SMALL + [f"run_dir={tmp_path / 'run'}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "summary.json").is_file()
