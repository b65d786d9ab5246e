"""Hugging Face causal language models for fedrun, optionally with LoRA adapters (peft).

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") freezes the base
weights W and trains a low-rank update W + (alpha / r) B A. Only `requires_grad` parameters go
into fedrun's flat vector, so with LoRA on, clients train, send and aggregate the adapters only.

Averaging the factors separately (mean B)(mean A) is not the average of the updates mean(B A);
`lora_aggregation_error` measures that gap (Sun et al. 2024, "Improving LoRA in
Privacy-preserving Federated Learning", FFA-LoRA; Wang et al. 2024, FLoRA).

`lora.aggregation` picks how the factors are combined: `avg` averages A and B separately
(FedIT); `ffa` (FFA-LoRA) keeps every A frozen at its seeded initialisation, the same in every
worker, so that only B trains and travels and the mean of B_i A is exactly mean(B_i) A.

Text is read in the checkpoint's own tokenizer when its folder has one (fedrun.data.text.Tokenizer),
else as bytes (vocabulary 256: they index a larger checkpoint's first 256 ids, and the logits
are cut to the first `vocab_size` ids). Weights are never downloaded: `name_or_path` must be a
local directory.
"""
from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import torch
from torch import nn

from fedrun.components import LocalPath, OneOf, Range
from fedrun.core import FedrunError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# model.lora.aggregation: `avg` (FedIT: A and B averaged apart), `ffa` (FFA-LoRA: A frozen, B alone),
# `fedsa` (FedSA-LoRA: A averaged, B kept by each client; fedrun/lora/fedsa.py), `flexlora`
# (FlexLoRA: the rank-r SVD of the clients' mean product; fedrun/lora/flexlora.py), `flora`
# (FLoRA: the exact mean product merged into the adapted base weights; fedrun/lora/flora.py),
# `hetlora` (HetLoRA: zero-padded, sparsity-weighted average of mixed-rank factors; fedrun/lora/hetlora.py).
AGGREGATIONS = ("avg", "ffa", "fedsa", "flora", "flexlora", "hetlora")
# peft's defaults for these architectures, spelled out so a peft upgrade cannot change a run.
DEFAULT_TARGET_MODULES = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}


@dataclass(frozen=True)
class LoRAConfig:
    """`model.lora`: the adapters peft adds to the frozen base."""

    enabled: bool  # false: full fine-tuning, every weight trained and sent
    r: Annotated[int, Range(ge=1)]
    alpha: Annotated[int, Range(ge=1)]
    dropout: Annotated[float, Range(ge=0, lt=1)]
    target_modules: list[str] | None = None  # None: DEFAULT_TARGET_MODULES of the model type
    aggregation: Annotated[str, OneOf(*AGGREGATIONS)] = "avg"  # how clients' factors combine

    @classmethod
    def of(cls, value: LoRAConfig | Mapping[str, Any]) -> LoRAConfig:
        """The record itself, or one made from the config node Hydra passes (or a plain dict)."""
        if isinstance(value, LoRAConfig):
            return value
        plain = dict(_plain(value))
        if plain.get("target_modules") is not None:
            plain["target_modules"] = list(plain["target_modules"])
        return cls(**plain)


def _offline() -> None:
    """Forbid the hub before transformers is imported: fedrun never downloads weights."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # fedrun's output is its own
    # peft asks transformers 5 a deprecated question on every model it wraps: not the user's concern.
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _plain(value: Any) -> Any:
    """A Hydra DictConfig/ListConfig as plain dicts and lists; anything else unchanged."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


