"""`data=table`: the user's own rows, from a .jsonl, .json, .csv or .parquet file (or a folder of
them), federated by a user column or by a partitioner over rows.

A row is one of (the keys name the columns):
- plain text (`text_key`): each client's texts, joined, are cut into windows as the built-in
  text sources are (language modelling);
- an instruction (`prompt_key` + `response_key`, optional `system_key`) or a chat
  (`messages_key`: a list of {role, content}; the last assistant turn is the response): one
  example per row, the loss on the response's tokens only (fedrun/data/instructions.py).

Who holds a row: `client_key` names each row's user and `partition=natural` makes one client per
distinct value (in sorted order, as pandas' groupby), dropping users with fewer than
`min_samples` rows and keeping the `max_clients` largest. Without a user column the rows are
dealt out to `num_clients` clients: `iid` (with `size_skew` > 0, of power-law sizes),
`dirichlet` over `label_key` (a category column) or `shards` of sorted labels. Each client's rows
are shuffled (seeded) and the last
`test_fraction` of them held out. Files are read with pandas (Parquet through pyarrow: the
[data] extra); nothing is downloaded.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pandas as pd

from fedrun.components import LocalPath, OneOf, Range
from fedrun.core import FedrunError, Stream, numpy_rng
from fedrun.data import partition as partitioners
from fedrun.data.examples import FederatedData
from fedrun.data.instructions import Instruction, check_template, from_messages, instruction_data, largest
from fedrun.data.text import TEST_FRACTION, Documents, Tokenizer, federate

log = logging.getLogger(__name__)

FORMATS = (".jsonl", ".json", ".csv", ".parquet")
PARTITIONS = ("natural", "iid", "dirichlet", "shards")
Column = str | None


class Table:
    data_kind = "text"

    def __init__(self, *, path: LocalPath, text_key: Column, prompt_key: Column, response_key: Column,
                 system_key: Column, messages_key: Column, client_key: Column, label_key: Column,
                 partition: Annotated[str, OneOf(*PARTITIONS)], num_clients: Annotated[int, Range(ge=1)] | None,
                 dirichlet_alpha: Annotated[float, Range(gt=0)], size_skew: Annotated[float, Range(ge=0)],
                 min_samples: Annotated[int, Range(ge=1)],
                 max_clients: Annotated[int, Range(ge=1)] | None, test_fraction: Annotated[float, TEST_FRACTION],
                 seq_len: Annotated[int, Range(ge=1)], template: str | None, packing: bool):
        self.path, self.text_key, self.prompt_key, self.response_key = path, text_key, prompt_key, response_key
        self.system_key, self.messages_key = system_key, messages_key
        self.client_key, self.label_key = client_key, label_key
        self.partition, self.num_clients, self.dirichlet_alpha = partition, num_clients, dirichlet_alpha
        self.size_skew = size_skew
        self.min_samples, self.max_clients, self.test_fraction = min_samples, max_clients, test_fraction
        self.seq_len, self.template = seq_len, template  # null: the tokenizer's chat template, or the plain one
        self.packing = packing
        self._check_keys()

    def _check_keys(self) -> None:
        kinds = [k for k, on in (("text_key", self.text_key), ("prompt_key", self.prompt_key),
                                 ("messages_key", self.messages_key)) if on]
        if len(kinds) != 1:
            raise FedrunError("data.text_key: set exactly one of data.text_key (plain text), data.prompt_key with "
                              f"data.response_key (instructions) or data.messages_key (chats); got {kinds or 'none'}")
        if (self.prompt_key is None) != (self.response_key is None):
            raise FedrunError("data.response_key: an instruction needs both data.prompt_key and data.response_key")
        if self.partition == "natural" and self.client_key is None:
            raise FedrunError("data.client_key: partition=natural makes one client per user, so it needs the "
                              "column naming each row's user; or use data.partition=iid, dirichlet or shards")
        if self.partition != "natural" and self.num_clients is None:
            raise FedrunError(f"data.num_clients: partition={self.partition} deals the rows out to num_clients "
                              "clients; set it")
        if self.partition == "dirichlet" and self.label_key is None:
            raise FedrunError("data.label_key: partition=dirichlet draws each client's mix of a category column; "
                              "name it")
        if self.size_skew and self.partition != "iid":
            raise FedrunError(f"data.size_skew: skews the sizes of partition=iid's clients; got partition="
                              f"{self.partition}")
        if self.text_key and self.partition in ("dirichlet", "shards"):
            raise FedrunError(f"data.partition: {self.partition} deals out rows with a category; plain text "
                              "(data.text_key) is cut into windows: use natural or iid")
        if self.packing and self.text_key:
            raise FedrunError("data.packing: packs instruction examples; plain text (data.text_key) is already cut "
                              "into full windows")
        if not self.text_key and self.template is not None:
            check_template(self.template)

    def implicit_sources(self) -> list[dict[str, Any]]:
        return []  # it reads data.path only, which the data cache keys on

    # ---- reading -------------------------------------------------------------------------

    def rows(self) -> tuple[pd.DataFrame, dict[str, Any]]:
        """The table, its rows with a usable value in every column used, and its identity."""
        frame, files = read_table(self.path)
        used = [k for k in (self.text_key, self.prompt_key, self.response_key, self.system_key, self.messages_key,
                            self.client_key, self.label_key) if k]
        for name, column in zip(("text_key", "prompt_key", "response_key", "system_key", "messages_key",
                                 "client_key", "label_key"),
                                (self.text_key, self.prompt_key, self.response_key, self.system_key,
                                 self.messages_key, self.client_key, self.label_key)):
            if column is not None and column not in frame.columns:
                raise FedrunError(f"data.{name}: {column!r} is not a column of {self.path}; columns: "
                                  f"{', '.join(map(str, frame.columns))}")
        frame = frame[used]
        strings = [k for k in (self.text_key, self.prompt_key, self.response_key) if k]
        usable = pd.Series(True, index=frame.index)
        for column in strings:
            usable &= frame[column].map(lambda v: isinstance(v, str) and v.strip() != "")
        for column in (self.client_key, self.label_key):
            if column:
                usable &= frame[column].notna()
        if self.system_key:  # optional per row: a missing system text is none
            frame = frame.assign(**{self.system_key: frame[self.system_key].map(
                lambda v: v if isinstance(v, str) and v.strip() else None)})
        dropped = int((~usable).sum())
        if not usable.any():
            raise FedrunError(f"data.path: no row of {self.path} has a non-empty string in "
                              f"{', '.join(strings or [str(self.messages_key)])}")
        if dropped:
            log.warning("data: %s of %s rows of %s dropped: an empty or non-string cell in %s", dropped, len(frame),
                        self.path, ", ".join(strings or [str(self.messages_key)]))
        identity = {"source": "table", "path": str(Path(self.path).expanduser().resolve()), "files": files,
                    "rows": int(usable.sum())}
        return frame[usable], identity  # its index: each row's number in the file (partition.csv records them)

    # ---- building ------------------------------------------------------------------------

    def load(self, *, seed: int, insert: Any = None, tokenizer: Tokenizer | None = None) -> FederatedData:
        frame, identity = self.rows()
        if self.text_key:
            return self._language_modelling(frame, identity, seed=seed, insert=insert, tokenizer=tokenizer)
        if insert is not None:
            raise FedrunError("audit: the canary audit plants secrets in plain text; instruction data "
                              "(data.prompt_key or data.messages_key) has none: use data.text_key, or audit=none")
        return self._instructions(frame, identity, seed=seed, tokenizer=tokenizer)

    def _language_modelling(self, frame: pd.DataFrame, identity: dict, *, seed: int, insert: Any,
                            tokenizer: Tokenizer | None) -> FederatedData:
        assert self.text_key is not None
        if self.client_key is None:  # the whole table is one text, dealt out as windows
            docs: Documents = [("table", "\n\n".join(frame[self.text_key]).encode())]
        else:
            groups = frame.groupby(frame[self.client_key].astype(str), sort=True)[self.text_key]
            docs = [(str(name), "\n\n".join(texts).encode()) for name, texts in groups]
            docs = self._largest(docs, [len(d) for _, d in docs])
        data = federate(docs, source=identity | {"text_key": self.text_key}, seq_len=self.seq_len,
                        test_fraction=self.test_fraction, min_samples=self.min_samples,
                        partition="natural" if self.partition == "natural" else "iid",
                        num_clients=self.num_clients, max_client_bytes=None, seed=seed, insert=insert,
                        tokenizer=tokenizer)
        return data

    def _instructions(self, frame: pd.DataFrame, identity: dict, *, seed: int,
                      tokenizer: Tokenizer | None) -> FederatedData:
        examples = self._examples(frame)
        keep = [i for i, e in enumerate(examples) if e is not None]
        if len(keep) < len(examples):
            log.warning("data: %s of %s chats of %s dropped: no assistant turn", len(examples) - len(keep),
                        len(examples), self.path)
        if not keep:
            raise FedrunError(f"data.messages_key: no row of {self.path} holds a chat with an assistant turn")
        frame = frame.iloc[keep]
        kept = [e for e in examples if e is not None]  # the j-th row of frame is kept[j]
        parts, names = self._parts(frame, seed)
        named = [(name, [kept[i] for i in part]) for name, part in zip(names, parts)]
        numbers = frame.index.to_numpy(dtype=np.int64)  # each row's number in the file
        return instruction_data(named, seq_len=self.seq_len, test_fraction=self.test_fraction, template=self.template,
                                tokenizer=tokenizer, seed=seed, identity=identity, partition=self.partition,
                                packing=self.packing, rows=[numbers[part] for part in parts])

    def _examples(self, frame: pd.DataFrame) -> list[Instruction | None]:
        if self.messages_key:
            return [from_messages(m) for m in frame[self.messages_key]]
        assert self.prompt_key is not None and self.response_key is not None
        systems = frame[self.system_key] if self.system_key else [None] * len(frame)
        return [Instruction(p, r, s) for p, r, s in zip(frame[self.prompt_key], frame[self.response_key], systems)]

    def _parts(self, frame: pd.DataFrame, seed: int) -> tuple[list[np.ndarray], list[str]]:
        """Each client's row indices, and its name."""
        if self.partition == "natural":
            assert self.client_key is not None
            groups = frame.groupby(frame[self.client_key].astype(str), sort=True).indices
            named = [(str(name), np.asarray(rows, dtype=np.int64)) for name, rows in groups.items()]
            named = [(n, rows) for n, rows in named if len(rows) >= self.min_samples]
            if not named:
                raise FedrunError(f"data.min_samples: no user of {self.client_key!r} has {self.min_samples} rows; "
                                  "lower it")
            kept = self._largest(named, [len(rows) for _, rows in named])
            return [rows for _, rows in kept], [name for name, _ in kept]
        assert self.num_clients is not None
        rng = numpy_rng(seed, Stream.PARTITION, 2)
        if self.partition == "iid" and self.size_skew:  # power-law client sizes, rows dealt at random
            sizes = partitioners.power_law_sizes(len(frame), self.num_clients, exponent=self.size_skew, rng=rng)
            parts = partitioners.split_by_sizes(rng.permutation(len(frame)), sizes)
        elif self.partition == "iid":
            parts = partitioners.iid(len(frame), self.num_clients, rng)
        else:
            labels = pd.factorize(frame[self.label_key].astype(str), sort=True)[0]
            parts = (partitioners.dirichlet(labels, self.num_clients, alpha=self.dirichlet_alpha, rng=rng)
                     if self.partition == "dirichlet" else partitioners.shards(labels, self.num_clients, rng=rng))
        kept_parts = [p for p in parts if len(p) >= self.min_samples]
        if not kept_parts:
            raise FedrunError(f"data.min_samples: no client of {self.num_clients} holds {self.min_samples} rows; "
                              "lower it or data.num_clients")
        return kept_parts, [f"{self.partition}_{k}" for k in range(len(kept_parts))]

    def _largest(self, named: list, sizes: list[int]) -> list:
        """The max_clients largest (ties: in name order), in name order; all when unset."""
        return largest(named, sizes, self.max_clients)


