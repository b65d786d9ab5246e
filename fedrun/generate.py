"""Use a finished run's global model: load it, sample bytes from it, evaluate it on other data.

A run on instruction data answers a prompt: it reads the prompt in the run's template (its
prompt part, or the tokenizer's chat template with the generation prompt) and its response
ends at the EOS it was trained to write (byte 0x04, or the tokenizer's EOS token).

The model is rebuilt from the run's config.yaml alone (its `model` node and the dims its data
implies), so no training data is loaded to generate. Weights come from `model.safetensors`
(the final model) or from the flat vector of a checkpoint `checkpoints/round_NNNN.pt`.
"""
from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors.torch import load_file
from torch import nn

from fedrun import config
from fedrun.components import capability
from fedrun.core import FedrunError
from fedrun.data.instructions import DEFAULT_TEMPLATE, Instruction, end_ids, prompt_ids, render, up_to_end
from fedrun.data.text import VOCAB_SIZE, Tokenizer, has_tokenizer
from fedrun.evaluation import evaluate
from fedrun.params import flatten_parameters
from fedrun.run_config import load_run_config
from fedrun.rundir import RunDir, is_run_dir, load_checkpoint


def load_model(run_dir: Path, *, round: int | None = None,
               device: str | torch.device = "auto") -> tuple[nn.Module, DictConfig]:
    """The run's global model in eval mode (final, or after `round`) and the run's config."""
    run = RunDir(Path(run_dir))
    if not is_run_dir(run.path):
        raise FedrunError(f"run_dir: {run_dir} is not a run directory (no config.yaml and metrics.csv)")
    cfg = load_run_config(run.path)
    if capability(cfg.strategy, "strategy", "exchanges") == "logits":
        raise FedrunError(f"run_dir: {run_dir} is a fed_distill run: it has no global model, each client kept its "
                          "own (client_models.safetensors, one flat vector per client)")
    model = config.instantiate(cfg.model, **model_dims(cfg))
    if round is None:
        _load_final(model, run)
    else:
        _load_round(model, run, round)
    return model.to(_device(device)).eval(), cfg


def run_tokenizer(cfg: DictConfig) -> Tokenizer | None:
    """The tokenizer a run's text was encoded with (a local checkpoint's own), or None for bytes."""
    path = cfg.model.get("name_or_path")
    return Tokenizer(path) if path and has_tokenizer(path) else None


def is_instruction_run(cfg: DictConfig) -> bool:
    """Whether the run trained on instruction examples: its data names a prompt or a chat column
    (data=table's prompt_key or messages_key, or any source's), or has a `template` key and no
    `text_key` (a source whose examples are always instructions)."""
    if cfg.data.get("prompt_key") or cfg.data.get("messages_key"):
        return True
    return "template" in cfg.data and "text_key" not in cfg.data


def model_dims(cfg: DictConfig) -> dict[str, int]:
    """What the model factory needs from the data, read from the config (as FederatedData.model_dims)."""
    if capability(cfg.data, "data", "data_kind") == "text":  # bytes, or the ids of the model's own tokenizer
        tokenizer = run_tokenizer(cfg)
        return {"vocab_size": tokenizer.vocab_size if tokenizer else VOCAB_SIZE, "seq_len": cfg.data.seq_len}
    return {"num_features": cfg.data.num_features, "num_classes": cfg.data.num_classes}


def _load_final(model: nn.Module, run: RunDir) -> None:
    path = run.path / "model.safetensors"
    if not path.is_file():
        raise FedrunError(f"run_dir: {run.path} has no finished model (model.safetensors); the run has not "
                          f"finished: use --round N with one of its checkpoints ({_rounds_text(run)})")
    tensors = load_file(str(path))
    # strict=False: a tied tensor is stored once, under its first name.
    result = model.load_state_dict(tensors, strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[name]) for name in tensors if name in params}
    unloaded = [name for name, p in model.named_parameters() if id(p) not in loaded]
    if result.unexpected_keys or unloaded:
        raise FedrunError(f"{path}: does not match the model of config.yaml (unexpected: "
                          f"{result.unexpected_keys or 'none'}; not stored: {unloaded or 'none'})")


def _load_round(model: nn.Module, run: RunDir, round_idx: int) -> None:
    path = run.checkpoints / f"round_{round_idx:04d}.pt"
    if not path.is_file():
        raise FedrunError(f"round: {run.path} has no checkpoint of round {round_idx}; available: {_rounds_text(run)}")
    weights = load_checkpoint(path)["weights"]
    flat = flatten_parameters(model)
    if weights.shape != flat.shape:
        raise FedrunError(f"{path}: holds {weights.numel()} weights, the model of config.yaml has {flat.numel()}")
    with torch.no_grad():
        flat.copy_(weights)


def available_rounds(run_dir: Path) -> list[int]:
    return sorted(int(p.stem.removeprefix("round_")) for p in (Path(run_dir) / "checkpoints").glob("round_*.pt"))


def _rounds_text(run: RunDir) -> str:
    rounds = available_rounds(run.path)
    return ", ".join(map(str, rounds)) if rounds else "none"


def _device(device: str | torch.device) -> torch.device:
    return config.resolve_device(device) if isinstance(device, str) else device


# ---- sampling ----------------------------------------------------------------------------

def printable(data: bytes) -> str:
    """Sampled bytes as text safe for a terminal: invalid UTF-8 (a byte-level model samples any
    byte) becomes U+FFFD, and control characters other than newline and tab are escaped (\\x1b),
    so that sampled escape sequences cannot drive the terminal."""
    text = data.decode("utf-8", "replace")
    return "".join(c if c in "\n\t" or unicodedata.category(c) != "Cc" else f"\\x{ord(c):02x}" for c in text)