class HFCausalLM(nn.Module):
    """A transformers causal LM: (B, T) int64 token ids -> (B, T, vocab_size) logits.

    The base is built under a private RNG seeded with `init_seed`, so every worker and the
    global model hold the same frozen base whatever the caller's RNG; LoRA adapters are then
    drawn from the caller's RNG (peft's init: B = 0, so the adapted model starts as the base).
    """

    def __init__(self, *, vocab_size: int, seq_len: int, name_or_path: LocalPath | None,
                 from_config: dict | None, lora: LoRAConfig, init_seed: int):
        super().__init__()
        _offline()
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        from_config, lora = _plain(from_config), LoRAConfig.of(lora)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            base = _load_base(name_or_path, from_config, vocab_size=vocab_size, seq_len=seq_len)
        self.name_or_path = name_or_path  # None: the base is built from `from_config`, with no checkpoint
        self.lora_enabled = bool(lora.enabled)
        self.lora_aggregation = lora.aggregation if self.lora_enabled else None
        if not self.lora_enabled:
            self.model: Any = base  # a transformers model, or peft's (untyped) wrapper of one
        elif lora.aggregation == "ffa":  # A is never sent: every worker must draw the same one
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(init_seed + 1)
                self.model = _with_lora(base, lora)
            for _, a, _ in lora_pairs(self.model):
                a.requires_grad_(False)
        else:
            self.model = _with_lora(base, lora)
        if self.lora_aggregation == "flora":  # the adapted weights change at the server: they travel, never train
            for module in lora_layers(self.model):
                weight = module.base_layer.weight
                weight.requires_grad_(True)
                weight.register_hook(torch.zeros_like)  # clients train the adapters alone

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, vocab_size) logits."""
        logits = self.model(input_ids=idx, use_cache=False).logits  # (B, T, V_model)
        return logits[..., : self.vocab_size]

    def save_adapter(self, path: Path) -> None:
        """peft's `save_pretrained` layout: `PeftModel.from_pretrained(base, path)` loads it.

        Without LoRA this writes the whole model in transformers' layout instead."""
        if self.lora_aggregation == "flora":  # the learnt update is merged in the base: save the whole model
            merged = copy.deepcopy(self.model).merge_and_unload()
            state = {k: v.detach().clone() for k, v in merged.state_dict().items()}  # safetensors: no shared storage
            merged.save_pretrained(str(path), state_dict=state)
            return
        if self.lora_enabled and self.name_or_path is None:  # adapters need a base to load onto: write it too
            self._save_with_base(Path(path))
            return
        if self.lora_enabled:  # peft copies the adapters itself
            self.model.save_pretrained(str(path))
            return
        # fedrun's flat buffer makes every parameter a view of one storage: safetensors needs copies.
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model.save_pretrained(str(path), state_dict=state)


    def _save_with_base(self, path: Path) -> None:
        """A base built from `model.from_config` exists nowhere else: its weights go to `path/base`
        (transformers' layout), and the adapters' config names that folder as their base."""
        base = copy.deepcopy(self.model).unload()  # the frozen base, without the LoRA layers
        state = {k: v.detach().clone() for k, v in base.state_dict().items()}  # safetensors: no shared storage
        base.save_pretrained(str(path / "base"), state_dict=state)
        config = self.model.peft_config["default"]
        config.base_model_name_or_path = str((path / "base").resolve())
        try:
            self.model.save_pretrained(str(path))
        finally:
            config.base_model_name_or_path = None


def _load_base(name_or_path: str | None, from_config: dict | None, *, vocab_size: int,
               seq_len: int) -> PreTrainedModel:
    if (name_or_path is None) == (from_config is None):
        raise FedrunError("model: set exactly one of model.name_or_path and model.from_config")
    from transformers import AutoConfig, AutoModelForCausalLM

    if name_or_path is not None:
        return _pretrained(name_or_path, vocab_size=vocab_size, seq_len=seq_len)
    assert from_config is not None  # exactly one of the two, checked above
    options = dict(from_config)
    model_type = options.pop("model_type", None)
    options["vocab_size"] = vocab_size
    for special in ("bos_token_id", "eos_token_id", "pad_token_id"):  # bytes have no special tokens
        options.setdefault(special, None)
    options["n_positions" if model_type == "gpt2" else "max_position_embeddings"] = seq_len
    try:
        config = AutoConfig.for_model(model_type, **options)
    except (ValueError, TypeError) as e:
        raise FedrunError(f"model.from_config: {e}") from None
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _pretrained(name_or_path: str, *, vocab_size: int, seq_len: int) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    if not Path(name_or_path).is_dir():
        raise FedrunError(f"model.name_or_path: directory not found: {name_or_path}; "
                          "fedrun never downloads weights")
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch.float32, local_files_only=True)
    except (OSError, ValueError) as e:
        raise FedrunError(f"model.name_or_path: cannot load {name_or_path}: {e}") from None
    config = model.config
    if config.vocab_size < vocab_size:
        raise FedrunError(f"model.name_or_path: vocabulary of {config.vocab_size} < {vocab_size} byte tokens")
    positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if positions is not None and positions < seq_len:
        raise FedrunError(f"model.name_or_path: {positions} positions < data.seq_len={seq_len}")
    return model


