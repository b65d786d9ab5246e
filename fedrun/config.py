"""Configuration: locate conf/, compose it with overrides, validate it, build the run.

Defaults live once, in the YAML under conf/. The dataclasses in fedrun/schemas.py give every
key its type (so `rounds=abc` fails at composition, naming the key) and hold no values.
Range checks that types cannot express live in RULES. `build` is the one place that
instantiates objects from the config.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import os
import re
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.errors import (ConfigCompositionException, InstantiationException, MissingConfigException,
                          OverrideParseException)
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedrun.client import OPTIMIZERS, ClientConfig, LocalTrainer
from fedrun.core import FedrunError
from fedrun.attacks import KINDS as ATTACK_KINDS
from fedrun.data.examples import FederatedData
from fedrun.privacy.accounting import ACCOUNTANTS
from fedrun.data.synthetic import PARTITIONS as SYNTHETIC_PARTITIONS
from fedrun.data.text import PARTITIONS, Tokenizer, has_tokenizer
from fedrun.sampling import KINDS as SAMPLER_KINDS
from fedrun.loop import Experiment
from fedrun.schemas import SCHEMAS, register_schemas  # noqa: F401  (SCHEMAS: re-exported for tests)

DEVICES = ("auto", "cpu", "cuda")


def conf_dir() -> Path:
    """conf/ beside the package (a source checkout or editable install), or $FEDRUN_CONF."""
    path = Path(os.environ.get("FEDRUN_CONF") or Path(__file__).resolve().parents[1] / "conf")
    if not (path / "config.yaml").is_file():
        raise FedrunError(f"FEDRUN_CONF: no config.yaml in {path}; point FEDRUN_CONF at fedrun's conf/ folder")
    return path


# ---- range rules: (key, allowed values as words, predicate) --------------------------------

def _opt(pred: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or pred(v)


def _one_of(options: tuple[str, ...]) -> tuple[str, Callable[[Any], bool]]:
    return "one of " + ", ".join(options), lambda v: v in options


RULES: list[tuple[str, str, Callable[[Any], bool]]] = [
    ("device", *_one_of(DEVICES)),
    ("objective", *_one_of(("eval_loss", "eval_ppl", "eval_acc"))),
    ("client.optimizer", *_one_of(OPTIMIZERS)),
    ("rounds", "an integer >= 1", lambda v: v >= 1),
    ("eval_every", "an integer >= 1", lambda v: v >= 1),
    ("checkpoint_every", "an integer >= 1", lambda v: v >= 1),
    ("checkpoint_keep", "null or an integer >= 1", _opt(lambda v: v >= 1)),
    ("data.seq_len", "an integer >= 1", lambda v: v >= 1),
    ("data.test_fraction", "a number in [0, 1)", lambda v: 0 <= v < 1),
    ("data.min_samples", "an integer >= 1", lambda v: v >= 1),
    ("data.num_clients", "null or an integer >= 1", _opt(lambda v: v >= 1)),
    ("data.alpha", "a number >= 0", lambda v: v >= 0),
    ("data.beta", "a number >= 0", lambda v: v >= 0),
    ("data.num_features", "an integer >= 1", lambda v: v >= 1),
    ("data.num_classes", "an integer >= 2", lambda v: v >= 2),
    ("data.dirichlet_alpha", "a number > 0", lambda v: v > 0),
    ("data.size_skew", "a number >= 0", lambda v: v >= 0),
    ("model.hidden", "an integer >= 1", lambda v: v >= 1),
    ("model.lora.r", "an integer >= 1", lambda v: v >= 1),
    ("model.lora.alpha", "an integer >= 1", lambda v: v >= 1),
    ("model.lora.dropout", "a number in [0, 1)", lambda v: 0 <= v < 1),
    ("data.max_client_bytes", "null or an integer >= 2", _opt(lambda v: v >= 2)),
    ("model.n_layer", "an integer >= 1", lambda v: v >= 1),
    ("model.n_head", "an integer >= 1", lambda v: v >= 1),
    ("model.n_embd", "a positive multiple of model.n_head", lambda v: v >= 1),
    ("model.dropout", "a number in [0, 1)", lambda v: 0 <= v < 1),
    ("model.embed_dim", "an integer >= 1", lambda v: v >= 1),
    ("model.hidden_size", "an integer >= 1", lambda v: v >= 1),
    ("model.num_layers", "an integer >= 1", lambda v: v >= 1),
    ("client.lr", "a number > 0", lambda v: v > 0),
    ("client.momentum", "a number in [0, 1)", lambda v: 0 <= v < 1),
    ("client.weight_decay", "a number >= 0", lambda v: v >= 0),
    ("client.batch_size", "an integer >= 1", lambda v: v >= 1),
    ("client.local_epochs", "null or an integer >= 1", _opt(lambda v: v >= 1)),
    ("client.local_steps", "null or an integer >= 1", _opt(lambda v: v >= 1)),
    ("client.local_steps_min", "null or an integer >= 1", _opt(lambda v: v >= 1)),
    ("client.local_steps_max", "null or an integer >= 1", _opt(lambda v: v >= 1)),
    ("sampler.kind", *_one_of(SAMPLER_KINDS)),
    ("sampler.clients_per_round", "an integer >= 1", lambda v: v >= 1),
    ("sampler.dropout", "a number in [0, 1)", lambda v: 0 <= v < 1),
    ("strategy.server_lr", "a number > 0", lambda v: v > 0),
    ("strategy.momentum", "a number in [0, 1)", lambda v: 0 <= v < 1),
    ("strategy.beta1", "a number in [0, 1)", lambda v: 0 <= v < 1),
    ("strategy.beta2", "a number in [0, 1)", lambda v: 0 <= v < 1),
    ("strategy.tau", "a number > 0", lambda v: v > 0),
    ("strategy.mu", "a number >= 0", lambda v: v >= 0),
    ("strategy.trim", "a number in [0, 0.5)", lambda v: 0 <= v < 0.5),
    ("strategy.num_byzantine", "an integer >= 0", lambda v: v >= 0),
    ("strategy.multi", "an integer >= 1", lambda v: v >= 1),
    ("attack.kind", *_one_of(ATTACK_KINDS)),
    ("privacy.clip_norm", "a number > 0", lambda v: v > 0),
    ("privacy.noise_multiplier", "null (calibrate from privacy.target_epsilon) or a number >= 0", _opt(lambda v: v >= 0)),
    ("privacy.target_epsilon", "null or a number > 0", _opt(lambda v: v > 0)),
    ("privacy.delta", "null or a number in (0, 1)", _opt(lambda v: 0 < v < 1)),
    ("privacy.accountant", *_one_of(ACCOUNTANTS)),
    ("privacy.target_quantile", "a number in [0, 1]", lambda v: 0 <= v <= 1),
    ("privacy.clip_lr", "a number >= 0", lambda v: v >= 0),
    ("privacy.clip_count_stddev", "null or a number > 0", _opt(lambda v: v > 0)),
    ("privacy.secagg_bits", "an integer in [1, 31]", lambda v: 1 <= v <= 31),
    ("privacy.max_grad_norm", "a number > 0", lambda v: v > 0),
    ("compression.fraction", "a number in (0, 1]", lambda v: 0 < v <= 1),
    ("compression.bits", "an integer in [1, 16]", lambda v: 1 <= v <= 16),
    ("audit.num_canaries", "an integer >= 1", lambda v: v >= 1),
    ("audit.repeats", "an integer >= 1", lambda v: v >= 1),
    ("audit.num_references", "an integer >= 1", lambda v: v >= 1),
    ("audit.secret_digits", "an integer in [1, 18]", lambda v: 1 <= v <= 18),
    ("privacy.secagg_threshold", "a number in (0, 1]", lambda v: 0 < v <= 1),
    ("attack.fraction", "a number in [0, 1]", lambda v: 0 <= v <= 1),
]


def validate(cfg: DictConfig) -> None:
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise FedrunError(f"{missing[0]}: no value given; set it on the command line, e.g. {missing[0]}=...")
    for key, allowed, ok in RULES:
        value = OmegaConf.select(cfg, key, default="__absent__")
        if value != "__absent__" and not ok(value):
            raise FedrunError(f"{key}: {value!r} is not allowed; allowed: {allowed}")
    if "n_head" in cfg.model and cfg.model.n_embd % cfg.model.n_head:
        raise FedrunError(f"model.n_embd: {cfg.model.n_embd} is not a multiple of model.n_head={cfg.model.n_head}")
    _check_combinations(cfg)


def _check_combinations(cfg: DictConfig) -> None:
    """Rules that tie several keys together."""
    partitions = SYNTHETIC_PARTITIONS if cfg.data._target_.endswith(".synthetic") else PARTITIONS
    if cfg.data.partition not in partitions:
        raise FedrunError(f"data.partition: {cfg.data.partition!r} is not allowed; allowed: one of {', '.join(partitions)}")
    c = cfg.client
    if (c.local_steps_min is None) != (c.local_steps_max is None):
        raise FedrunError("client.local_steps_max: set both client.local_steps_min and client.local_steps_max, or neither")
    if c.local_steps_min is not None and c.local_steps_min > c.local_steps_max:
        raise FedrunError(f"client.local_steps_min: {c.local_steps_min} is more than client.local_steps_max={c.local_steps_max}")
    if (cfg.client.local_epochs is None) == (cfg.client.local_steps is None):
        raise FedrunError("client.local_steps: set exactly one of client.local_epochs and client.local_steps "
                          f"(got local_epochs={cfg.client.local_epochs}, local_steps={cfg.client.local_steps})")
    if cfg.strategy._target_.endswith(".scaffold") and (c.optimizer != "sgd" or c.momentum):
        raise FedrunError(f"client.optimizer: strategy=scaffold needs plain local SGD (client.optimizer=sgd, "
                          f"client.momentum=0; got {c.optimizer}, momentum {c.momentum}): its control variates assume it")
    _check_privacy(cfg)
    f = cfg.strategy.get("num_byzantine")
    if f is not None and cfg.sampler.clients_per_round < 2 * f + 3:
        raise FedrunError(f"sampler.clients_per_round: krum with strategy.num_byzantine={f} needs at least "
                          f"2 * {f} + 3 = {2 * f + 3} clients per round, got {cfg.sampler.clients_per_round}")


ROBUST = (".median", ".trimmed_mean", ".krum", ".feddf")  # need the individual client updates


def _check_privacy(cfg: DictConfig) -> None:
    """Refuse combinations that would void the guarantee or that a mechanism cannot serve."""
    p = cfg.privacy
    if "clip_norm" not in p:
        return
    if p.noise_multiplier is None and p.target_epsilon is None:
        raise FedrunError("privacy.noise_multiplier: null means calibrate it from privacy.target_epsilon, "
                          "which is not set; give one of them")
    dp = p.noise_multiplier is None or p.noise_multiplier > 0
    what = "privacy=central_dp" if dp else "privacy.secure_agg"
    if dp and cfg.sampler.kind != "poisson":
        raise FedrunError(f"sampler.kind: {what} needs sampler.kind=poisson: its accountants assume each client "
                          f"is sampled independently with rate q; got {cfg.sampler.kind}")
    target = cfg.strategy._target_
    if target.endswith(ROBUST):
        raise FedrunError(f"strategy: {target.rsplit('.', 1)[-1]} cannot be combined with {what}: it needs the "
                          "individual client updates, which DP noise and secure aggregation hide; use fedavg, "
                          "fedavgm or an adaptive strategy")
    if target.endswith(".scaffold"):
        raise FedrunError(f"strategy: scaffold cannot be combined with {what}: its control variates would leave the "
                          "clients unclipped and un-noised")
    compression = cfg.compression._target_.rsplit(".", 1)[-1]
    if p.secure_agg and compression != "NoCompression":
        raise FedrunError("compression: secure aggregation sends masked fixed-point vectors, which cannot be "
                          "compressed afterwards; use compression=none (or secagg_bits to shrink them)")
    if dp and compression == "StochasticQuantizer":
        raise FedrunError("compression: quantize after clipping can push an update's norm past privacy.clip_norm, "
                          "voiding the DP bound; use compression=topk (which only shrinks it) or none")
    if p.stop_at_budget and p.target_epsilon is None:
        raise FedrunError("privacy.stop_at_budget: needs privacy.target_epsilon (the budget to stop at)")
    if p.secure_agg:
        largest = cfg.sampler.clients_per_round + 6 * math.sqrt(cfg.sampler.clients_per_round)
        if largest * 2**p.secagg_bits > 2**32:
            raise FedrunError(f"privacy.secagg_bits: {p.secagg_bits} bits leave no room to sum a cohort of up to "
                              f"{int(largest)} clients modulo 2^32; allowed: at most "
                              f"{int(math.log2(2**32 / largest))}")


# ---- compose ---------------------------------------------------------------------------------

def compose(overrides: list[str] | None = None, *, check_ranges: bool = True) -> DictConfig:
    """The resolved config for these Hydra overrides, its keys, options and types checked, and
    (check_ranges) its values too; FedrunError if anything is wrong."""
    register_schemas()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None, job_name="fedrun"):
            cfg = hydra_compose("config", overrides=list(overrides or []))
        OmegaConf.resolve(cfg)
    except MissingConfigException as e:
        raise FedrunError(_unknown_option(e)) from e
    except (ConfigCompositionException, OverrideParseException, OmegaConfBaseException) as e:
        raise FedrunError(_one_line(e)) from e
    if check_ranges:
        validate(cfg)
    return cfg


def _unknown_option(e: MissingConfigException) -> str:
    group, _, option = (e.missing_cfg_file or "").rpartition("/")
    if group and e.options is not None:
        return f"{group}: unknown option '{option}'; allowed: {', '.join(sorted(e.options))}"
    return _one_line(e)


_TYPE_WORDS = {"Integer": "an integer", "Float": "a number", "Boolean": "true or false", "String": "a string"}


def _one_line(e: Exception) -> str:
    """Hydra's and OmegaConf's multi-line errors as `key: what is wrong; allowed: ...`."""
    cause = e.__cause__ or e
    key = getattr(cause, "full_key", None)
    message = str(getattr(cause, "msg", None) or cause).splitlines()[0].strip()
    if m := re.match(r"Value '(.*)' of type '.*' could not be converted to (\w+)", message):
        message = f"{m.group(1)!r} is not allowed; allowed: {_TYPE_WORDS.get(m.group(2), m.group(2))}"
    elif re.match(r"Key '.*' not in '.*'", message) and dataclasses.is_dataclass(getattr(cause, "object_type", None)):
        names = [f.name for f in dataclasses.fields(cause.object_type) if not f.name.startswith("_")]
        message = f"unknown key; allowed keys here: {', '.join(names)}"
    elif isinstance(e, OverrideParseException) or message.startswith("Error parsing override"):
        message = f"{message}; overrides look like key=value or group=option"
    elif not key and isinstance(e, ConfigCompositionException) and e.__cause__ is None:
        message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return f"{key}: {message}" if key else message


# ---- build -----------------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise FedrunError("device: 'cuda' was asked for but CUDA is not available; allowed here: auto, cpu")
    return torch.device(name)


def client_config(cfg: DictConfig) -> ClientConfig:
    return ClientConfig(**cfg.client)


def instantiate(node: DictConfig, **kwargs: Any) -> Any:
    """hydra.utils.instantiate, letting a FedrunError raised by the target through unwrapped."""
    try:
        return hydra_instantiate(node, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, FedrunError):
            raise e.__cause__ from None
        raise


def build_data(cfg: DictConfig, *, audit=None) -> FederatedData:
    options: dict[str, Any] = {}
    path = cfg.model.get("name_or_path")
    if path and has_tokenizer(path) and not cfg.data._target_.endswith(".synthetic"):
        options["tokenizer"] = Tokenizer(path)  # windows of the model's own tokens
    if audit is not None:
        if cfg.data._target_.endswith(".synthetic") or options:
            raise FedrunError("audit: canaries are byte-level secrets planted in text; they need byte-level text "
                              "data (not data=synthetic, nor a model with its own tokenizer)")
        options["insert"] = audit.insert
    return instantiate(cfg.data, _partial_=True)(seed=cfg.seed, **options)


def build(cfg: DictConfig) -> Experiment:
    device = resolve_device(cfg.device)
    audit = instantiate(cfg.audit, _partial_=True)
    audit = with_context(audit, {"seed": cfg.seed})
    data = build_data(cfg, audit=audit)
    k = cfg.sampler.clients_per_round
    if k > data.num_clients:
        raise FedrunError(f"sampler.clients_per_round: {k} is more than the {data.num_clients} clients "
                          f"of this data; allowed: 1..{data.num_clients}")
    make_model = instantiate(cfg.model, _partial_=True)
    if missing := set(data.model_dims) - set(inspect.signature(make_model.func).parameters):
        raise FedrunError(f"model: {cfg.model._target_.rsplit('.', 1)[-1]} does not fit this data (it takes no "
                          f"{', '.join(sorted(missing))}): text data needs model=tiny_gpt or lstm, "
                          "labelled data (data=synthetic) model=logreg or mlp")
    make_model = partial(make_model, **data.model_dims)
    num_params = sum(p.numel() for p in make_model().parameters() if p.requires_grad)
    # What a factory may ask for besides its own config keys.
    context = {"num_clients": data.num_clients, "num_params": num_params, "device": device, "seed": cfg.seed,
               "make_model": make_model,
               "sample_rate": k / data.num_clients, "rounds": cfg.rounds, "batch_size": cfg.client.batch_size}
    mechanism = with_context(instantiate(cfg.privacy, _partial_=True), context)
    example_dp = getattr(mechanism, "example_dp", None)
    attack = with_context(instantiate(cfg.attack, _partial_=True), context)
    # Client-side order: an attacker tampers with its update, privacy clips it, compression packs it.
    compression = with_context(instantiate(cfg.compression, _partial_=True), context)
    make_trainer = partial(LocalTrainer, make_model, client_config(cfg), device, example_dp)
    strategy = with_context(instantiate(cfg.strategy, _partial_=True), context)
    public = getattr(strategy, "public_fingerprint", None)
    if public is not None and public.get("sha256") == data.fingerprint.get("sha256"):
        raise FedrunError("strategy.public: the public corpus is the clients' own data; distillation must use "
                          "other text, e.g. data=shakespeare with the default public pystdlib")
    return Experiment(
        cfg=cfg,
        data=data,
        make_model=make_model,
        sampler=instantiate(cfg.sampler),
        strategy=strategy,
        mechanism=mechanism,
        # Objects go in through a partial: instantiate() would turn keyword objects into configs.
        backend=instantiate(cfg.backend, _partial_=True)(
            make_trainer=make_trainer, data=data, client_hooks=[attack, mechanism, compression]),
        device=device,
        attack=attack,
        audit=audit,
        compression=compression,
    )


def with_context(factory: partial, context: dict[str, Any]) -> Any:
    """Call `factory` with the entries of `context` that its target accepts by name."""
    accepted = inspect.signature(factory.func).parameters
    return factory(**{k: v for k, v in context.items() if k in accepted})
