"""Evaluation beyond perplexity: what the global model answers, and which answer it prefers.

- `SampleResponses` (eval.samples=K): at each evaluation, greedy responses to K fixed held-out
  prompts of instruction data, one JSON line each in the run's samples.jsonl:
  {"round", "prompt", "reference", "response"}.
- `MultipleChoice` (eval.choices=PATH): each row {question, choices, answer} of a JSONL file is
  answered by the choice of highest log-likelihood given the question, read as the prompt part
  of the run's instruction template, as lm-evaluation-harness scores MMLU (Hendrycks et al. 2021,
  "Measuring Massive Multitask Language Understanding"): `eval_mc_acc` compares sums of token
  log-likelihoods, `eval_mc_acc_norm` sums divided by each choice's length in bytes.

Each declares the metrics.csv columns it fills (`metric_columns`); GlobalModel calls `evaluate`
on the model it has just loaded with the round's weights.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from fedrun.core import FedrunError, Stream, numpy_rng
from fedrun.data.examples import Examples, Windows
from fedrun.data.instructions import end_ids, prompt_ids, up_to_end
from fedrun.evaluation import EVAL_TOKENS
from fedrun.rundir import JsonLines

SAMPLES_FILE = "samples.jsonl"


def text_ids(text: str, tokenizer: Any) -> list[int]:
    """`text` as the model's ids: its UTF-8 bytes, or a tokenizer's ids (fedrun.data.text.Tokenizer)."""
    return list(text.encode()) if tokenizer is None else list(tokenizer.encode(text.encode()))


def decoded(ids: Sequence[int], tokenizer: Any) -> str:
    """Ids back to text; bytes that are not UTF-8 read as U+FFFD."""
    raw = bytes(ids) if tokenizer is None else tokenizer.decode(list(ids))
    return raw.decode("utf-8", errors="replace")


# ---- eval.samples ------------------------------------------------------------------------------

class SampleResponses:
    """Greedy responses to the first K test prompts in a seeded order (the same at every evaluation)."""

    def __init__(self, test: Examples, *, samples: int, seed: int, max_new_tokens: int, tokenizer: Any = None,
                 template: str | None = None):
        """`template`: data.template (None: a tokenizer's chat template, else the plain one)."""
        if not isinstance(test, Windows) or test.mask is None:
            raise FedrunError("eval.samples: responses are sampled from held-out instruction prompts; this data "
                              "has none (use instruction data, e.g. data=table with data.prompt_key, or set "
                              "eval.samples=0)")
        self.metric_columns: list[str] = []
        self.tokenizer, self.max_new_tokens = tokenizer, max_new_tokens
        self.ends = end_ids(template, tokenizer)
        order = numpy_rng(seed, Stream.EVAL).permutation(len(test))[:samples]
        self.examples = [self._split(test.tokens[i], test.mask[i]) for i in order.tolist()]

    def _split(self, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[list[int], list[int]]:
        """A window's (prompt ids, reference response ids up to its EOS or end of turn)."""
        start = int(mask.int().argmax())  # the first response token
        reference = tokens[mask].tolist()
        return tokens[:start].tolist(), up_to_end(reference, self.ends)

    def evaluate(self, model: nn.Module, device: torch.device, *, round_idx: int, run_dir: Path) -> dict:
        lines = []
        for prompt, reference in self.examples:
            response = greedy(model, prompt, ends=self.ends, max_new_tokens=self.max_new_tokens, device=device)
            lines.append({"round": round_idx, "prompt": decoded(prompt, self.tokenizer),
                          "reference": decoded(reference, self.tokenizer),
                          "response": decoded(response, self.tokenizer)})
        JsonLines(run_dir / SAMPLES_FILE).append(lines)
        return {}


@torch.inference_mode()
def greedy(model: nn.Module, prompt: list[int], *, ends: Sequence[int], max_new_tokens: int,
           device: torch.device) -> list[int]:
    """The ids the model writes after `prompt`, most likely first, up to one of `ends` (not
    included) or `max_new_tokens`; the context cropped to the model's seq_len."""
    was_training = model.training
    model.eval()
    seq_len = cast(int, model.seq_len)  # every text model (tiny_gpt, lstm, hf) keeps its own
    idx = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, T)
    new: list[int] = []
    for _ in range(max_new_tokens):
        token = int(model(idx[:, -seq_len:])[0, -1].argmax())  # (vocab,) logits at the last position
        if token in ends:
            break
        new.append(token)
        idx = torch.cat([idx, idx.new_tensor([[token]])], dim=1)
    model.train(was_training)
    return new


# ---- eval.choices ------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChoiceRow:
    question: str
    choices: tuple[str, ...]
    answer: int


def read_choices(path: str) -> list[ChoiceRow]:
    """The rows of a multiple-choice JSONL file; one line naming eval.choices when one is unusable."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FedrunError(f"eval.choices: file not found: {path}")
    rows = []
    with open(file, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                rows.append(_choice_row(line, f"eval.choices: {path} line {number}"))
    if not rows:
        raise FedrunError(f"eval.choices: {path} holds no rows; each line is "
                          '{"question": "...", "choices": ["...", "..."], "answer": 0}')
    return rows


def _choice_row(line: str, where: str) -> ChoiceRow:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise FedrunError(f"{where}: not JSON ({e.msg})") from None
    if not isinstance(row, dict) or not {"question", "choices", "answer"} <= set(row):
        raise FedrunError(f"{where}: needs the fields question, choices and answer")
    choices = row["choices"]
    if not isinstance(row["question"], str):
        raise FedrunError(f"{where}: question is not a string")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise FedrunError(f"{where}: choices is not a list of at least 2 non-empty strings")
    answer = row["answer"]
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise FedrunError(f"{where}: answer {answer!r} is not an index of choices; allowed: 0..{len(choices) - 1}")
    return ChoiceRow(row["question"], tuple(choices), answer)


class MultipleChoice:
    """Accuracy on multiple-choice rows by log-likelihood (acc and acc_norm of lm-evaluation-harness)."""

    def __init__(self, rows: Sequence[ChoiceRow], *, template: str | None, seq_len: int, tokenizer: Any = None):
        """`template`: data.template (None: a tokenizer's chat template, else the plain one)."""
        self.metric_columns = ["eval_mc_acc", "eval_mc_acc_norm"]
        self.rows, self.seq_len = list(rows), seq_len
        # One sequence per (row, choice): the question as the template's prompt part (as an
        # instruction example's prompt is encoded), then the choice's ids, with no EOS after it.
        contexts = [prompt_ids(row.question, template=template, tokenizer=tokenizer) for row in self.rows]
        self.sequences = [choice_sequence(context, text_ids(choice, tokenizer), seq_len)
                          for context, row in zip(contexts, self.rows) for choice in row.choices]
        self.num_bytes = np.array([len(c.encode()) for row in self.rows for c in row.choices], dtype=np.float64)

    def evaluate(self, model: nn.Module, device: torch.device, *, round_idx: int, run_dir: Path) -> dict:
        loglik = sequence_logliks(model, self.sequences, device)
        acc, acc_norm, start = 0, 0, 0
        for row in self.rows:
            end = start + len(row.choices)
            acc += int(np.argmax(loglik[start:end])) == row.answer
            acc_norm += int(np.argmax(loglik[start:end] / self.num_bytes[start:end])) == row.answer
            start = end
        return {"eval_mc_acc": acc / len(self.rows), "eval_mc_acc_norm": acc_norm / len(self.rows)}


def choice_sequence(context: list[int], continuation: list[int], seq_len: int) -> tuple[list[int], int]:
    """(ids, n): context then continuation, cut from the left to seq_len + 1 ids (seq_len
    predictions), and how many of the last ids are scored (the continuation's that remain predicted)."""
    ids = (context + continuation)[-(seq_len + 1):]
    return ids, min(len(continuation), len(ids) - 1)


@torch.inference_mode()
def sequence_logliks(model: nn.Module, sequences: Sequence[tuple[list[int], int]],
                     device: torch.device) -> np.ndarray:
    """(S,) float64: for each (ids, n), the sum of log p(id | ids before it) over its last n ids."""
    was_training = model.training
    model.eval()
    width = max(len(ids) for ids, _ in sequences)
    batch = max(1, EVAL_TOKENS // max(width - 1, 1))
    out = np.zeros(len(sequences))
    for start in range(0, len(sequences), batch):
        chunk = sequences[start:start + batch]
        x = torch.zeros(len(chunk), width, dtype=torch.long, device=device)  # right-padded: causal models
        for i, (ids, _) in enumerate(chunk):                                # never read the padding
            x[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        logp = model(x[:, :-1]).double().log_softmax(-1)  # (B, W - 1, vocab)
        token_logp = logp.gather(-1, x[:, 1:, None]).squeeze(-1)  # (B, W - 1): log p of each next id
        for i, (ids, n) in enumerate(chunk):
            out[start + i] = float(token_logp[i, len(ids) - 1 - n:len(ids) - 1].sum())
    model.train(was_training)
    return out
