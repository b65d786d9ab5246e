"""The on-disk data cache: a hit is exactly a fresh build; anything that changes the data misses;
a broken entry or an unwritable folder costs a rebuild, never the run."""
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fedrun import config
from fedrun.data import cache
from fedrun.data.examples import FederatedData, Labelled, PackedClients

SYNTHETIC = ["data=synthetic", "model=logreg", "data.num_clients=15", "sampler.clients_per_round=3"]


@pytest.fixture
def compose_cfg(compose_cfg, tmp_path):
    """The shared fixture (text on a generated play), or data=synthetic without the text keys."""
    def _compose(*overrides: str):
        if "data=synthetic" in overrides:
            return config.compose([f"run_dir={tmp_path / 'run'}", "device=cpu", "rounds=1", *overrides])
        return compose_cfg(*overrides)

    return _compose


def _build(compose_cfg, *overrides):
    return config.build_data(compose_cfg(*overrides))


def _entries(data_cache) -> list:
    return sorted(p for p in data_cache.iterdir() if p.suffix == ".pt")


def assert_same_data(a: FederatedData, b: FederatedData) -> None:
    """Equal tensors (dtype included), client order, names, offsets, fingerprint and model dims."""
    assert a.fingerprint == b.fingerprint and a.model_dims == b.model_dims
    assert a.num_clients == b.num_clients
    for split in ("train", "test"):
        x, y = getattr(a.clients, split), getattr(b.clients, split)
        for name in vars(x):
            if getattr(x, name) is None:  # plain windows have no loss mask
                assert getattr(y, name) is None, (split, name)
                continue
            assert getattr(x, name).dtype == getattr(y, name).dtype
            assert torch.equal(getattr(x, name), getattr(y, name)), (split, name)
    for ca, cb in zip(a.clients, b.clients):
        assert ca.name == cb.name and len(ca.train) == len(cb.train) and len(ca.test) == len(cb.test)


@pytest.mark.parametrize("source", [SYNTHETIC, [], ["data.partition=iid", "data.num_clients=4"]],
                         ids=["synthetic", "text", "text-iid"])
def test_a_hit_is_exactly_a_fresh_build(compose_cfg, data_cache, source):
    first = _build(compose_cfg, *source)
    assert first.provenance["cache"] == "miss" and len(_entries(data_cache)) == 1
    hit = _build(compose_cfg, *source)
    assert hit.provenance["cache"] == "hit"
    fresh = _build(compose_cfg, *source, "data.cache=false")
    assert fresh.provenance["cache"] == "off"
    assert_same_data(hit, fresh)
    assert_same_data(first, fresh)
    assert isinstance(hit.clients, PackedClients)


def test_a_changed_data_key_or_seed_misses(compose_cfg, data_cache):
    _build(compose_cfg, *SYNTHETIC)
    for change in (["data.num_features=7"], ["seed=1"], ["data.max_client_examples=60"]):
        assert _build(compose_cfg, *SYNTHETIC, *change).provenance["cache"] == "miss", change
    assert len(_entries(data_cache)) == 4
    # The model and training options are not part of the data: the same entry serves them.
    assert _build(compose_cfg, *SYNTHETIC, "model=mlp", "client.lr=0.5").provenance["cache"] == "hit"


def test_a_modified_source_file_misses_and_gives_its_new_data(compose_cfg, play):
    before = _build(compose_cfg)
    with open(play, "a") as f:
        f.write("\nSPEAKER Z:\n" + "A new speaker says a great many words here. " * 30 + "\n")
    after = _build(compose_cfg)
    assert after.provenance["cache"] == "miss"
    assert after.fingerprint["sha256"] != before.fingerprint["sha256"]
    assert_same_data(after, _build(compose_cfg, "data.cache=false"))


def test_a_source_touched_without_change_misses_too(compose_cfg, play):
    # Identity is path + size + mtime, not content: a touched file is rebuilt (same result).
    first = _build(compose_cfg)
    os.utime(play, ns=(play.stat().st_atime_ns, play.stat().st_mtime_ns + 10**9))
    again = _build(compose_cfg)
    assert again.provenance["cache"] == "miss"
    assert_same_data(first, again)


