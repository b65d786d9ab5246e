"""Structured-config schemas: the type of every config key, and no values (those live in conf/).

Each option of a config group declares its schema in its YAML defaults list
(`- /schema/<group>/<name>@_here_`), so a wrong type fails at composition, naming the key.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class TextDataSchema:
    _target_: str = MISSING
    seq_len: int = MISSING
    test_fraction: float = MISSING
    min_samples: int = MISSING
    partition: str = MISSING
    num_clients: Optional[int] = MISSING
    max_client_bytes: Optional[int] = MISSING
    cache: bool = MISSING


@dataclass
class ShakespeareSchema(TextDataSchema):
    path: str = MISSING


@dataclass
class PyStdlibSchema(TextDataSchema):
    root: Optional[str] = MISSING


@dataclass
class SyntheticSchema:
    _target_: str = MISSING
    alpha: float = MISSING
    beta: float = MISSING
    num_clients: int = MISSING
    num_features: int = MISSING
    num_classes: int = MISSING
    iid: bool = MISSING
    partition: str = MISSING
    dirichlet_alpha: float = MISSING
    size_skew: float = MISSING
    test_fraction: float = MISSING
    max_client_examples: Optional[int] = MISSING
    cache: bool = MISSING


@dataclass
class MLPSchema:
    _target_: str = MISSING
    hidden: int = MISSING


@dataclass
class LoRASchema:
    enabled: bool = MISSING
    r: int = MISSING
    alpha: int = MISSING
    dropout: float = MISSING
    target_modules: Optional[list[str]] = MISSING


@dataclass
class HFSchema:
    _target_: str = MISSING
    name_or_path: Optional[str] = MISSING
    from_config: Optional[Any] = MISSING
    lora: LoRASchema = MISSING
    init_seed: int = MISSING


@dataclass
class TinyGPTSchema:
    _target_: str = MISSING
    n_layer: int = MISSING
    n_head: int = MISSING
    n_embd: int = MISSING
    dropout: float = MISSING


@dataclass
class LSTMSchema:
    _target_: str = MISSING
    embed_dim: int = MISSING
    hidden_size: int = MISSING
    num_layers: int = MISSING


@dataclass
class ClientSchema:
    optimizer: str = MISSING
    lr: float = MISSING
    momentum: float = MISSING
    weight_decay: float = MISSING
    batch_size: int = MISSING
    local_epochs: Optional[int] = MISSING
    local_steps: Optional[int] = MISSING
    local_steps_min: Optional[int] = MISSING
    local_steps_max: Optional[int] = MISSING
    models: Optional[Any] = MISSING


@dataclass
class SamplerSchema:
    _target_: str = MISSING
    kind: str = MISSING
    clients_per_round: int = MISSING
    dropout: float = MISSING


@dataclass
class FedAvgMSchema:
    _target_: str = MISSING
    server_lr: float = MISSING
    momentum: float = MISSING


@dataclass
class FedOptSchema:
    _target_: str = MISSING
    server_lr: float = MISSING
    beta1: float = MISSING
    beta2: float = MISSING
    tau: float = MISSING


@dataclass
class FedProxSchema:
    _target_: str = MISSING
    mu: float = MISSING


@dataclass
class ScaffoldSchema:
    _target_: str = MISSING
    server_lr: float = MISSING


@dataclass
class FedDFSchema:
    _target_: str = MISSING
    temperature: float = MISSING
    distill_steps: int = MISSING
    distill_lr: float = MISSING
    distill_batch: int = MISSING
    eval_every: int = MISSING
    public: Any = MISSING


@dataclass
class FedDistillSchema:
    _target_: str = MISSING
    aggregation: str = MISSING
    era_temperature: float = MISSING
    temperature: float = MISSING
    public_batch: int = MISSING
    digest_steps: int = MISSING
    digest_batch: int = MISSING
    digest: str = MISSING
    topk_logits: Optional[int] = MISSING
    eval_clients: int = MISSING
    public: Any = MISSING


@dataclass
class ProcessBackendSchema:
    _target_: str = MISSING
    workers: Optional[int] = MISSING
    vectorized: bool = MISSING


@dataclass
class RayBackendSchema:
    _target_: str = MISSING
    workers: Optional[int] = MISSING
    address: Optional[str] = MISSING
    num_cpus_per_worker: float = MISSING


@dataclass
class VectorizedBackendSchema:
    _target_: str = MISSING
    max_clients: Optional[int] = MISSING


@dataclass
class TrimmedMeanSchema:
    _target_: str = MISSING
    trim: float = MISSING


@dataclass
class KrumSchema:
    _target_: str = MISSING
    num_byzantine: int = MISSING
    multi: int = MISSING


@dataclass
class PoisoningSchema:
    _target_: str = MISSING
    kind: str = MISSING
    fraction: float = MISSING
    scale: float = MISSING


@dataclass
class TargetOnlySchema:
    """For options with no settings of their own (fedavg, privacy none, sequential)."""

    _target_: str = MISSING


@dataclass
class CentralPrivacySchema:
    _target_: str = MISSING
    clip_norm: float = MISSING
    noise_multiplier: Optional[float] = MISSING
    target_epsilon: Optional[float] = MISSING
    delta: Optional[float] = MISSING
    accountant: str = MISSING
    stop_at_budget: bool = MISSING
    adaptive: bool = MISSING
    target_quantile: float = MISSING
    clip_lr: float = MISSING
    clip_count_stddev: Optional[float] = MISSING
    secure_agg: bool = MISSING
    secagg_bits: Optional[int] = MISSING
    secagg_threshold: float = MISSING
    secagg_min_clients: int = MISSING
    log_client_stats: bool = MISSING
    noise_source: str = MISSING


@dataclass
class SecureAggSchema:
    _target_: str = MISSING
    secagg_range: float = MISSING
    secagg_bits: Optional[int] = MISSING
    secagg_threshold: float = MISSING
    secagg_min_clients: int = MISSING
    log_client_stats: bool = MISSING
    noise_source: str = MISSING


@dataclass
class LocalPrivacySchema:
    _target_: str = MISSING
    max_grad_norm: float = MISSING
    noise_multiplier: float = MISSING
    delta: float = MISSING
    accountant: str = MISSING
    noise_source: str = MISSING


@dataclass
class CanariesSchema:
    _target_: str = MISSING
    num_canaries: int = MISSING
    repeats: int = MISSING
    num_references: int = MISSING
    secret_digits: int = MISSING


@dataclass
class TopKSchema:
    _target_: str = MISSING
    fraction: float = MISSING


@dataclass
class QuantizeSchema:
    _target_: str = MISSING
    bits: int = MISSING


@dataclass
class ConfigSchema:
    name: str = MISSING
    rounds: int = MISSING
    seed: int = MISSING
    device: str = MISSING
    run_dir: str = MISSING
    eval_every: int = MISSING
    checkpoint_every: int = MISSING
    checkpoint_keep: Optional[int] = MISSING
    objective: str = MISSING
    data: Any = MISSING
    model: Any = MISSING
    client: ClientSchema = MISSING
    sampler: Any = MISSING
    strategy: Any = MISSING
    privacy: Any = MISSING
    backend: Any = MISSING
    attack: Any = MISSING
    audit: Any = MISSING
    logger: Any = MISSING
    compression: Any = MISSING


SCHEMAS = {
    "data": {"shakespeare": ShakespeareSchema, "pystdlib": PyStdlibSchema, "synthetic": SyntheticSchema},
    "model": {"tiny_gpt": TinyGPTSchema, "lstm": LSTMSchema, "logreg": TargetOnlySchema, "mlp": MLPSchema,
              "hf": HFSchema},
    "client": {"default": ClientSchema},
    "sampler": {"default": SamplerSchema},
    "strategy": {"fedavg": TargetOnlySchema, "fedavgm": FedAvgMSchema, "fedopt": FedOptSchema,
                 "fedprox": FedProxSchema, "scaffold": ScaffoldSchema, "median": TargetOnlySchema,
                 "trimmed_mean": TrimmedMeanSchema, "krum": KrumSchema, "feddf": FedDFSchema,
                 "fed_distill": FedDistillSchema},
    "privacy": {"none": TargetOnlySchema, "central": CentralPrivacySchema, "secure_agg": SecureAggSchema,
                "local": LocalPrivacySchema},
    "backend": {"sequential": TargetOnlySchema, "process": ProcessBackendSchema, "ray": RayBackendSchema,
                "vectorized": VectorizedBackendSchema},
    "attack": {"none": TargetOnlySchema, "poisoning": PoisoningSchema},
    "audit": {"none": TargetOnlySchema, "canaries": CanariesSchema},
    "compression": {"none": TargetOnlySchema, "topk": TopKSchema, "quantize": QuantizeSchema},
}


def register_schemas() -> None:
    store = ConfigStore.instance()
    store.store(name="fedrun_schema", node=ConfigSchema)
    for group, options in SCHEMAS.items():
        for option, schema in options.items():
            store.store(group=f"schema/{group}", name=option, node=schema)
