"""Privacy audit with canaries: how much a byte-level language model memorised inserted secrets.

The Secret Sharer (Carlini et al. 2019, "The Secret Sharer: Evaluating and Testing Unintended
Memorization in Neural Networks"): random secrets of a fixed format ("canaries") are inserted
into some clients' training text; after training, each canary's log-perplexity is ranked among
other random fillings of the same format that the model never saw (the references).

- Log-perplexity (Definition 1) is in bits: Px(s) = -log2 Pr(s), summed over the bytes of the
  full canary text (prefix, secret digits and the closing newline), each given the bytes before
  it. A canary is inserted right after a newline, so it is scored after the context b"\\n".
- Exposure is the sampled estimate of Definition 4 (their §4), with the canary and the |R|
  references as the candidate set:

      exposure = log2(|R| + 1) - log2(rank),   rank in [1, |R| + 1]

  rank 1 = lowest log-perplexity. Ties count half ("mid-rank"):
  rank = 1 + #{r : Px(r) < Px(c)} + #{r : Px(r) == Px(c)} / 2.
  Maximum log2(|R| + 1) (the canary beats every reference), minimum 0 (every reference beats
  it). A model indifferent to the digits ties everything: rank = 1 + |R|/2, exposure ~ 1 bit,
  about the ~1.44 bits expected of a canary the model never saw. Unlike the paper's fitted
  skew-normal extrapolation, this estimate cannot exceed log2(|R| + 1): use more references to
  resolve higher exposures.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedrun.components import Range
from fedrun.core import FedrunError, Stream, numpy_rng

LINE_START = b"\n"  # canaries are inserted right after this byte, and scored after it
SCORE_BATCH = 512  # sequences per forward pass
# Keys of the audit's random streams (under Stream.PARTITION: they place data, like a partition).
_AUDIT = 0xA0D17
_SECRETS, _CLIENTS, _POSITIONS = 0, 1, 2
AtLeastOne = Annotated[int, Range(ge=1)]


@dataclass(frozen=True)
class Canaries:
    """Secrets inserted into training text, and references of the same format never inserted."""

    secrets: list[bytes]
    references: list[bytes]
    prefix: bytes
    secret_digits: int
    suffix: bytes

    def __post_init__(self):
        if set(self.secrets) & set(self.references):
            raise ValueError("a reference equals a canary")


def fill(number: int, *, prefix: bytes, secret_digits: int, suffix: bytes) -> bytes:
    """The format's filling for `number` in [0, 10**secret_digits)."""
    return prefix + f"{number:0{secret_digits}d}".encode() + suffix


def make_canaries(
    *,
    num_canaries: int,
    num_references: int,
    seed: int,
    prefix: bytes = b"my secret code is ",
    secret_digits: int = 9,
    suffix: bytes = b"\n",
) -> Canaries:
    """Distinct fillings drawn uniformly without replacement: canaries first, then references."""
    space = 10**secret_digits
    if num_canaries + num_references > space:
        raise FedrunError(f"audit: {num_canaries} canaries + {num_references} references exceed the "
                          f"{space} fillings of {secret_digits} digits")
    if not suffix.endswith(LINE_START):
        raise FedrunError(f"audit.suffix: must end with {LINE_START!r} so that the text after a canary "
                          "still starts a line")
    rng = numpy_rng(seed, Stream.PARTITION, _AUDIT, _SECRETS)
    numbers = rng.choice(space, size=num_canaries + num_references, replace=False)
    texts = [fill(int(n), prefix=prefix, secret_digits=secret_digits, suffix=suffix) for n in numbers]
    return Canaries(texts[:num_canaries], texts[num_canaries:], prefix, secret_digits, suffix)