@pytest.mark.parametrize("damage", [b"not a torch file", b""], ids=["garbage", "empty"])
def test_a_corrupt_entry_is_rebuilt_with_a_warning(compose_cfg, data_cache, caplog, damage):
    fresh = _build(compose_cfg, *SYNTHETIC)
    (entry,) = _entries(data_cache)
    entry.write_bytes(damage)
    with caplog.at_level(logging.WARNING, logger="fedrun"):
        rebuilt = _build(compose_cfg, *SYNTHETIC)
    assert rebuilt.provenance["cache"] == "miss"
    assert any("unreadable" in r.getMessage() and "rebuilding" in r.getMessage() for r in caplog.records)
    assert_same_data(rebuilt, fresh)
    assert _build(compose_cfg, *SYNTHETIC).provenance["cache"] == "hit"  # and rewritten whole


def test_a_truncated_entry_is_rebuilt(compose_cfg, data_cache):
    fresh = _build(compose_cfg, *SYNTHETIC)
    (entry,) = _entries(data_cache)
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    rebuilt = _build(compose_cfg, *SYNTHETIC)
    assert rebuilt.provenance["cache"] == "miss"
    assert_same_data(rebuilt, fresh)


def test_an_entry_of_another_format_version_is_rebuilt(compose_cfg, data_cache, monkeypatch):
    _build(compose_cfg, *SYNTHETIC)
    (entry,) = _entries(data_cache)
    state = torch.load(entry, weights_only=True)
    torch.save(state | {"format": cache.FORMAT_VERSION + 1}, entry)
    assert _build(compose_cfg, *SYNTHETIC).provenance["cache"] == "miss"


def test_an_unwritable_cache_folder_warns_and_runs_on(compose_cfg, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("FEDRUN_CACHE", str(blocker / "cache"))  # a folder below a file: cannot exist
    with caplog.at_level(logging.WARNING, logger="fedrun"):
        data = _build(compose_cfg, *SYNTHETIC)
    assert data.provenance["cache"] == "miss" and data.num_clients == 15
    assert any("cannot write" in r.getMessage() for r in caplog.records)


def test_cache_off_writes_nothing(compose_cfg, data_cache):
    data = _build(compose_cfg, *SYNTHETIC, "data.cache=false")
    assert data.provenance == {"cache": "off"} and not list(data_cache.iterdir())


def test_canary_insertion_bypasses_the_cache(compose_cfg, data_cache):
    # Canaries change the data; the audit's own secrets are not in the key, so it is never cached.
    planted = []

    def insert(docs):
        planted.append(len(docs))
        return [(name, text + b" secret 12345 ") for name, text in docs]

    data = config.build_data(compose_cfg(), audit=SimpleNamespace(insert=insert))
    assert planted and data.provenance["cache"] == "off" and not list(data_cache.iterdir())
    plain = _build(compose_cfg)
    assert data.fingerprint["train_examples"] + data.fingerprint["test_examples"] >= (
        plain.fingerprint["train_examples"] + plain.fingerprint["test_examples"])


def test_writes_are_atomic_no_temporary_file_is_left(compose_cfg, data_cache):
    _build(compose_cfg, *SYNTHETIC)
    (entry,) = _entries(data_cache)  # and beside it only its description, <key>.json
    assert sorted(p.name for p in data_cache.iterdir()) == [entry.stem + ".json", entry.name]


def test_a_failed_write_leaves_no_entry_and_no_temporary_file(tmp_path, monkeypatch):
    data = FederatedData(PackedClients(Labelled(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long)),
                                       Labelled(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long)),
                                       train_offsets=np.array([0, 3]), test_offsets=np.array([0, 1]), names="c"),
                         {"source": "x"})

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError):
        cache.save(data, tmp_path / "entry.pt")
    assert list(tmp_path.iterdir()) == []


