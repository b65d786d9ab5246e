import hashlib

import pytest
import torch

from fedrun.core import FedrunError
from fedrun.data import text
from fedrun.data.pystdlib import PyStdlib, read_python_sources
from fedrun.data.shakespeare import Shakespeare, read_shakespeare
from tests.conftest import make_play


def _reference_speakers(raw: str) -> dict[str, str]:
    """An independent line-by-line reading of the `SPEAKER:\\nlines\\n\\n` layout."""
    out: dict[str, str] = {}
    speaker = None
    for line in raw.split("\n"):
        if not line.strip():
            speaker = None
        elif speaker is None and line.endswith(":"):
            speaker = line[:-1]
        elif speaker is not None:
            out[speaker] = out.get(speaker, "") + line + "\n"
    return out


def _rows(t: torch.Tensor) -> list[bytes]:
    return sorted(bytes(r.tolist()) for r in t)


def test_windows_overlap_by_one_byte_so_every_byte_is_a_target_once():
    w = text.windows(bytes(range(10)), 3)
    assert w.tolist() == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    targets = torch.cat([row[1:] for row in w]).tolist()
    assert targets == list(range(1, 10))
    assert text.windows(b"ab", 3).shape == (0, 4)


def test_split_by_position_keeps_order_and_at_least_one_window_each():
    w = text.windows(bytes(range(100)), 9)  # 11 windows
    train, test = text.split_by_position(w, 0.2)
    assert len(train) == 9 and len(test) == 2
    assert torch.equal(torch.cat([train, test]), w)
    train, test = text.split_by_position(w[:2], 0.2)
    assert len(train) == 1 and len(test) == 1


def test_speakers_match_an_independent_parse(tmp_path):
    path = make_play(tmp_path / "p.txt", speakers=5)
    docs, raw = read_shakespeare(str(path))
    expected = _reference_speakers(path.read_text())
    assert {n: t.decode() for n, t in docs} == expected


def test_real_corpus_speakers_match_an_independent_parse(shakespeare_path):
    docs, raw = read_shakespeare(str(shakespeare_path))
    expected = {k: v for k, v in _reference_speakers(raw.decode()).items() if v.strip()}
    assert {n: t.decode() for n, t in docs} == expected
    assert len(docs) > 250  # a few speakers (ghosts) have only empty speeches


def _fed(path, **kw):
    opts = dict(seq_len=16, test_fraction=0.2, min_samples=4, partition="natural", num_clients=None,
                max_client_bytes=None)
    seed = kw.pop("seed", 0)
    return Shakespeare(path=str(path), **(opts | kw)).load(seed=seed)


def test_natural_partition_is_one_client_per_kept_speaker(play):
    data = _fed(play)
    docs, _ = read_shakespeare(str(play))
    kept = [n for n, t in docs if len(text.windows(t, 16)) >= 4]
    assert [c.name for c in data.clients] == kept
    for client, (_name, t) in zip(data.clients, [d for d in docs if d[0] in kept]):
        assert torch.equal(torch.cat([client.train.tokens, client.test.tokens]), text.windows(t, 16))


def test_min_samples_drops_small_speakers(play):
    all_clients = _fed(play, min_samples=1)
    fewer = _fed(play, min_samples=30)
    assert fewer.num_clients < all_clients.num_clients
    assert all(len(c.train) + len(c.test) >= 30 for c in fewer.clients)


def test_iid_holds_exactly_the_natural_windows_evenly(play):
    natural = _fed(play)
    iid = _fed(play, partition="iid", num_clients=7, seed=3)
    assert iid.num_clients == 7
    sizes = [len(c.train) for c in iid.clients]
    assert max(sizes) - min(sizes) <= 1
    natural_train = torch.cat([c.train.tokens for c in natural.clients])
    assert _rows(torch.cat([c.train.tokens for c in iid.clients])) == _rows(natural_train)
    assert _rows(iid.test_examples().tokens) == _rows(natural.test_examples().tokens)


def test_iid_defaults_to_as_many_clients_as_natural(play):
    assert _fed(play, partition="iid").num_clients == _fed(play).num_clients


def test_fingerprint_records_source_hash_and_counts(play):
    data = _fed(play)
    fp = data.fingerprint
    assert fp["sha256"] == hashlib.sha256(play.read_bytes()).hexdigest()
    assert fp["bytes"] == play.stat().st_size
    assert fp["clients"] == data.num_clients
    assert fp["train_examples"] == sum(len(c.train) for c in data.clients)
    assert fp["test_examples"] == len(data.test_examples())


def test_pystdlib_is_one_client_per_top_level_module_without_tests(tmp_path):
    (tmp_path / "pkg" / "tests").mkdir(parents=True)
    (tmp_path / "pkg" / "__init__.py").write_text("x = 1\n" * 50)
    (tmp_path / "pkg" / "tests" / "t.py").write_text("SECRET\n" * 50)
    (tmp_path / "mod.py").write_text("y = 2\n" * 50)
    (tmp_path / "test_mod.py").write_text("SECRET\n" * 50)
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "a.py").write_text("SECRET\n" * 50)
    docs, _ = read_python_sources(str(tmp_path))
    assert [n for n, _ in docs] == ["mod", "pkg"]
    assert all(b"SECRET" not in t for _, t in docs)


def test_pystdlib_reads_the_running_interpreter():
    data = PyStdlib(root=None, seq_len=80, test_fraction=0.2, min_samples=10, partition="natural",
                    num_clients=None, max_client_bytes=4096).load(seed=0)
    names = {c.name for c in data.clients}
    assert {"json", "collections", "email"} <= names and "test" not in names


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(FedrunError, match="data.path: file not found"):
        read_shakespeare(str(tmp_path / "nope.txt"))
    (tmp_path / "empty.txt").write_text("no speakers here\n")
    with pytest.raises(FedrunError, match="data.path: no 'SPEAKER:' blocks"):
        read_shakespeare(str(tmp_path / "empty.txt"))