@torch.inference_mode()
def generate(model: nn.Module, prompt: bytes, *, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, seed: int = 0, device: str | torch.device = "cpu") -> bytes:
    """`prompt` followed by `max_new_tokens` bytes sampled one at a time (temperature 0: greedy)."""
    if not prompt:
        raise FedrunError("prompt: give at least one byte to start from")
    if temperature < 0 or max_new_tokens < 0 or (top_k is not None and top_k < 1):
        raise FedrunError("temperature and max_new_tokens must be >= 0, top_k null or >= 1")
    return bytes(sample_ids(model, list(prompt), max_new_tokens=max_new_tokens, temperature=temperature,
                            top_k=top_k, seed=seed, device=device))


def generate_text(model: nn.Module, tokenizer: Tokenizer, prompt: bytes, **options) -> bytes:
    """As `generate`, for a model trained on its own tokenizer's ids: `max_new_tokens` tokens."""
    ids = tokenizer.encode(prompt)
    if not ids:
        raise FedrunError("prompt: give at least one byte to start from")
    return tokenizer.decode(sample_ids(model, ids, **options))


def generate_response(model: nn.Module, prompt: str, *, template: str | None, tokenizer: Tokenizer | None,
                      **options) -> bytes:
    """The response of a model trained on instruction examples to `prompt`: up to `max_new_tokens`
    tokens after the template's prompt part, ending before the EOS or the chat template's end of
    turn (which it stops at)."""
    ids = prompt_ids(prompt, template=template, tokenizer=tokenizer)
    ends = end_ids(template, tokenizer)
    new = up_to_end(sample_ids(model, ids, stops=ends, **options)[len(ids):], ends)
    text = bytes(new) if tokenizer is None else tokenizer.decode(new)
    tail = render(Instruction("", ""), template or DEFAULT_TEMPLATE)[1].encode()  # the template's after {response}
    return text[: len(text) - len(tail)] if tail and text.endswith(tail) else text


def sample_ids(model: nn.Module, ids: list[int], *, max_new_tokens: int, temperature: float = 1.0,
               top_k: int | None = None, seed: int = 0, device: str | torch.device = "cpu",
               stops: Sequence[int] = ()) -> list[int]:
    """`ids` followed by `max_new_tokens` sampled ids (or fewer, ending with one of `stops` once
    drawn), the context cropped to model.seq_len."""
    device = _device(device)
    model.eval()
    idx = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    generator = torch.Generator(device=device).manual_seed(seed)
    seq_len = cast(int, model.seq_len)  # every text model (tiny_gpt, lstm, hf) keeps its own
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            logits = model(idx[:, -seq_len:])[0, -1].float()  # (vocab,) at the last position
            token = next_token(logits, temperature, top_k, generator)
            idx = torch.cat([idx, token.view(1, 1)], dim=1)
            if int(token) in stops:
                break
    return idx[0].tolist()


def next_token(logits: torch.Tensor, temperature: float, top_k: int | None,
               generator: torch.Generator) -> torch.Tensor:
    """One token id from (vocab,) logits."""
    if temperature == 0:
        return logits.argmax()
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[0]


# ---- evaluation on other data ------------------------------------------------------------

def evaluate_run(run_dir: Path, overrides: list[str], *, round: int | None = None,
                 device: str | torch.device = "auto") -> dict:
    """eval_loss/ppl/acc of a saved global model on the test examples of a data set, and its fingerprint.

    Supported overrides: `data=OPTION` (a fresh data node from conf/, with the run's seed),
    `data.KEY=VALUE` and `seed=VALUE`; with none, the run's own data. A run's canaries
    (audit=canaries) are not planted again.
    """
    model, run_cfg = load_model(run_dir, round=round, device=device)
    cfg = with_data_overrides(run_cfg, overrides)
    if model_dims(cfg).keys() != model_dims(run_cfg).keys():
        raise FedrunError("data: the run's model was trained on another kind of data (text vs labelled)")
    if "seq_len" in cfg.data and cfg.data.seq_len > model.seq_len:
        raise FedrunError(f"data.seq_len: {cfg.data.seq_len} is longer than the model's context "
                          f"({model.seq_len}); allowed: at most {model.seq_len}")
    data = config.build_data(cfg)
    metrics = evaluate(model, data.test_examples(), next(model.parameters()).device)
    return {**metrics, "data": data.fingerprint}


def with_data_overrides(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """The run's config with its data (and seed) replaced as the overrides say, validated."""
    for o in overrides:
        key = o.split("=", 1)[0]
        if "=" not in o or not (key in ("data", "seed") or key.startswith("data.")):
            raise FedrunError(f"{o}: not supported here; allowed: data=OPTION, data.KEY=VALUE, seed=VALUE")
    config.check_overrides(overrides)
    cfg = cast(DictConfig, OmegaConf.create(OmegaConf.to_container(cfg)))  # a mapping's container is a dict
    choice = [o for o in overrides if o.startswith("data=")]
    dotted = [o for o in overrides if not o.startswith("data=")]
    if choice:
        # A group choice needs Hydra's defaults list: compose a fresh config and take its data.
        fresh = config.compose(choice[-1:] + [o for o in dotted if o.startswith("data.")], check_ranges=False)
        cfg.data = fresh.data
    try:
        cfg = cast(DictConfig, OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotted)))  # a mapping merged stays one
    except OmegaConfBaseException as e:
        raise FedrunError(f"overrides: {e}") from e
    cfg = config.typed(cfg)  # unknown keys and wrong types, one line each, as `fedrun train` refuses them
    config.validate(cfg)
    return cfg
