import dataclasses
import math
import random
import re

import numpy as np
import pytest
import torch
from torch import nn

from fedrun.core import FedrunError
from fedrun.data.text import split_by_position, windows
from fedrun.models.tiny_gpt import TinyGPT
from fedrun.privacy import audit

CPU = torch.device("cpu")
WORDS = "the and of to my thou that is in not with me it for be his your this but he have".split()


def _text(lines: int, seed: int) -> bytes:
    rng = random.Random(seed)
    return "".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))) + "\n"
                   for _ in range(lines)).encode()


def _train_text(text: bytes, seq_len: int, test_fraction: float) -> tuple[bytes, bytes]:
    """The bytes covered by the train and by the test windows (windows overlap by one byte)."""
    train, test = split_by_position(windows(text, seq_len), test_fraction)

    def join(w):
        return bytes(w[0].tolist()) + b"".join(bytes(r[1:].tolist()) for r in w[1:]) if len(w) else b""

    return join(train), join(test)


class FixedLogits(nn.Module):
    """The same logits at every position, whatever the input."""

    def __init__(self, logits: torch.Tensor, seq_len: int = 64):
        super().__init__()
        self.seq_len, self.logits = seq_len, logits

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(*idx.shape, 256)


class Bigram(nn.Module):
    """Logits of the next byte given only the current one: a row of a (256, 256) table."""

    def __init__(self, table: torch.Tensor, seq_len: int = 64):
        super().__init__()
        self.seq_len, self.table = seq_len, table

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.table[idx]  # (B, T, 256)


class Recites(nn.Module):
    """Favours, at position t, byte t + 1 of one text: that text alone gets the top probability."""

    def __init__(self, text: bytes, seq_len: int = 64):
        super().__init__()
        self.seq_len, self.text = seq_len, text

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*idx.shape, 256)
        for t in range(min(idx.shape[1], len(self.text) - 1)):
            logits[:, t, self.text[t + 1]] = 5.0
        return logits


# (1) format, distinctness, reproducibility


def test_canaries_have_the_format_are_distinct_and_reproducible():
    c = audit.make_canaries(num_canaries=5, num_references=2000, seed=3)
    fmt = re.compile(rb"my secret code is \d{9}\n")
    assert all(fmt.fullmatch(s) for s in c.secrets + c.references)
    assert len(set(c.secrets + c.references)) == 2005
    assert c == audit.make_canaries(num_canaries=5, num_references=2000, seed=3)
    assert c.secrets != audit.make_canaries(num_canaries=5, num_references=2000, seed=4).secrets
    # Uniform over the randomness space: every digit near 10% of the random digits.
    digits = np.frombuffer(b"".join(s[len(c.prefix) : -1] for s in c.references), dtype=np.uint8) - ord("0")
    assert np.allclose(np.bincount(digits, minlength=10) / len(digits), 0.1, atol=0.01)


def test_canary_format_options_and_a_space_too_small():
    c = audit.make_canaries(num_canaries=2, num_references=8, seed=0, prefix=b"pin: ", secret_digits=1)
    assert sorted(c.secrets + c.references) == [b"pin: %d\n" % d for d in range(10)]
    with pytest.raises(FedrunError, match="exceed"):
        audit.make_canaries(num_canaries=2, num_references=9, seed=0, secret_digits=1)
    with pytest.raises(ValueError):
        audit.Canaries([b"a\n"], [b"a\n"], b"", 1, b"\n")


# (2) insertion into the training part


def test_insertion_puts_each_canary_repeats_times_in_the_train_windows_of_its_client():
    docs = [(f"c{i}", _text(40 + 30 * i, seed=i)) for i in range(6)]
    docs[2] = ("short", b"too short\n")
    c = audit.make_canaries(num_canaries=4, num_references=10, seed=0)
    new, held = audit.insert_canaries(docs, c, clients=None, repeats=5, seed=1)
    assert len(set(held)) == 4 and 2 not in held  # distinct clients, all with enough text
    assert (new, held) == audit.insert_canaries(docs, c, clients=None, repeats=5, seed=1)
    for i, ((name, text), (new_name, new_text)) in enumerate(zip(docs, new)):
        assert new_name == name
        mine = [s for s, h in zip(c.secrets, held) if h == i]
        if not mine:
            assert new_text == text
            continue
        train, test = _train_text(new_text, seq_len=16, test_fraction=0.2)
        for s in c.secrets:
            assert train.count(s) == (5 if s in mine else 0) and s not in test
            assert new_text.count(b"\n" + s) == new_text.count(s)  # each copy starts a line
        removed = new_text
        for s in mine:
            removed = removed.replace(s, b"")
        assert removed == text


def test_insertion_into_given_clients_and_errors():
    docs = [(f"c{i}", _text(60, seed=i)) for i in range(3)]
    c = audit.make_canaries(num_canaries=2, num_references=3, seed=0)
    new, held = audit.insert_canaries(docs, c, clients=[1, 1], repeats=3, seed=0)
    assert held == [1, 1] and new[0] == docs[0] and new[2] == docs[2]
    train, _ = _train_text(new[1][1], seq_len=32, test_fraction=0.2)
    assert [train.count(s) for s in c.secrets] == [3, 3]
    with pytest.raises(FedrunError, match="cannot hold"):
        audit.insert_canaries(docs, c, clients=[0, 1], repeats=100, seed=0)
    with pytest.raises(FedrunError, match="clients"):
        audit.insert_canaries(docs, c, clients=[0], repeats=1, seed=0)


