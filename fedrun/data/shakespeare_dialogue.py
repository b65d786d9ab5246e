"""`data=shakespeare_dialogue`: instruction examples from the plays' turns of dialogue. An
example's prompt is a speech and its response the next speech, when another speaker says it;
the client is the responding speaker (a natural, non-IID split: each character answers in its
own voice). The file is in the tinyshakespeare layout, read as `data=shakespeare` reads it."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Any

from fedrun.components import LocalPath, Range
from fedrun.core import FedrunError
from fedrun.data.examples import FederatedData
from fedrun.data.instructions import Instruction, check_template, instruction_data, natural_clients
from fedrun.data.shakespeare import read_speeches
from fedrun.data.text import TEST_FRACTION, Tokenizer


class ShakespeareDialogue:
    data_kind = "text"

    def __init__(self, *, path: LocalPath, seq_len: Annotated[int, Range(ge=1)],
                 test_fraction: Annotated[float, TEST_FRACTION], min_samples: Annotated[int, Range(ge=1)],
                 max_clients: Annotated[int, Range(ge=1)] | None, template: str | None):
        self.path, self.seq_len, self.test_fraction = path, seq_len, test_fraction
        self.min_samples, self.max_clients, self.template = min_samples, max_clients, template
        if template is not None:
            check_template(template)

    def implicit_sources(self) -> list[dict[str, Any]]:
        return []  # it reads data.path only, which the data cache keys on

    def load(self, *, seed: int, insert: Any = None, tokenizer: Tokenizer | None = None) -> FederatedData:
        if insert is not None:
            raise FedrunError("audit: the canary audit plants secrets in plain text; data=shakespeare_dialogue "
                              "is instruction data: use data=shakespeare, or audit=none")
        speeches, raw = read_speeches(self.path)
        clients = natural_clients(dialogue(speeches), min_samples=self.min_samples, max_clients=self.max_clients)
        identity = {"source": "shakespeare_dialogue", "path": str(Path(self.path).expanduser().resolve()),
                    "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
        return instruction_data(clients, seq_len=self.seq_len, test_fraction=self.test_fraction,
                                template=self.template, tokenizer=tokenizer, seed=seed, identity=identity)


def dialogue(speeches: list[tuple[str, bytes]]) -> list[tuple[str, list[Instruction]]]:
    """Per responding speaker (in name order), the (speech, next speech by them) pairs, in play order."""
    replies: dict[str, list[Instruction]] = {}
    for (speaker, said), (responder, reply) in zip(speeches, speeches[1:]):
        if responder != speaker:
            replies.setdefault(responder, []).append(Instruction(_text(said), _text(reply)))
    return sorted(replies.items())


def _text(speech: bytes) -> str:
    return speech.decode("utf-8", "replace").rstrip("\n")