def insert_canaries(
    docs: list[tuple[str, bytes]],
    canaries: Canaries,
    *,
    clients: list[int] | None,
    repeats: int,
    seed: int,
) -> tuple[list[tuple[str, bytes]], list[int]]:
    """Insert each canary `repeats` times into one client's text; the client index per canary.

    `clients[i]` holds canary i; by default clients are drawn with the seed among those with
    enough text, distinct while there are enough of them. Copies go right after randomly chosen
    newlines, early enough that every copy ends in the first half of the new text: fedrun's
    split by position then keeps them in training windows whenever test_fraction < 0.5 and the
    text spans a few windows. Insert after any truncation (data.max_client_bytes) of the text.
    """
    sizes = {len(s) for s in canaries.secrets}
    if len(sizes) > 1:
        raise ValueError("canaries of one format have one length")
    size = sizes.pop() if sizes else 0
    if clients is None:
        clients = _choose_clients(docs, len(canaries.secrets), repeats * size, repeats, seed)
    elif len(clients) != len(canaries.secrets):
        raise FedrunError(f"audit.clients: {len(clients)} clients given for {len(canaries.secrets)} canaries")
    if any(not 0 <= c < len(docs) for c in clients):
        raise FedrunError(f"audit.clients: indices must be in [0, {len(docs)})")
    out = list(docs)
    for client in sorted(set(clients)):
        name, text = docs[client]
        held = [s for s, c in zip(canaries.secrets, clients) if c == client for _ in range(repeats)]
        out[client] = (name, _insert(text, held, numpy_rng(seed, Stream.PARTITION, _AUDIT, _POSITIONS, client)))
    return out, list(clients)


