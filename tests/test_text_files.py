"""data=text_files (docs/extending.md's worked data source): one client per file of a folder."""
import pytest
import torch

from fedrun import config, train
from fedrun.core import FedrunError

SMALL = ["data=text_files", "data.seq_len=8", "data.min_samples=2", "data.cache=false", "model.n_layer=1",
         "model.n_head=2", "model.n_embd=16", "sampler.clients_per_round=2", "client.local_steps=2", "rounds=2",
         "device=cpu"]


@pytest.fixture
def folder(tmp_path):
    users = tmp_path / "users"
    (users / "nested").mkdir(parents=True)
    for name, text in {"ann.txt": "ann writes about her garden " * 4, "bob.txt": "bob keeps a log of his runs " * 5,
                       "cy.txt": "cy drafts letters to friends " * 6, "skip.md": "not a .txt file " * 9,
                       "nested/dee.txt": "dee lives in a subfolder " * 7}.items():
        (users / name).write_text(text)
    return users


def test_one_client_per_matching_file_with_its_own_bytes(folder, tmp_path):
    data = config.build_data(config.compose([*SMALL, f"data.path={folder}", f"run_dir={tmp_path / 'run'}"]))
    assert data.num_clients == 3  # ann, bob, cy: *.txt at the top level only
    texts = []
    for client in data.clients:
        tokens = torch.cat([client.train.tokens.flatten(), client.test.tokens.flatten()])
        texts.append(bytes(tokens.tolist()))
    assert any(b"garden" in t for t in texts) and any(b"runs" in t for t in texts)
    assert not any(b"subfolder" in t for t in texts)
    recursive = config.build_data(config.compose([*SMALL, f"data.path={folder}", "data.pattern=**/*.txt"]))
    assert recursive.num_clients == 4


def test_it_trains_end_to_end(folder, tmp_path):
    cfg = config.compose([*SMALL, f"data.path={folder}", f"run_dir={tmp_path / 'run'}"])
    _, summary = train.train(config.build(cfg))
    assert summary["final"]["eval_ppl"] > 1


@pytest.mark.parametrize("overrides, message", [
    (["data.path=/no/such/folder"], "data.path: directory not found: /no/such/folder"),
    (["data.pattern=*.csv"], "data.pattern: no file under"),
])
def test_bad_paths_are_one_line(folder, overrides, message):
    with pytest.raises(FedrunError) as e:
        config.build_data(config.compose([*SMALL, f"data.path={folder}", *overrides]))
    assert str(e.value).startswith(message)
