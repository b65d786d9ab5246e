"""Instruction examples: a prompt (and optional system text) and the response a model should
give, tokenised into one window each with a loss mask over the response's tokens.

Byte-level models (tiny_gpt, lstm) read the plain template

    ### Instruction:
    {prompt}

    ### Response:
    {response}<EOS>

with `### System:\\n{system}\\n\\n` in front when the example has system text, and <EOS> the
byte 0x04 (ASCII end of transmission, which text never contains). A model with its own
tokenizer (model=hf) reads the same template in its tokens and ends with its EOS token.
`data.template` replaces the template: any text with `{prompt}` once and `{response}` once
after it, and optionally `{system}`; everything from `{response}` on is the response part.

A tokenizer with a chat template, when data.template is null, reads each example exactly as
`apply_chat_template([system?, user, assistant])` tokenises it, and the response part (the
mask) is what those ids add to `apply_chat_template([system?, user], add_generation_prompt=True)`:
the assistant's turn and its end-of-turn tokens. A chat template that does not render the
prompt as such a prefix falls back to the plain template (with a warning).

A window holds seq_len + 1 tokens. When an example is longer, the prompt loses tokens from its
start (the response and the end of the prompt, nearest to it, are kept). A response too long
for what the prompt leaves is cut at its end instead, so that the prompt keeps at least half
the window (or all of itself when shorter): a response with no instruction in view teaches
nothing about following one. Shorter examples are padded with token 0, which is never a target.
"""
from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch

from fedrun.core import FedrunError, Stream, numpy_rng
from fedrun.data.examples import ClientData, FederatedData, SourceRows, Windows, pack, pack_parts
from fedrun.data.text import VOCAB_SIZE, num_test

log = logging.getLogger(__name__)
EOS_BYTE = 4  # ASCII EOT: the end of a response, for byte-level models
DEFAULT_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n{response}"
SYSTEM_HEADER = "### System:\n{system}\n\n"
PLACEHOLDERS = ("prompt", "response", "system")


@dataclass(frozen=True)
class Instruction:
    prompt: str
    response: str
    system: str | None = None
    # A multi-turn chat's turns before its response, as (role, content): a chat template renders
    # them as turns; the plain template reads `prompt`, their `role: content` lines.
    turns: tuple[tuple[str, str], ...] = ()


def check_template(template: str) -> None:
    """One line naming data.template when it cannot be split into a prompt and a response part."""
    names = re.findall(r"\{(\w*)\}", template)
    if unknown := sorted(set(names) - set(PLACEHOLDERS)):
        raise FedrunError(f"data.template: unknown placeholder {{{unknown[0]}}}; allowed: {{prompt}}, {{response}}, "
                          "{system}")
    for name in ("prompt", "response"):
        if names.count(name) != 1:
            raise FedrunError(f"data.template: needs {{{name}}} exactly once (it has it {names.count(name)} times)")
    if template.index("{response}") < template.index("{prompt}"):
        raise FedrunError("data.template: {response} must come after {prompt}: the response is what follows the prompt")


def render(example: Instruction, template: str = DEFAULT_TEMPLATE) -> tuple[str, str]:
    """(prompt part, response part): the template filled, cut where the response begins."""
    head, tail = template.split("{response}")
    system = example.system or ""
    header = SYSTEM_HEADER.replace("{system}", system) if system and "{system}" not in template else ""
    fill = {"prompt": example.prompt, "system": system}
    prompt = header + re.sub(r"\{(prompt|system)\}", lambda m: fill[m.group(1)], head)
    response = example.response + re.sub(r"\{(prompt|system)\}", lambda m: fill[m.group(1)], tail)
    return prompt, response


def from_messages(messages: Any) -> Instruction | None:
    """A chat (a list of {role, content}) as an instruction: its last assistant turn is the
    response, system turns the system text, and the turns before the response the prompt
    (one user turn: its text; several: `role: text` lines, the turns themselves kept for a chat
    template). None when it has no assistant turn."""
    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
        return None
    roles = [str(m.get("role", "")) for m in messages]
    if "assistant" not in roles:
        return None
    last = len(roles) - 1 - roles[::-1].index("assistant")
    system = "\n".join(str(m.get("content", "")) for m in messages[:last] if m.get("role") == "system")
    turns = tuple((str(m.get("role")), str(m.get("content", ""))) for m in messages[:last] if m.get("role") != "system")
    response = str(messages[last].get("content", ""))
    if len(turns) == 1 and turns[0][0] == "user":
        return Instruction(turns[0][1], response, system or None)
    return Instruction("\n".join(f"{role}: {content}" for role, content in turns), response, system or None, turns)