def _slots(text: bytes, inserted: int) -> np.ndarray:
    """Positions right after a newline from which `inserted` more bytes still end in the first half."""
    after_newline = np.flatnonzero(np.frombuffer(text, dtype=np.uint8) == LINE_START[0]) + 1
    return after_newline[after_newline <= (len(text) - inserted) // 2]


def _choose_clients(docs: list[tuple[str, bytes]], num_canaries: int, inserted: int, repeats: int,
                    seed: int) -> list[int]:
    eligible = [i for i, (_, text) in enumerate(docs) if len(_slots(text, inserted)) >= repeats]
    if num_canaries and not eligible:
        raise FedrunError(f"audit: no client has {repeats} line starts in the first half of its text "
                          f"to hold {repeats} copies of a canary; lower audit.repeats")
    order = numpy_rng(seed, Stream.PARTITION, _AUDIT, _CLIENTS).permutation(eligible)
    return [int(order[i % len(order)]) for i in range(num_canaries)]


def _insert(text: bytes, held: list[bytes], rng: np.random.Generator) -> bytes:
    """`held` inserted at distinct random line starts, each in the first half of the new text."""
    slots = _slots(text, sum(map(len, held)))
    if len(slots) < len(held):
        raise FedrunError(f"audit: a client with {len(text)} bytes and {len(slots)} usable line starts "
                          f"cannot hold {len(held)} canary copies; lower audit.repeats or use more clients")
    positions = rng.choice(slots, size=len(held), replace=False)  # random order pairs copy and slot
    pieces, start = [], 0
    for pos, secret in sorted(zip(positions.tolist(), held)):
        pieces += [text[start:pos], secret]
        start = pos
    return b"".join(pieces) + text[start:]


@torch.inference_mode()
def log_perplexity(model: nn.Module, sequences: list[bytes], *, context: bytes = b"",
                   device: torch.device) -> torch.Tensor:
    """(N,) float64: -log2 Pr of each sequence's bytes given `context` and the bytes before them.

    Without context the first byte has nothing to be predicted from and is not scored.
    """
    longest = max((len(s) for s in sequences), default=0)
    seq_len = cast(int, model.seq_len)  # every text model (tiny_gpt, lstm, hf) keeps its own
    if len(context) + longest - 1 > seq_len:
        raise FedrunError(f"audit: context + canary of {len(context) + longest} bytes do not fit the "
                          f"model's seq_len {seq_len} + 1")
    was_training = model.training
    model.eval()
    scores = [_score_batch(model, sequences[i : i + SCORE_BATCH], context, device)
              for i in range(0, len(sequences), SCORE_BATCH)]
    model.train(was_training)
    return torch.cat(scores).cpu() if scores else torch.zeros(0, dtype=torch.float64)


def _score_batch(model: nn.Module, batch: list[bytes], context: bytes, device: torch.device) -> torch.Tensor:
    full = [context + s for s in batch]
    width = max(len(f) for f in full)
    tokens = torch.zeros(len(full), width, dtype=torch.long)  # right-padded: causal, so harmless
    scored = torch.zeros(len(full), width, dtype=torch.bool)
    for row, f in enumerate(full):
        tokens[row, : len(f)] = torch.tensor(list(f))
        scored[row, max(len(context), 1) : len(f)] = True
    tokens, scored = tokens.to(device), scored.to(device)
    logits = model(tokens[:, :-1])  # (B, W - 1, 256)
    nll = F.cross_entropy(logits.transpose(1, 2).double(), tokens[:, 1:], reduction="none")  # (B, W - 1)
    return (nll * scored[:, 1:]).sum(1) / math.log(2)


def exposure_from_scores(canary_scores: np.ndarray, reference_scores: np.ndarray) -> np.ndarray:
    """log2(|R| + 1) - log2(mid-rank) of each canary among itself and the references."""
    c = np.asarray(canary_scores, dtype=np.float64)[:, None]
    r = np.asarray(reference_scores, dtype=np.float64)[None, :]
    rank = 1 + (r < c).sum(1) + 0.5 * (r == c).sum(1)
    return math.log2(r.shape[1] + 1) - np.log2(rank)


def max_exposure(canaries: Canaries) -> float:
    """Exposure of a canary ranked first: log2(|R| + 1)."""
    return math.log2(len(canaries.references) + 1)


def exposure(model: nn.Module, canaries: Canaries, *, device: torch.device) -> list[float]:
    """Exposure in bits of each canary, in [0, log2(|R| + 1)]; see the module docstring."""
    if not canaries.references:
        raise FedrunError("audit.num_references: exposure needs at least one reference")
    secrets = log_perplexity(model, canaries.secrets, context=LINE_START, device=device)
    references = log_perplexity(model, canaries.references, context=LINE_START, device=device)
    return exposure_from_scores(secrets.numpy(), references.numpy()).tolist()


class CanaryAudit:
    """`audit=canaries`: secrets planted in chosen clients' training text, measured after training."""

    plants_secrets = True  # text canaries go into clients' data (which must then be byte-level text)
    inserts_clients = False  # audit=epsilon's canary clients join the population

    def __init__(self, *, num_canaries: AtLeastOne, repeats: AtLeastOne, num_references: AtLeastOne,
                 secret_digits: Annotated[int, Range(ge=1, le=18)], seed: int):
        self.canaries = make_canaries(num_canaries=num_canaries, num_references=num_references, seed=seed,
                                      secret_digits=secret_digits)
        self.repeats, self.seed = repeats, seed
        self.holders: list[int] = []

    def insert(self, docs: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        docs, self.holders = insert_canaries(docs, self.canaries, clients=None, repeats=self.repeats, seed=self.seed)
        return docs

    @property
    def metric_columns(self) -> list[str]:
        return ["canary_exposure"] if self.plants_secrets else []

    def measure(self, model: nn.Module, device: torch.device) -> dict:
        values = exposure(model, self.canaries, device=device)
        return {"canary_exposure": float(np.mean(values)), "exposures": values,
                "max_exposure": max_exposure(self.canaries)}

    def summary(self, model: nn.Module, device: torch.device) -> dict:
        return self.measure(model, device) | {"canaries": [c.decode() for c in self.canaries.secrets],
                                              "holders": self.holders, "repeats": self.repeats,
                                              "references": len(self.canaries.references)}


class NoAudit:
    """`audit=none`: no secrets planted, nothing measured (the run builds no audit for it)."""

    is_noop = True