def read_table(path: str) -> tuple[pd.DataFrame, list[str]]:
    """A table file, or a folder of them (concatenated in name order); one line naming what is wrong."""
    location = Path(path).expanduser()
    if location.is_dir():
        if (location / "dataset_info.json").is_file() or (location / "state.json").is_file():
            return _saved_dataset(location), [location.name]
        files = sorted(f for f in location.iterdir() if f.is_file() and f.suffix in FORMATS)
        if not files:
            raise FedrunError(f"data.path: {path} holds no {', '.join(FORMATS)} file")
    elif location.is_file():
        files = [location]
    else:
        raise FedrunError(f"data.path: file not found: {path}")
    frames = [_read_file(f) for f in files]
    columns = set(frames[0].columns)
    for f, frame in zip(files[1:], frames[1:]):
        if set(frame.columns) != columns:
            raise FedrunError(f"data.path: {f} has other columns than {files[0].name} "
                              f"({', '.join(map(str, frame.columns))})")
    return pd.concat(frames, ignore_index=True), [f.name for f in files]


def _read_file(file: Path) -> pd.DataFrame:
    suffix = file.suffix.lower()
    if suffix not in FORMATS:
        raise FedrunError(f"data.path: {file} is not a {', '.join(FORMATS)} file (nor a folder of them, nor a saved "
                          "Hugging Face dataset)")
    try:
        if suffix == ".jsonl":
            return pd.read_json(file, lines=True, dtype=False, encoding="utf-8")
        if suffix == ".json":
            return pd.read_json(file, dtype=False, encoding="utf-8")
        if suffix == ".csv":
            return pd.read_csv(file, dtype=str, keep_default_na=False, na_values=[""], encoding="utf-8")
        try:
            import pyarrow  # noqa: F401  (the [data] extra)
        except ImportError:
            raise FedrunError("data.path: reading .parquet needs pyarrow: pip install -e .[data]") from None
        return pd.read_parquet(file)
    except UnicodeDecodeError as e:
        raise FedrunError(f"data.path: {file} is not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r})") \
            from None
    except FedrunError:
        raise
    except Exception as e:  # noqa: BLE001 (a parser's error of any kind: one line naming the file)
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FedrunError(f"data.path: {file} cannot be read as {suffix[1:]}: {message}") from None


def _saved_dataset(folder: Path) -> pd.DataFrame:
    """A folder written by `datasets.Dataset.save_to_disk` (the [data] extra)."""
    try:
        from datasets import load_from_disk
    except ImportError:
        raise FedrunError(f"data.path: {folder} is a saved Hugging Face dataset; reading it needs datasets: "
                          "pip install -e .[data]") from None
    dataset = load_from_disk(str(folder))
    if hasattr(dataset, "keys"):  # a DatasetDict: its train split, else its first
        dataset = dataset["train"] if "train" in dataset else dataset[next(iter(dataset.keys()))]
    return dataset.to_pandas()
