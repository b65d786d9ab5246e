"""Real text split into federated clients, as byte-level next-token windows.

Tokens are raw bytes (vocabulary 256: no tokenizer to download). A client's text is cut
into windows of `seq_len + 1` bytes with stride `seq_len`, so every byte after the first
is a prediction target exactly once; the first windows (by position) are the client's
training data and the last ones its test data, as in LEAF's Shakespeare benchmark
(Caldas et al. 2018, "LEAF: A Benchmark for Federated Settings").
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, cast

import torch

from fedrun.components import OneOf, Range
from fedrun.core import FedrunError, Stream, numpy_rng
from fedrun.data import partition as partitioners
from fedrun.data.examples import ClientData, FederatedData, PackedClients, Windows, pack, pack_parts

VOCAB_SIZE = 256
PARTITIONS = ("natural", "iid")
TEST_FRACTION = Range(gt=0, lt=1, words="a number in (0, 1): eval_loss, eval_ppl and eval_acc are measured on "
                      "the held-out test examples")
Documents = list[tuple[str, bytes]]  # (natural client's name, its text)


def windows(text: bytes, seq_len: int, *, encode: Callable[[bytes], list[int]] | None = None) -> torch.Tensor:
    """(N, seq_len + 1) windows overlapping by one token, N = (len - 1) // seq_len: bytes (uint8),
    or the ids of `encode` (a model's tokenizer, int32)."""
    if encode is None:
        tokens = torch.frombuffer(bytearray(text), dtype=torch.uint8) if text else torch.empty(0, dtype=torch.uint8)
    else:
        tokens = torch.tensor(encode(text), dtype=torch.int32)
    if len(tokens) < seq_len + 1:
        return torch.empty(0, seq_len + 1, dtype=tokens.dtype)
    return tokens.unfold(0, seq_len + 1, seq_len).clone()


def num_test(n: int, test_fraction: float) -> int:
    """How many of n examples a client holds out: `test_fraction`, at least one when n >= 2,
    never all of them."""
    return 0 if test_fraction == 0 or n < 2 else min(n - 1, max(1, int(n * test_fraction)))


def split_by_position(w: torch.Tensor, test_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """First windows train, last `test_fraction` test (at least one each when possible)."""
    n_test = num_test(len(w), test_fraction)
    return w[: len(w) - n_test], w[len(w) - n_test :]


def federate(
    docs: Documents,
    *,
    source: dict,
    seq_len: int,
    test_fraction: float,
    min_samples: int,
    partition: str,
    num_clients: int | None,
    max_client_bytes: int | None,
    seed: int,
    insert: Callable[[Documents], Documents] | None = None,
    tokenizer: Tokenizer | None = None,
) -> FederatedData:
    """Window each document, keep those with >= min_samples windows, split and partition.

    `insert` (the canary audit) edits the truncated documents before they are windowed."""
    docs = [(name, text[:max_client_bytes] if max_client_bytes else text) for name, text in docs]
    if insert is not None:
        docs = insert(docs)
    kept = []
    for name, text in docs:
        w = windows(text, seq_len, encode=tokenizer.encode if tokenizer else None)
        if len(w) >= min_samples:
            train, test = split_by_position(w, test_fraction)
            kept.append(ClientData(name, Windows(train), Windows(test)))
    if not kept:
        raise FedrunError(f"data.min_samples: no client has {min_samples} windows of {seq_len + 1} bytes; lower it")
    if partition == "iid":
        clients = _iid(pack(kept), num_clients or len(kept), seed)
    elif partition == "natural":
        clients = pack(kept)
    else:
        raise FedrunError(f"data.partition: unknown partition '{partition}'; allowed: {', '.join(PARTITIONS)}")
    fingerprint = {
        **source,
        "partition": partition,
        "seq_len": seq_len,
        "clients": len(clients),
        "train_examples": len(clients.train),
        "test_examples": len(clients.test),
        "tokens": tokenizer.name if tokenizer else "bytes",
    }
    vocab_size = tokenizer.vocab_size if tokenizer else VOCAB_SIZE
    return FederatedData(clients, fingerprint, model_dims={"vocab_size": vocab_size, "seq_len": seq_len})


def _iid(natural: PackedClients, num_clients: int, seed: int) -> PackedClients:
    """The same train and test windows, shuffled evenly over `num_clients` clients."""
    train, test = natural.train, natural.test
    if num_clients > len(train):
        raise FedrunError(f"data.num_clients: {num_clients} is more than the {len(train)} training windows")
    rng = numpy_rng(seed, Stream.PARTITION)
    train_parts = partitioners.iid(len(train), num_clients, rng)
    test_parts = partitioners.iid(len(test), num_clients, rng)
    return pack_parts(train, train_parts, test, test_parts, names="iid_")


class TextSource:
    """A text data source: one document per natural client (`documents`, the subclass's part),
    cut into windows, split by position and partitioned. Its keys, shared by every text source,
    are conf/base/text.yaml's."""

    data_kind = "text"

    def __init__(self, *, seq_len: Annotated[int, Range(ge=1)], test_fraction: Annotated[float, TEST_FRACTION],
                 min_samples: Annotated[int, Range(ge=1)], partition: Annotated[str, OneOf(*PARTITIONS)],
                 num_clients: Annotated[int, Range(ge=1)] | None, max_client_bytes: Annotated[int, Range(ge=2)] | None):
        self.seq_len, self.test_fraction, self.min_samples = seq_len, test_fraction, min_samples
        self.partition, self.num_clients, self.max_client_bytes = partition, num_clients, max_client_bytes

    def documents(self) -> tuple[Documents, dict[str, Any]]:
        """The natural clients' texts, and what identifies them in the data's fingerprint."""
        raise NotImplementedError

    def implicit_sources(self) -> list[dict[str, Any]]:
        """Identities of what it reads that no key names as a path (the data cache keys on them)."""
        return []

    def load(self, *, seed: int, insert: Callable[[Documents], Documents] | None = None,
             tokenizer: Tokenizer | None = None) -> FederatedData:
        """The federated data; `insert` (the canary audit) edits the documents, `tokenizer` (a
        model's own) replaces bytes by its token ids."""
        docs, source = self.documents()
        return federate(docs, source=source, seed=seed, seq_len=self.seq_len, test_fraction=self.test_fraction,
                        min_samples=self.min_samples, partition=self.partition, num_clients=self.num_clients,
                        max_client_bytes=self.max_client_bytes, insert=insert, tokenizer=tokenizer)


class Tokenizer:
    """A model's own tokenizer (Hugging Face), read from a local checkpoint directory."""

    def __init__(self, path: str):
        from fedrun.models.hf import _offline

        _offline()
        from transformers import AutoTokenizer  # the [llm] extra

        self.name = str(path)
        self._tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.vocab_size = len(self._tokenizer)

    def encode(self, text: bytes) -> list[int]:
        return self._tokenizer(text.decode("utf-8", "replace"), add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> bytes:
        return str(self._tokenizer.decode(ids)).encode()

    @property
    def chat_template(self) -> str | None:
        template = getattr(self._tokenizer, "chat_template", None)
        return template if isinstance(template, str) else None  # a dict of named templates: not used

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    @property
    def special_ids(self) -> set[int]:
        """The ids of special and added tokens (EOS, <|im_end|>, ...): never text."""
        added = self._tokenizer.added_tokens_decoder  # {id: AddedToken}
        return {int(i) for i in self._tokenizer.all_special_ids} | {int(i) for i in added}

    def chat_ids(self, messages: list[dict[str, str]], *, generation_prompt: bool) -> list[int]:
        """The ids of a chat ([{role, content}, ...]) by the tokenizer's chat template, as
        `apply_chat_template(messages, tokenize=True)` gives them."""
        ids = self._tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt,
                                                  return_dict=False)
        return [int(i) for i in cast(list[int], ids)]  # one chat, tokenized, no dict: its ids

    @property
    def eos_id(self) -> int:
        """The token that ends a response (instruction examples)."""
        eos = self._tokenizer.eos_token_id
        if eos is None:
            raise FedrunError(f"model.name_or_path: the tokenizer of {self.name} has no EOS token, which ends "
                              "each response of instruction data")
        return int(eos)


def has_tokenizer(path: str) -> bool:
    return any((Path(path) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))