def encode(examples: Sequence[Instruction], seq_len: int, *, template: str | None = None,
           tokenizer: Any = None) -> Windows:
    """One (seq_len + 1)-token window per example and its mask (True on the response's tokens,
    EOS included): see the module docstring for the templates, truncation and padding.
    `template` None: the tokenizer's chat template if it has one, else DEFAULT_TEMPLATE."""
    length = seq_len + 1
    tokens = torch.zeros(len(examples), length, dtype=torch.int32 if tokenizer else torch.uint8)
    mask = torch.zeros(len(examples), length, dtype=torch.bool)
    for i, (prompt, response) in enumerate(_parts(examples, template, tokenizer)):
        keep_prompt = max(1, min(len(prompt), length // 2))  # at least one token predicts the response
        response = response[: length - keep_prompt]
        prompt = prompt[max(0, len(prompt) - (length - len(response))):]  # its end, nearest the response
        ids = prompt + response
        tokens[i, : len(ids)] = torch.tensor(ids, dtype=tokens.dtype)
        mask[i, len(prompt) : len(ids)] = True
    return Windows(tokens, mask)


def _parts(examples: Sequence[Instruction], template: str | None,
           tokenizer: Any) -> list[tuple[list[int], list[int]]]:
    """Each example's (prompt ids, response ids), before truncation."""
    if template is None and uses_chat_template(tokenizer):
        chats = [chat_parts(example, tokenizer) for example in examples]
        if all(chat is not None for chat in chats):
            return [chat for chat in chats if chat is not None]
        log.warning("data.template: the chat template of %s does not render the prompt as the start of the "
                    "whole chat (or fails on an example); using the plain template instead", tokenizer.name)
    eos = EOS_BYTE if tokenizer is None else tokenizer.eos_id
    parts = []
    for example in examples:
        prompt_text, response_text = render(example, template or DEFAULT_TEMPLATE)
        parts.append((_ids(prompt_text, tokenizer), _ids(response_text, tokenizer) + [eos]))
    return parts


def uses_chat_template(tokenizer: Any) -> bool:
    """Whether `tokenizer` (None: bytes) has a chat template, which a null data.template defers to."""
    return tokenizer is not None and tokenizer.has_chat_template


def as_messages(example: Instruction) -> list[dict[str, str]]:
    """The example as a chat: [system?, user, assistant], or [system?, its turns..., assistant]."""
    system = [{"role": "system", "content": example.system}] if example.system else []
    turns = [{"role": role, "content": content} for role, content in example.turns] or \
        [{"role": "user", "content": example.prompt}]
    return [*system, *turns, {"role": "assistant", "content": example.response}]


def chat_parts(example: Instruction, tokenizer: Any) -> tuple[list[int], list[int]] | None:
    """(prompt ids, response ids) by the tokenizer's chat template: the chat without its assistant
    turn, with the generation prompt, and what the whole chat's ids add to it. None when the first
    is not a prefix of the whole chat's ids, or the template fails on the example."""
    chat = as_messages(example)
    try:
        whole = tokenizer.chat_ids(chat, generation_prompt=False)
        prompt = tokenizer.chat_ids(chat[:-1], generation_prompt=True)
    except Exception as e:  # noqa: BLE001 (a template's own error, e.g. a role it refuses: fall back)
        log.debug("chat template failed on an example: %s", e)
        return None
    if whole[: len(prompt)] != prompt or len(whole) == len(prompt):
        return None
    return prompt, whole[len(prompt):]


def prompt_ids(prompt: str, *, template: str | None, tokenizer: Any) -> list[int]:
    """The ids a model trained on instruction data reads before its response to `prompt`: the
    template's prompt part as `encode` writes it (a chat template's with the generation prompt)."""
    if template is None and uses_chat_template(tokenizer):
        chat = chat_parts(Instruction(prompt, "x"), tokenizer)  # encode's choice, made on a probe example
        if chat is not None:
            return chat[0]
    return _ids(render(Instruction(prompt, ""), template or DEFAULT_TEMPLATE)[0], tokenizer)


def end_ids(template: str | None, tokenizer: Any) -> list[int]:
    """The ids a response ends with, which generation stops at: the EOS (byte 0x04, or the
    tokenizer's EOS token), and with a chat template also its end-of-turn token (<|im_end|>,
    <|eot_id|>, ...): the first special token of what every assistant turn ends with, found as
    the common end of two probe responses' ids."""
    eos = EOS_BYTE if tokenizer is None else tokenizer.eos_id
    if template is not None or not uses_chat_template(tokenizer):
        return [eos]
    probes = [chat_parts(Instruction("a", text), tokenizer) for text in ("x", "Yes, twice.")]
    if probes[0] is None or probes[1] is None:  # encode falls back to the plain template too
        return [eos]
    a, b = probes[0][1], probes[1][1]
    common = 0
    while common < min(len(a), len(b)) and a[len(a) - 1 - common] == b[len(b) - 1 - common]:
        common += 1
    turn_end = next((i for i in a[len(a) - common:] if i in tokenizer.special_ids), None)
    return [eos] if turn_end in (None, eos) else [eos, turn_end]


def up_to_end(ids: list[int], ends: Sequence[int]) -> list[int]:
    """`ids` before the first of `ends` in them (all of them when none is)."""
    return ids[: next((i for i, token in enumerate(ids) if token in ends), len(ids))]


def _ids(text: str, tokenizer: Any) -> list[int]:
    return list(text.encode()) if tokenizer is None else list(tokenizer.encode(text.encode()))


# ---- federated instruction data: shared by data=table, shakespeare_dialogue, pystdlib_functions ----

Named = Sequence[tuple[str, Sequence[Instruction]]]  # (client's name, its examples)


def natural_clients(named_examples: Named, *, min_samples: int, max_clients: int | None) -> list:
    """The clients with at least `min_samples` examples; of those the `max_clients` largest."""
    kept = [(name, examples) for name, examples in named_examples if len(examples) >= min_samples]
    if not kept:
        raise FedrunError(f"data.min_samples: no client has {min_samples} examples; lower it")
    return largest(kept, [len(examples) for _, examples in kept], max_clients)


def largest(named: list, sizes: list[int], max_clients: int | None) -> list:
    """The max_clients largest (ties: in order), in their order; all when unset."""
    if max_clients is None or len(named) <= max_clients:
        return list(named)
    order = sorted(range(len(named)), key=lambda i: (-sizes[i], i))[:max_clients]
    return [named[i] for i in sorted(order)]


def instruction_data(named_examples: Named, *, seq_len: int, test_fraction: float, template: str | None,
                     tokenizer: Any, seed: int, identity: dict, partition: str = "natural",
                     packing: bool = False, rows: Sequence[np.ndarray] | None = None) -> FederatedData:
    """Client k holds the examples of named_examples[k], one window each (`encode`), shuffled by
    its own stream (seed, PARTITION, 1, k) and the last `test_fraction` of them held out; with
    `packing`, each client's train and test examples are then packed (`pack_examples`).
    `rows[k]`: the source rows of client k's examples, recorded per split (FederatedData.source_rows)."""
    windows = encode([e for _, examples in named_examples for e in examples], seq_len, template=template,
                     tokenizer=tokenizer)
    starts = np.cumsum([0] + [len(examples) for _, examples in named_examples])
    train, test = [], []
    for k in range(len(named_examples)):
        part = np.arange(starts[k], starts[k + 1], dtype=np.int64)
        shuffled = part[numpy_rng(seed, Stream.PARTITION, 1, k).permutation(len(part))]
        cut = len(part) - num_test(len(part), test_fraction)
        train.append(shuffled[:cut])
        test.append(shuffled[cut:])
    source_rows = None if rows is None else SourceRows.of(*(
        [rows[k][split[k] - starts[k]] for k in range(len(rows))] for split in (train, test)))
    clients = pack_parts(windows, train, windows, test, names=[name for name, _ in named_examples])
    if packing:
        clients = pack([ClientData(c.name, pack_examples(cast(Windows, c.train)), pack_examples(cast(Windows, c.test)))
                        for c in clients])  # instruction examples are windows
    fingerprint = identity | {
        "examples": "instructions", "partition": partition, "seq_len": seq_len,
        "template": template_used(template, tokenizer),
        **({"packing": True} if packing else {}),
        "clients": len(clients), "train_examples": len(clients.train), "test_examples": len(clients.test),
        "tokens": tokenizer.name if tokenizer else "bytes",
    }
    vocab_size = tokenizer.vocab_size if tokenizer else VOCAB_SIZE
    return FederatedData(clients, fingerprint, model_dims={"vocab_size": vocab_size, "seq_len": seq_len},
                         source_rows=source_rows)


def template_used(template: str | None, tokenizer: Any) -> str:
    """What the examples were rendered with, for the data's fingerprint: data.template, the
    tokenizer's chat template (by its sha256), or the plain template."""
    if template is None and uses_chat_template(tokenizer):
        return f"chat template sha256:{hashlib.sha256(tokenizer.chat_template.encode()).hexdigest()[:16]}"
    return template or DEFAULT_TEMPLATE


def pack_examples(windows: Windows) -> Windows:
    """Examples laid end to end and cut into windows of the same length (the last one padded):
    fewer windows, no padding between examples. Each keeps its own mask, so the loss still counts
    response tokens only; attention does cross from one example into the next, as in packed
    fine-tuning without per-example attention masks: an example sees earlier, unrelated
    examples as context, which costs little and is documented (data.packing)."""
    if len(windows) == 0 or windows.mask is None:
        return windows
    length = windows.tokens.shape[1]
    counted = windows.mask.any(1)
    ends = torch.where(counted, length - windows.mask.flip(1).int().argmax(1), 0)  # past each response's end
    keep = torch.arange(length).unsqueeze(0) < ends.unsqueeze(1)
    tokens, mask = windows.tokens[keep], windows.mask[keep]
    pad = (-len(tokens)) % length
    tokens = torch.cat([tokens, tokens.new_zeros(pad)]).view(-1, length)
    mask = torch.cat([mask, mask.new_zeros(pad)]).view(-1, length)
    return Windows(tokens, mask)