def _with_lora(base: PreTrainedModel, lora: LoRAConfig) -> nn.Module:
    """Freeze `base` and add trainable adapters to the target modules (peft)."""
    import peft
    from transformers.pytorch_utils import Conv1D

    targets = lora.target_modules or DEFAULT_TARGET_MODULES.get(base.config.model_type)
    if targets is None:
        raise FedrunError(f"model.lora.target_modules: no default for model_type "
                          f"{base.config.model_type!r}; list the module names to adapt")
    # GPT-2's Conv1D stores its weight as (in, out): peft must know to transpose.
    conv1d = any(isinstance(m, Conv1D) and name.split(".")[-1] in targets for name, m in base.named_modules())
    config = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=list(targets), fan_in_fan_out=conv1d, task_type="CAUSAL_LM")
    try:
        return peft.get_peft_model(base, config)
    except ValueError as e:
        raise FedrunError(f"model.lora.target_modules: {e}") from None


def lora_layers(model: nn.Module) -> list[Any]:
    """peft's LoRA layers of `model` (untyped: mypy would see nn.Module's attributes, not their adapters)."""
    from peft.tuners.lora import LoraLayer

    return [module for module in model.modules() if isinstance(module, LoraLayer)]


def lora_pairs(model: nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(module name, A, B) for every LoRA adapter in `model`: A (r, in), B (out, r)."""
    from peft.tuners.lora import LoraLayer

    pairs: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            layer: Any = module  # peft is untyped: mypy sees nn.Module's attributes, not its adapters
            for adapter in layer.lora_A:
                pairs.append((f"{name}.{adapter}", layer.lora_A[adapter].weight, layer.lora_B[adapter].weight))
    return pairs


def lora_aggregation_error(client_vectors: Sequence[torch.Tensor], model: nn.Module, *,
                           weights: Sequence[float] | None = None) -> float:
    """Mean over layers of ||mean_i(B_i A_i) - mean(B_i) mean(A_i)||_F / ||mean_i(B_i A_i)||_F.

    `client_vectors` are the clients' adapter weights (not deltas) as flat vectors in the order
    of `[p for p in model.parameters() if p.requires_grad]`; a factor that does not train (A
    under `ffa`) is the model's own, the same for every client. Clients count equally unless
    `weights` is given. A layer whose mean product is zero counts 0 (or inf if the gap is not)."""
    offsets = trainable_offsets(model)
    w = torch.tensor(weights if weights is not None else [1.0] * len(client_vectors), dtype=torch.float64)
    w = (w / w.sum()).view(-1, 1, 1)  # (N, 1, 1)
    errors = []
    for _, a, b in lora_pairs(model):
        a_i = torch.stack([_factor(v, offsets, a) for v in client_vectors])  # (N, r, in)
        b_i = torch.stack([_factor(v, offsets, b) for v in client_vectors])  # (N, out, r)
        exact = (w * (b_i @ a_i)).sum(0)  # (out, in)
        gap = torch.linalg.matrix_norm(exact - (w * b_i).sum(0) @ (w * a_i).sum(0))
        norm = torch.linalg.matrix_norm(exact)
        errors.append(float(gap / norm) if norm > 0 else (0.0 if gap == 0 else float("inf")))
    return sum(errors) / len(errors)


def trainable_offsets(model: nn.Module) -> dict[int, int]:
    """id(parameter) -> its offset in the flat vector of trainable parameters."""
    offsets, offset = {}, 0
    for p in model.parameters():
        if p.requires_grad:
            offsets[id(p)] = offset
            offset += p.numel()
    return offsets


def _factor(vector: torch.Tensor, offsets: dict[int, int], factor: torch.Tensor) -> torch.Tensor:
    """A client's value of `factor` (float64): its slice of the client's vector, or the model's
    own value when the factor does not train."""
    if id(factor) not in offsets:
        return factor.detach().to(torch.float64)
    offset = offsets[id(factor)]
    return vector[offset : offset + factor.numel()].view(factor.shape).to(torch.float64)
