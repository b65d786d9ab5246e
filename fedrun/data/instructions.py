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

A window holds seq_len + 1 tokens. When an example is longer, the prompt loses tokens from its
start (the response and the end of the prompt, nearest to it, are kept); a response longer
than the window keeps its first seq_len tokens after one prompt token. Shorter examples are
padded with token 0, which is never a target.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedrun.core import FedrunError
from fedrun.data.examples import Windows

EOS_BYTE = 4  # ASCII EOT: the end of a response, for byte-level models
DEFAULT_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n{response}"
SYSTEM_HEADER = "### System:\n{system}\n\n"
PLACEHOLDERS = ("prompt", "response", "system")


@dataclass(frozen=True)
class Instruction:
    prompt: str
    response: str
    system: str | None = None


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
    (one user turn: its text; several: `role: text` lines). None when it has no assistant turn."""
    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
        return None
    roles = [str(m.get("role", "")) for m in messages]
    if "assistant" not in roles:
        return None
    last = len(roles) - 1 - roles[::-1].index("assistant")
    system = "\n".join(str(m.get("content", "")) for m in messages[:last] if m.get("role") == "system")
    turns = [m for m in messages[:last] if m.get("role") != "system"]
    if len(turns) == 1 and turns[0].get("role") == "user":
        prompt = str(turns[0].get("content", ""))
    else:
        prompt = "\n".join(f"{m.get('role')}: {m.get('content', '')}" for m in turns)
    return Instruction(prompt, str(messages[last].get("content", "")), system or None)


def encode(examples: Sequence[Instruction], seq_len: int, *, template: str = DEFAULT_TEMPLATE,
           tokenizer: Any = None) -> Windows:
    """One (seq_len + 1)-token window per example and its mask (True on the response's tokens,
    EOS included): see the module docstring for truncation and padding."""
    length = seq_len + 1
    tokens = torch.zeros(len(examples), length, dtype=torch.int32 if tokenizer else torch.uint8)
    mask = torch.zeros(len(examples), length, dtype=torch.bool)
    eos = EOS_BYTE if tokenizer is None else tokenizer.eos_id
    for i, example in enumerate(examples):
        prompt_text, response_text = render(example, template)
        prompt, response = (_ids(prompt_text, tokenizer), _ids(response_text, tokenizer) + [eos])
        response = response[: length - 1]  # at least one prompt token to predict the response from
        prompt = prompt[max(0, len(prompt) - (length - len(response))):]  # its end, nearest the response
        ids = prompt + response
        tokens[i, : len(ids)] = torch.tensor(ids, dtype=tokens.dtype)
        mask[i, len(prompt) : len(ids)] = True
    return Windows(tokens, mask)


def _ids(text: str, tokenizer: Any) -> list[int]:
    return list(text.encode()) if tokenizer is None else list(tokenizer.encode(text.encode()))
