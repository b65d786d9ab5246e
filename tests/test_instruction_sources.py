"""data=shakespeare_dialogue and data=pystdlib_functions: built-in instruction data with a
natural, non-IID split (the responding speaker; the top-level module), checked against
hand-counted examples and trained end to end."""
import logging
import math

import pytest
import torch

from fedrun import config, train
from fedrun.data.instructions import EOS_BYTE, Instruction, render
from fedrun.data.pystdlib_functions import documented_functions
from fedrun.data.shakespeare import read_speeches
from fedrun.data.shakespeare_dialogue import dialogue

TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=16", "device=cpu", "data.cache=false", "rounds=2",
        "sampler.clients_per_round=2", "client.local_steps=2", "client.batch_size=4"]

SCENE = """ANN:
Good morrow.

BOB:
Morrow to you,
and more.

BOB:
Again I speak.

ANN:
Well said.

CY:
Peace!

ANN:
Why?
"""


def _data(*overrides):
    return config.build_data(config.compose([*TINY, *overrides]))


def _texts(windows):
    """Each example's window as text, without its padding."""
    return [bytes(w.tolist()).rstrip(b"\0").decode() for w in windows.tokens]


# ---- shakespeare_dialogue --------------------------------------------------------------------------

def test_a_reply_is_the_next_speech_by_another_speaker(tmp_path):
    """Six speeches, five turns, one of them BOB to BOB: four examples, by hand."""
    (tmp_path / "scene.txt").write_text(SCENE)
    replies = dict(dialogue(read_speeches(str(tmp_path / "scene.txt"))[0]))
    assert replies == {
        "ANN": [Instruction("Again I speak.", "Well said."), Instruction("Peace!", "Why?")],
        "BOB": [Instruction("Good morrow.", "Morrow to you,\nand more.")],
        "CY": [Instruction("Well said.", "Peace!")],
    }
    data = _data("data=shakespeare_dialogue", f"data.path={tmp_path / 'scene.txt'}", "data.min_samples=1",
                 "data.seq_len=128")
    assert data.client_names() == ["ANN", "BOB", "CY"]
    assert (data.client_sizes("train") + data.client_sizes("test")).tolist() == [2, 1, 1]
    prompt, response = render(Instruction("Good morrow.", "Morrow to you,\nand more."))
    assert _texts(data.clients.train)[data.clients.train_offsets[1]] == prompt + response + chr(EOS_BYTE)
    assert _data("data=shakespeare_dialogue", f"data.path={tmp_path / 'scene.txt'}", "data.min_samples=2",
                 "data.seq_len=64").client_names() == ["ANN"]


def test_the_clients_are_the_responding_speakers_of_a_play(play):
    """Against a transcription: blocks split on blank lines, the first line names the speaker."""
    blocks = [b.split("\n", 1) for b in play.read_text().strip().split("\n\n")]
    speeches = [(head.removesuffix(":"), body) for head, body in blocks]
    expected: dict[str, list[Instruction]] = {}
    for (speaker, said), (responder, reply) in zip(speeches, speeches[1:]):
        if speaker != responder:
            expected.setdefault(responder, []).append(Instruction(said, reply))
    data = _data("data=shakespeare_dialogue", f"data.path={play}", "data.min_samples=1", "data.seq_len=512")
    assert data.client_names() == sorted(expected)
    held = data.client_sizes("train") + data.client_sizes("test")
    assert held.tolist() == [len(expected[name]) for name in sorted(expected)]
    wanted = sorted("".join(render(e)) + chr(EOS_BYTE) for name in expected for e in expected[name])
    assert sorted(_texts(data.clients.train) + _texts(data.clients.test)) == wanted


def test_shakespeare_dialogue_trains_end_to_end(play, tmp_path):
    cfg = config.compose([*TINY, "data=shakespeare_dialogue", f"data.path={play}", "data.min_samples=2",
                          "data.seq_len=64", f"run_dir={tmp_path / 'run'}"])
    _, summary = train.train(config.build(cfg))
    assert math.isfinite(summary["final"]["eval_loss"])


def test_shakespeare_dialogue_of_the_shared_corpus(shakespeare_path):
    data = _data("data=shakespeare_dialogue", f"data.path={shakespeare_path}")
    assert data.num_clients >= 50 and data.fingerprint["sha256"]
    assert bool(data.clients.train.mask[:, 1:].any(dim=1).all())


# ---- pystdlib_functions ----------------------------------------------------------------------------

