"""W4's model in transformers and peft alone: the frozen base and its LoRA adapters (Hu et al.
2021, "LoRA: Low-Rank Adaptation of Large Language Models"), built as fedrun's `model=hf` builds
them, so that the floor and Flower start from fedrun's weights without running fedrun.

A model is described by a plain dict (`spec`): `from_config` (the base's config keys, with
`model_type`), `vocab_size`, `seq_len`, `init_seed` (the base is drawn under it) and `lora` (r,
alpha, dropout, target_modules). Nothing here downloads: the base is either drawn from its
config or read from a local directory (`from_directory`, as Flower's FlowerTune client loads
its base for each call).
"""
from __future__ import annotations

import os

import torch
from torch import nn

# peft's defaults for these architectures (fedrun.models.hf spells out the same ones).
DEFAULT_TARGET_MODULES = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}


def _offline() -> None:
    """Forbid the hub before transformers is imported: weights are never downloaded."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def base_model(spec: dict) -> nn.Module:
    """The randomly initialised base, drawn under `init_seed` whatever the caller's RNG."""
    _offline()
    from transformers import AutoConfig, AutoModelForCausalLM

    options = dict(spec["from_config"])
    model_type = options.pop("model_type")
    options["vocab_size"] = spec["vocab_size"]
    for special in ("bos_token_id", "eos_token_id", "pad_token_id"):  # bytes have no special tokens
        options.setdefault(special, None)
    options["n_positions" if model_type == "gpt2" else "max_position_embeddings"] = spec["seq_len"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec["init_seed"])
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **options), dtype=torch.float32)


def from_directory(path: str) -> nn.Module:
    """A base saved with `save_pretrained`, read from local disk only."""
    _offline()
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)


def with_lora(base: nn.Module, spec: dict) -> nn.Module:
    """`base` frozen, with trainable adapters on the target modules; they are drawn from the
    caller's RNG (peft's init: B = 0, A random)."""
    import peft
    from transformers.pytorch_utils import Conv1D

    lora = spec["lora"]
    targets = lora.get("target_modules") or DEFAULT_TARGET_MODULES[base.config.model_type]
    # GPT-2's Conv1D stores its weight as (in, out): peft must know to transpose.
    conv1d = any(isinstance(m, Conv1D) and name.split(".")[-1] in targets for name, m in base.named_modules())
    config = peft.LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                             target_modules=list(targets), fan_in_fan_out=conv1d, task_type="CAUSAL_LM")
    return peft.get_peft_model(base, config)


class CausalLM(nn.Module):
    """A PEFT model as the plain (B, T) ids -> (B, T, vocab_size) logits module that
    `benchmarks.bare` trains and evaluates (the attribute is named `model`, as in fedrun's
    HFCausalLM, so parameter names agree)."""

    def __init__(self, model: nn.Module, vocab_size: int):
        super().__init__()
        self.model, self.vocab_size = model, vocab_size

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=idx, use_cache=False).logits  # (B, T, V_model)
        return logits[..., : self.vocab_size]


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights under peft's names (what FlowerTune sends), detached copies."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