def test_key_covers_the_tokenizer_folder_and_source_folders(tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    spec = {"_target_": "fedrun.data.pystdlib.PyStdlib", "root": str(tmp_path / "src"), "seq_len": 8}
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("x = 1\n")
    base = cache.data_key(data=spec, seed=0, tokenizer=str(tok))
    assert base == cache.data_key(data=spec, seed=0, tokenizer=str(tok))
    assert base != cache.data_key(data=spec, seed=0, tokenizer=None)
    (tok / "tokenizer.json").write_text('{"changed": 1}')
    changed_tokenizer = cache.data_key(data=spec, seed=0, tokenizer=str(tok))
    assert changed_tokenizer != base
    (tmp_path / "src" / "b.py").write_text("y = 2\n")
    assert cache.data_key(data=spec, seed=0, tokenizer=str(tok)) != changed_tokenizer


def test_the_cache_folder_is_fedrun_cache_or_the_home_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDRUN_CACHE", str(tmp_path))
    assert cache.cache_dir() == tmp_path
    monkeypatch.delenv("FEDRUN_CACHE")
    assert cache.cache_dir() == Path("~/.cache/fedrun/data").expanduser()


def test_a_run_records_its_cache_use_and_startup(compose_cfg, tmp_path):
    from fedrun import train as training

    cfg = compose_cfg("rounds=1")
    _, summary = training.train(config.build(cfg))
    assert summary["startup"]["data_cache"] == "miss"
    cfg.run_dir = str(tmp_path / "second")
    _, summary = training.train(config.build(cfg))
    assert summary["startup"]["data_cache"] == "hit"


def test_instruction_data_round_trips_with_its_loss_mask(data_cache, tmp_path):
    import json

    rows = [{"user": f"u{i % 3}", "q": f"question {i}?", "a": f"answer {i}."} for i in range(30)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = ["data=table", f"data.path={tmp_path / 'rows.jsonl'}", "data.prompt_key=q", "data.response_key=a",
                 "data.client_key=user", "data.seq_len=32"]
    first = config.build_data(config.compose(overrides))
    hit = config.build_data(config.compose(overrides))
    assert first.provenance["cache"] == "miss" and hit.provenance["cache"] == "hit"
    assert hit.clients.train.mask is not None and hit.clients.train.mask.any()
    fresh = config.build_data(config.compose([*overrides, "data.cache=false"]))
    assert_same_data(hit, fresh)
    assert hit.source_rows is not None and fresh.source_rows is not None  # the rows behind each split, too
    for name, rows in vars(fresh.source_rows).items():
        assert np.array_equal(getattr(hit.source_rows, name), rows)
    assert sorted(fresh.source_rows.train.tolist() + fresh.source_rows.test.tolist()) == list(range(30))


def test_another_process_reloads_the_entry_memory_mapped_and_only_that_entry(compose_cfg, data_cache):
    """What a Ray actor does: the run's entry loaded again, mapped from the file (the machine's page
    cache holds it once), equal to a fresh build; anything else at that path is not taken for it."""
    built = _build(compose_cfg, *SYNTHETIC)
    entry = cache.entry_of(built)
    assert entry is not None and entry["path"] == str(_entries(data_cache)[0])
    reloaded = cache.reload(entry)
    assert reloaded is not None and reloaded.provenance["cache"] == "reloaded"
    assert_same_data(reloaded, _build(compose_cfg, *SYNTHETIC, "data.cache=false"))
    assert entry["path"] in Path("/proc/self/maps").read_text()  # mapped, not read into memory
    hit = _build(compose_cfg, *SYNTHETIC)
    assert cache.entry_of(hit) == entry  # a hit names the same entry
    assert cache.reload(entry | {"size": entry["size"] + 1}) is None
    assert cache.reload(entry | {"fingerprint": {**entry["fingerprint"], "seed": 1}}) is None
    assert cache.reload(entry | {"clients": entry["clients"] + 1}) is None
    Path(entry["path"]).unlink()
    assert cache.reload(entry) is None and cache.entry_of(hit) is None
    assert cache.entry_of(_build(compose_cfg, *SYNTHETIC, "data.cache=false")) is None