GEOMETRY = '''\
"""Shapes."""
import math


def area(w, h):
    """Area of a rectangle."""
    return w * h


def perimeter(w, h):
    return 2 * (w + h)


class Box:
    """Not a function."""

    def volume(self, d):
        """Volume,
        in cubic units."""
        v = self.w * self.h * d
        return v

    @property
    def empty(self):
        """A docstring and nothing else."""


async def fetch(x):
    """Fetch x."""  # a comment
    await x
'''

SOLO = '''\
def one():
    """One."""
    return 1


def two():
    """Two."""
    return 2


def three():
    """Three."""

    return 3
'''


@pytest.fixture
def sources(tmp_path):
    root = tmp_path / "lib"
    (root / "geometry").mkdir(parents=True)
    (root / "geometry" / "__init__.py").write_text("")
    (root / "geometry" / "shapes.py").write_text(GEOMETRY)
    (root / "solo.py").write_text(SOLO)
    (root / "broken.py").write_text('def f(:\n    """Never read."""\n    return 1\n')
    (root / "test_skipped.py").write_text(SOLO)  # tests are not sources
    (root / "tests").mkdir()
    (root / "tests" / "cases.py").write_text(SOLO)
    return root


def test_a_prompt_is_the_def_through_the_docstring_and_the_response_the_rest():
    assert documented_functions(GEOMETRY.encode()) == [
        Instruction('def area(w, h):\n    """Area of a rectangle."""', "    return w * h"),
        Instruction('def volume(self, d):\n    """Volume,\n    in cubic units."""',
                    "    v = self.w * self.h * d\n    return v"),
        Instruction('async def fetch(x):\n    """Fetch x."""', "  # a comment\n    await x"),
    ]  # perimeter: no docstring; Box is a class; empty: nothing after its docstring
    assert documented_functions(SOLO.encode())[2] == Instruction('def three():\n    """Three."""', "\n    return 3")


def test_the_clients_are_top_level_modules_and_unparsable_files_are_counted(sources, caplog):
    with caplog.at_level(logging.INFO, logger="fedrun.data.pystdlib_functions"):
        data = _data("data=pystdlib_functions", f"data.root={sources}", "data.min_samples=1", "data.seq_len=128")
    assert "1 of 4 Python files skipped" in caplog.text  # broken.py; test_skipped.py and tests/ are not read
    assert data.client_names() == ["geometry", "solo"]
    assert (data.client_sizes("train") + data.client_sizes("test")).tolist() == [3, 3]
    solo = documented_functions(SOLO.encode())
    texts = sorted(_texts(data.clients[1].train) + _texts(data.clients[1].test))
    assert texts == sorted("".join(render(e)) + chr(EOS_BYTE) for e in solo)


def test_max_client_examples_keeps_each_modules_first_functions(sources):
    data = _data("data=pystdlib_functions", f"data.root={sources}", "data.min_samples=1", "data.seq_len=128",
                 "data.max_client_examples=2", "data.test_fraction=0.01")
    assert (data.client_sizes("train") + data.client_sizes("test")).tolist() == [2, 2]
    assert any("def area" in t for t in _texts(data.clients[0].train) + _texts(data.clients[0].test))
    assert not any("async def fetch" in t for t in _texts(data.clients[0].train) + _texts(data.clients[0].test))


def test_pystdlib_functions_trains_end_to_end(sources, tmp_path):
    cfg = config.compose([*TINY, "data=pystdlib_functions", f"data.root={sources}", "data.min_samples=1",
                          "data.seq_len=64", f"run_dir={tmp_path / 'run'}"])
    _, summary = train.train(config.build(cfg))
    assert math.isfinite(summary["final"]["eval_loss"])


def test_the_standard_library_gives_many_modules_of_documented_functions():
    data = _data("data=pystdlib_functions")
    assert data.num_clients >= 10
    for split in ("train", "test"):
        mask = getattr(data.clients, split).mask
        assert bool(mask[:, 1:].any(dim=1).all()), split  # every example has response tokens to learn
    assert data.fingerprint["max_client_examples"] == 64 and max(data.client_sizes("train")) <= 64


def test_an_instruction_source_refuses_the_canary_audit(sources):
    with pytest.raises(Exception, match="instruction data"):
        config.build(config.compose([*TINY, "data=pystdlib_functions", f"data.root={sources}",
                                     "data.min_samples=1", "audit=canaries"]))


def test_windows_are_one_example_each(sources):
    data = _data("data=pystdlib_functions", f"data.root={sources}", "data.min_samples=1", "data.seq_len=32")
    assert data.clients.train.tokens.shape[1] == 33 and data.clients.train.tokens.dtype == torch.uint8
