"""Shared fixtures: composing configs, a small generated corpus, the shared tinyshakespeare file."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from fedrun import config

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"

# A model and data small enough that a round takes milliseconds.
TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=16", "data.seq_len=16", "data.min_samples=4",
        "sampler.clients_per_round=3", "rounds=2", "eval_every=1"]


@pytest.fixture(autouse=True)
def data_cache(tmp_path_factory, monkeypatch) -> Path:
    """Every test gets an empty data cache of its own (beside its tmp_path), never ~/.cache/fedrun."""
    path = tmp_path_factory.mktemp("data_cache")
    monkeypatch.setenv("FEDRUN_CACHE", str(path))
    return path


@pytest.fixture
def one_thread(monkeypatch):
    """One torch thread for the test: tiny models train fastest so, others' threads don't slow them
    down, and a sequential reference has the floating-point order of one-thread workers. A run's
    threads=auto sees one usable core, so building it keeps the one thread."""
    import torch

    from fedrun import threads as run_threads

    monkeypatch.setattr(run_threads, "usable_cores", lambda: 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    run_threads._applied.pop("threads", None)


@pytest.fixture
def shakespeare_path() -> Path:
    if not SHAKESPEARE.is_file():
        pytest.skip(f"needs the shared corpus at {SHAKESPEARE} (present on the project's machines, "
                    "absent from a fresh clone)")
    return SHAKESPEARE


def make_play(path: Path, *, speakers: int = 6, speeches: int = 12, seed: int = 0) -> Path:
    """A file in the tinyshakespeare layout, each speaker with a different amount of text."""
    rng = random.Random(seed)
    words = "the and of to my thou that is in not with me it for be his your this but he have".split()
    blocks = []
    for s in range(speeches * speakers):
        who = s % speakers
        if rng.random() < who / (speakers + 2):  # later speakers speak less often
            continue
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 9))).capitalize() + "."
                 for _ in range(rng.randint(1, 4))]
        blocks.append(f"SPEAKER {chr(65 + who)}:\n" + "\n".join(lines))
    path.write_text("\n\n".join(blocks) + "\n")
    return path


@pytest.fixture
def play(tmp_path: Path) -> Path:
    return make_play(tmp_path / "play.txt")


@pytest.fixture
def compose_cfg(tmp_path: Path, play: Path):
    """compose_cfg(*overrides): a validated config on the generated play, writing under tmp_path."""

    def _compose(*overrides: str, tiny: bool = True):
        base = [f"run_dir={tmp_path / 'run'}", "data=shakespeare", f"data.path={play}", "device=cpu"]
        return config.compose(base + (TINY if tiny else []) + list(overrides))

    return _compose


def central_mechanism(**overrides):
    """A CentralPrivacy (privacy=central_dp) with adaptive clipping on, for unit tests of its parts."""
    import torch

    from fedrun.privacy.central import CentralPrivacy as central

    options = dict(clip_norm=1.0, noise_multiplier=1.0, target_epsilon=None, delta=1e-5, accountant="rdp",
                   stop_at_budget=False, adaptive=True, target_quantile=0.5, clip_lr=0.5, clip_count_stddev=0.8,
                   secure_agg=False, secagg_bits=16, secagg_threshold=0.5, secagg_min_clients=3,
                   log_client_stats=False, noise_source="seed", num_clients=1000, num_params=40, sample_rate=0.1,
                   rounds=10, seed=0, device=torch.device("cpu"))
    return central(**(options | overrides))
