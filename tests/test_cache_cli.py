"""`fedrun cache list|clear` and the FEDRUN_CACHE_MAX_GB cap: what they print, which entries they
remove (least recently used first, never the one just written, never one being written)."""
import logging
import os
import threading
import time

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fedrun import cache_entries, config
from fedrun.cli import app
from fedrun.core import FedrunError
from fedrun.data import cache
from fedrun.data.examples import FederatedData, Labelled, PackedClients

DAY = 86400


def fedrun(*args: str):
    return CliRunner().invoke(app, list(args))


def fake(rows: int, *, clients: int = 2) -> FederatedData:
    """Data of `rows` x 250 float32 features (about rows kB on disk), split among `clients`."""
    offsets = np.linspace(0, rows, clients + 1).astype(np.int64)
    features = torch.arange(rows * 250, dtype=torch.float32).reshape(rows, 250)
    train = Labelled(features, torch.zeros(rows, dtype=torch.long))
    test = Labelled(torch.zeros(clients, 250), torch.zeros(clients, dtype=torch.long))
    return FederatedData(PackedClients(train, test, train_offsets=offsets, test_offsets=np.arange(clients + 1),
                                       names=[f"c{k}" for k in range(clients)]), {"source": "fake"})


def write(key: str, rows: int, *, last_used: float | None = None) -> FederatedData:
    """An entry written through the cache (a miss), optionally made older."""
    data = cache.load_or_build(key, lambda: fake(rows), about={"source": "fake", "seed": 7})
    assert data.provenance["cache"] == "miss"
    if last_used is not None:
        os.utime(cache.cache_dir() / f"{key}.pt", (last_used, last_used))
    return data


def keys(folder) -> set[str]:
    return {p.stem for p in folder.glob("*.pt")}


def test_list_shows_each_entry_what_it_holds_its_size_and_last_use_then_a_total(data_cache):
    assert fedrun("cache", "list").output.strip() == f"0 entries, 0 B in {data_cache}"
    config.build_data(config.compose(["data=synthetic", "model=logreg", "data.num_clients=6", "seed=3"]))
    write("ab" * 32, 400, last_used=time.time() - 3 * DAY)
    old_style = data_cache / f"{'cd' * 32}.pt"  # an entry from before descriptions were recorded
    old_style.write_bytes(b"x" * 1500)
    os.utime(old_style, (time.time() - 120, time.time() - 120))
    result = fedrun("cache", "list")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == 4, result.output
    assert "synthetic, 6 clients, seed 3" in lines[0] and "used just now" in lines[0]  # most recent first
    assert lines[1].startswith("cdcdcdcdcdcd  (contents not recorded)") and "1.5 kB  used 2 min ago" in lines[1]
    assert lines[2].startswith("abababababab  fake, 2 clients, seed 7") and lines[2].endswith("used 3 d ago")
    total = sum(p.stat().st_size for p in data_cache.iterdir())
    assert lines[3] == f"3 entries, {cache_entries.size_text(total)} in {data_cache}"


def test_clear_removes_every_entry_and_prints_what_it_freed(data_cache):
    write("ab" * 32, 400)
    write("cd" * 32, 100)
    total = sum(p.stat().st_size for p in data_cache.iterdir())
    result = fedrun("cache", "clear")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert sorted(line[:20] for line in lines[:2]) == ["removed abababababab", "removed cdcdcdcdcdcd"]
    assert lines[2] == f"freed 2 entries, {cache_entries.size_text(total)} in {data_cache}"
    assert list(data_cache.iterdir()) == []
    assert fedrun("cache", "clear").output.strip() == f"freed 0 entries, 0 B in {data_cache}"


def test_clear_older_than_removes_only_entries_unused_for_that_long(data_cache):
    now = time.time()
    write("aa" * 32, 10, last_used=now - 10 * DAY)
    write("bb" * 32, 10, last_used=now - 2 * 3600)
    write("cc" * 32, 10)
    result = fedrun("cache", "clear", "--older-than", "7d")
    assert result.exit_code == 0 and result.output.startswith("removed aaaaaaaaaaaa"), result.output
    assert "freed 1 entry" in result.output and keys(data_cache) == {"bb" * 32, "cc" * 32}
    fedrun("cache", "clear", "--older-than", "30m")
    assert keys(data_cache) == {"cc" * 32}


def test_a_hit_counts_as_a_use(data_cache):
    write("aa" * 32, 10, last_used=time.time() - 10 * DAY)
    assert cache.load_or_build("aa" * 32, lambda: fake(1)).provenance["cache"] == "hit"
    fedrun("cache", "clear", "--older-than", "1d")
    assert keys(data_cache) == {"aa" * 32}


@pytest.mark.parametrize("text,seconds", [("7d", 7 * DAY), ("12h", 12 * 3600), ("30m", 1800), ("45s", 45),
                                          ("2w", 14 * DAY), ("1.5h", 5400), (" 3D ", 3 * DAY)])