# (3) log-perplexity against hand and numpy computations


def test_log_perplexity_of_fixed_logits_by_hand():
    logits = torch.zeros(256)
    logits[ord("a")] = math.log(3.0)  # Pr(a) = 3/258, any other byte 1/258
    model = FixedLogits(logits)
    got = audit.log_perplexity(model, [b"aab", b"b"], device=CPU)
    # Without context the first byte is not scored: "a" then "b"; a lone byte scores 0.
    assert got.tolist() == pytest.approx([-math.log2(3 / 258) - math.log2(1 / 258), 0.0])
    got = audit.log_perplexity(model, [b"aab"], context=b"zz", device=CPU)
    assert got.item() == pytest.approx(-2 * math.log2(3 / 258) - math.log2(1 / 258))


def test_log_perplexity_of_a_bigram_model_matches_numpy(monkeypatch):
    monkeypatch.setattr(audit, "SCORE_BATCH", 2)  # several batches, padded rows of unequal length
    table = torch.randn(256, 256, generator=torch.Generator().manual_seed(0)) * 3
    logp = table.double().log_softmax(-1).numpy() / math.log(2)
    seqs = [b"my secret code is 123\n", b"xy", b"\x00\xff" * 9, b"hello"]
    for context in (b"", b"\n", b"abc"):
        expected = []
        for s in seqs:
            full = context + s
            start = max(len(context), 1)
            expected.append(-sum(logp[full[i - 1], full[i]] for i in range(start, len(full))))
        got = audit.log_perplexity(Bigram(table), seqs, context=context, device=CPU)
        assert got.dtype == torch.float64
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9)


def test_log_perplexity_refuses_sequences_longer_than_the_model():
    model = FixedLogits(torch.zeros(256), seq_len=8)
    assert audit.log_perplexity(model, [b"123456789"], device=CPU).shape == (1,)  # 8 inputs
    with pytest.raises(FedrunError, match="seq_len"):
        audit.log_perplexity(model, [b"123456789"], context=b"\n", device=CPU)


# (4) exposure and its ranks


def test_exposure_from_scores_matches_average_ranks():
    stats = pytest.importorskip("scipy.stats", reason="scipy (installed with opacus) is the rank oracle")
    rng = np.random.default_rng(0)
    refs = rng.integers(0, 20, size=50).astype(float)  # many ties
    canaries = np.array([-1.0, 0.0, 7.0, 19.0, 25.0])
    got = audit.exposure_from_scores(canaries, refs)
    for c, e in zip(canaries, got):
        rank = stats.rankdata(np.concatenate([[c], refs]), method="average")[0]
        assert e == pytest.approx(math.log2(51) - math.log2(rank))
    assert got[0] == pytest.approx(math.log2(51)) and got[-1] == 0.0


def test_exposure_is_maximal_for_a_recited_canary_and_about_one_bit_for_an_indifferent_model():
    c = audit.make_canaries(num_canaries=3, num_references=500, seed=0)
    top = audit.max_exposure(c)
    assert top == pytest.approx(math.log2(501))
    for i, secret in enumerate(c.secrets):
        assert audit.exposure(Recites(b"\n" + secret), c, device=CPU)[i] == pytest.approx(top)
    uniform = audit.exposure(FixedLogits(torch.zeros(256)), c, device=CPU)
    assert uniform == pytest.approx([math.log2(501) - math.log2(1 + 500 / 2)] * 3)  # all tie: ~1 bit


# (5) a real model memorises a canary it saw many times



def test_tiny_gpt_exposes_an_inserted_canary_but_not_the_others(one_thread):
    c = audit.make_canaries(num_canaries=4, num_references=1000, seed=0)
    inserted = dataclasses.replace(c, secrets=c.secrets[:1])
    docs, _ = audit.insert_canaries([("a", _text(200, seed=0))], inserted, clients=None, repeats=10, seed=0)
    train, _ = split_by_position(windows(docs[0][1], 32), 0.2)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = TinyGPT(vocab_size=256, seq_len=32, n_layer=1, n_head=2, n_embd=32, dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        x = train[torch.randint(len(train), (32,), generator=g)].long()
        loss = nn.functional.cross_entropy(model(x[:, :-1]).reshape(-1, 256), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    exposures = audit.exposure(model, c, device=CPU)
    assert exposures[0] > 0.8 * audit.max_exposure(c)
    assert max(exposures[1:]) < 0.5 * audit.max_exposure(c)


@pytest.mark.parametrize("key, value, message", [
    ("num_canaries", 0, "audit.num_canaries: 0 is not allowed; allowed: an integer >= 1"),
    ("repeats", 0, "audit.repeats: 0 is not allowed; allowed: an integer >= 1"),
    ("num_references", 0, "audit.num_references: 0 is not allowed; allowed: an integer >= 1"),
    ("secret_digits", 19, "audit.secret_digits: 19 is not allowed; allowed: an integer in [1, 18]"),
])
def test_out_of_range_keys_are_refused_by_the_signature(key, value, message):
    from omegaconf import OmegaConf

    from fedrun.components import check_values

    node = OmegaConf.create({"num_canaries": 10, "repeats": 10, "num_references": 1000, "secret_digits": 9, key: value})
    with pytest.raises(FedrunError) as e:
        check_values(node, audit.CanaryAudit, "audit", "audit")
    assert str(e.value) == message