def test_ages(text, seconds):
    assert cache_entries.parse_age(text) == seconds


@pytest.mark.parametrize("text", ["7x", "7", "d", "-1d", "1e3s", "7 days"])
def test_an_invalid_age_is_one_error_line_and_exit_2(data_cache, text):
    write("aa" * 32, 10, last_used=0)
    result = fedrun("cache", "clear", "--older-than", text)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --older-than:"), result.output
    assert "s, m, h, d or w" in lines[0] and "7d" in lines[0]
    assert keys(data_cache) == {"aa" * 32}  # nothing removed


def test_the_cap_evicts_least_recently_used_first_never_the_entry_just_written(data_cache, monkeypatch, caplog):
    now = time.time()
    write("aa" * 32, 400, last_used=now - 3 * DAY)
    write("bb" * 32, 400, last_used=now - 2 * DAY)
    write("cc" * 32, 400, last_used=now - 1 * DAY)
    cache.load_or_build("aa" * 32, lambda: fake(1))  # a hit: aa is now the most recently used
    size = max(e.size for e in cache_entries.entries())
    monkeypatch.setenv("FEDRUN_CACHE_MAX_GB", str(3.5 * size / cache_entries.GB))  # room for three
    with caplog.at_level(logging.INFO, logger="fedrun"):
        write("dd" * 32, 400)
    assert keys(data_cache) == {"aa" * 32, "cc" * 32, "dd" * 32}  # bb was the least recently used
    assert not (data_cache / f"{'bb' * 32}.json").exists()
    assert any("evicted bbbbbbbbbbbb" in r.getMessage() for r in caplog.records)
    assert sum(e.size for e in cache_entries.entries()) <= 3.5 * size
    # A cap the entry just written exceeds on its own: every other entry goes, it stays, with a warning.
    monkeypatch.setenv("FEDRUN_CACHE_MAX_GB", str(0.5 * size / cache_entries.GB))
    with caplog.at_level(logging.WARNING, logger="fedrun"):
        data = write("ee" * 32, 400)
    assert keys(data_cache) == {"ee" * 32} and data.num_clients == 2
    assert any("eeeeeeeeeeee" in r.getMessage() and "kept it" in r.getMessage() for r in caplog.records)


def test_no_cap_keeps_everything(data_cache, monkeypatch):
    monkeypatch.delenv("FEDRUN_CACHE_MAX_GB", raising=False)
    for key in ("aa", "bb", "cc"):
        write(key * 32, 100)
    assert len(keys(data_cache)) == 3


@pytest.mark.parametrize("value", ["abc", "-1", "nan", "inf"])
def test_an_invalid_cap_fails_before_building(data_cache, monkeypatch, value):
    monkeypatch.setenv("FEDRUN_CACHE_MAX_GB", value)
    built = []
    with pytest.raises(FedrunError, match="FEDRUN_CACHE_MAX_GB: .* gigabytes"):
        cache.load_or_build("aa" * 32, lambda: built.append(1) or fake(1))
    assert built == []


def test_clear_waits_for_a_write_in_progress_and_never_removes_its_temporary_file(data_cache):
    # A writer holds the folder's shared lock from its temporary file to the rename (cache.save).
    removed: list = []
    tmp = data_cache / f".{'aa' * 32}.partial.tmp"
    with cache_entries.locked(data_cache, exclusive=False):
        tmp.write_bytes(b"half an entry")
        clearing = threading.Thread(target=lambda: removed.extend(cache_entries.clear()))
        clearing.start()
        clearing.join(0.5)
        assert clearing.is_alive() and tmp.exists()  # waiting, the file untouched
        os.replace(tmp, data_cache / f"{'aa' * 32}.pt")  # the write completes
    clearing.join(10)
    assert [e.key for e in removed] == ["aa" * 32] and not removed[0].unfinished  # a whole entry, removed whole


def test_clear_removes_what_a_stopped_writer_left(data_cache):
    write("aa" * 32, 10)
    (data_cache / f".{'bb' * 32}.x1.tmp").write_bytes(b"killed mid-write")
    (data_cache / f"{'cc' * 32}.json").write_text("{}")  # a description whose data is gone
    result = fedrun("cache", "clear")
    assert "(left by a stopped write)" in result.output and "freed 1 entry and 2 left-over files" in result.output
    assert list(data_cache.iterdir()) == []


def test_a_run_that_loaded_an_entry_keeps_reading_it_after_clear(data_cache):
    expected = write("aa" * 32, 50)
    hit = cache.load_or_build("aa" * 32, lambda: fake(1))  # memory-mapped from the file
    assert hit.provenance["cache"] == "hit"
    cache_entries.clear()
    assert keys(data_cache) == set()
    assert torch.equal(hit.clients.train.features, expected.clients.train.features)
    assert cache.load_or_build("aa" * 32, lambda: fake(50)).provenance["cache"] == "miss"  # and it rebuilds
