"""Configuration: locate conf/, compose it with overrides, type and validate it, build the run.

Defaults live once, in the YAML under conf/. Each group's component types its own keys with its
signature (fedrun/components.py); the top-level keys are typed by RunSettings and the `client`
group by ClientConfig. So `rounds=abc` or `+strategy.foo=1` fails at composition, naming the
key. Rules between keys and components live in fedrun/checks.py. `build` is the one place that
instantiates objects from the config.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import re
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, cast

import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import (
    ConfigCompositionException,
    InstantiationException,
    MissingConfigException,
    OverrideParseException,
)
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedrun import startup, threads
from fedrun.checks import validate
from fedrun.client import LocalTrainer
from fedrun.client_config import ClientConfig
from fedrun.client_eval import ClientEvaluation
from fedrun.components import Local, capability, component, config_keys, option_name, typed_node
from fedrun.core import FedrunError, ResponseEval, make_deterministic
from fedrun.data import cache as data_cache
from fedrun.data.examples import FederatedData
from fedrun.data.text import Tokenizer, has_tokenizer
from fedrun.loop import Experiment
from fedrun.lora import round_method
from fedrun.response_eval import MultipleChoice, SampleResponses, read_choices
from fedrun.server_model import GlobalModel
from fedrun.settings import COMPONENT_GROUPS, GROUPS, EvalSettings, RunSettings
from fedrun.strategies.client_models import ModelSpec


def conf_dir() -> Path:
    """conf/ beside the package (a source checkout or editable install), or $FEDRUN_CONF."""
    path = Path(os.environ.get("FEDRUN_CONF") or Path(__file__).resolve().parents[1] / "conf")
    if not (path / "config.yaml").is_file():
        raise FedrunError(f"FEDRUN_CONF: no config.yaml in {path}; point FEDRUN_CONF at fedrun's conf/ folder")
    return path


# ---- compose ---------------------------------------------------------------------------------

def run_name(strategy: str, privacy: str) -> str:
    """The default `name`, and so run_dir's suffix: what ran, e.g. `fedprox` or `fedavg_central_dp`
    (conf/config.yaml: `name: ${run_name:${strategy._target_},${privacy._target_}}`)."""
    mechanism = option_name("privacy", privacy)
    return option_name("strategy", strategy) + ("" if mechanism == "none" else f"_{mechanism}")


OmegaConf.register_new_resolver("run_name", run_name, replace=True)  # Hydra's sweeps compose through it too


def compose(overrides: list[str] | None = None, *, check_ranges: bool = True) -> DictConfig:
    """The resolved config for these Hydra overrides, its keys, options and types checked, and
    (check_ranges) its values too; FedrunError if anything is wrong."""
    check_overrides(list(overrides or []))
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None, job_name="fedrun"):
            cfg = hydra_compose("config", overrides=list(overrides or []))
        OmegaConf.resolve(cfg)
    except MissingConfigException as e:
        raise FedrunError(_unknown_option(e)) from e
    except (ConfigCompositionException, OverrideParseException, OmegaConfBaseException) as e:
        key = getattr(e.__cause__, "full_key", None)
        if key and re.match(r"Key '.*' is not in struct", str(e.__cause__)):
            raise FedrunError(_unknown_key(key, list(overrides or []))) from e
        raise FedrunError(one_line(e)) from e
    cfg = typed(cfg)
    if check_ranges:
        validate(cfg)
    return cfg


def check_overrides(overrides: list[str]) -> None:
    """Refuse an override of what an option decides (`data._target_=...`, Hydra's `_x_` keys): a
    component is chosen by its option, so that only shipped components are built."""
    _refuse_sweeps(overrides)
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if not any(len(part) > 2 and part[0] == part[-1] == "_" for part in key.split(".")):
            continue
        group, *inner = key.split(".")
        names = sorted(p.stem for p in (conf_dir() / group).glob("*.yaml")) if len(inner) == 1 else []
        allowed = (f"{group}=OPTION, one of {', '.join(names)}" if names
                   else "an option choice, group=OPTION (a node of another group: group@path=OPTION)")
        raise FedrunError(f"{key}: chosen by picking an option, not set directly; allowed: {allowed}")


def _refuse_sweeps(overrides: list[str]) -> None:
    """`seed=0,1` asks for several runs: say which command runs them (Hydra only calls it ambiguous)."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException:
        return  # compose reports it, in one line
    for override in parsed:
        if override.is_sweep_override():
            key, value = override.get_key_element(), str(override.input_line).split("=", 1)[1]
            raise FedrunError(f"{key}: {value} is several values, a run each; one command runs them all: "
                              "fedrun sweep, with the same overrides")


def _unknown_key(key: str, overrides: list[str]) -> str:
    """`key: unknown key; allowed keys here: ...; did you mean ...?`, listing the keys of its node
    in the config that the overrides' group choices compose."""
    parent, _, name = key.rpartition(".")
    choices = [o for o in overrides if re.fullmatch(r"[\w/]+=[^=]*", o) and o.split("=")[0] in GROUPS]
    base = compose(choices, check_ranges=False)
    node = OmegaConf.select(base, parent) if parent else base
    if not isinstance(node, DictConfig):
        return f"{key}: unknown key; {parent} has no keys of its own"
    keys = [str(k) for k in node if k != "_target_"]  # a config's keys are strings
    if not parent:  # the run's own settings first, then the groups
        keys = sorted(keys, key=lambda k: (k in GROUPS, list(RunSettings.__dataclass_fields__).index(k)
                                           if k in RunSettings.__dataclass_fields__ else 0))
    if parent in COMPONENT_GROUPS and "_target_" in node:
        return _unknown_option_key(key, name, keys, f"{parent}={option_name(parent, node._target_)}")
    return unknown_key_message(key, name, keys)


def _unknown_option_key(key: str, name: str, keys: list[str], chosen: str) -> str:
    """The message for a key the chosen option lacks: its keys, and which options have the key."""
    from fedrun.options import options_with_key  # reads every option of the group: only on this error

    group = chosen.split("=")[0]
    message = unknown_key_message(key, name, keys).replace("allowed keys here:", f"allowed keys of {chosen}:", 1)
    if not keys:
        message = f"{key}: unknown key; {chosen} has no keys"
    if owners := options_with_key(group, name):
        message += f"; {name} is a key of {' and '.join(f'{group}={o}' for o in owners)}"
    return message


def unknown_key_message(key: str, name: str, keys: list[str]) -> str:
    near = difflib.get_close_matches(name, keys, n=1)
    hint = f"; did you mean {near[0]}?" if near else ""
    return f"{key}: unknown key; allowed keys here: {', '.join(keys) or 'none'}{hint}"


def typed(cfg: DictConfig) -> DictConfig:
    """Every node merged onto its schema: the top-level keys onto RunSettings, `client` onto
    ClientConfig, `eval` onto EvalSettings, each group's node onto its component's signature (and a node the component
    builds from config, such as feddf's `public` data, onto that node's own component)."""
    if unknown := [str(k) for k in cfg if k not in GROUPS and k not in RunSettings.__dataclass_fields__]:
        raise FedrunError(unknown_key_message(unknown[0], unknown[0], [*RunSettings.__dataclass_fields__, *GROUPS]))
    settings = typed_node(OmegaConf.masked_copy(cfg, list(RunSettings.__dataclass_fields__)), RunSettings, "")
    for key in RunSettings.__dataclass_fields__:
        cfg[key] = settings[key]
    cfg.client = typed_node(cfg.client, ClientConfig, "client")
    cfg.eval = typed_node(cfg.eval, EvalSettings, "eval")
    for group in COMPONENT_GROUPS:
        cfg[group] = typed_component(cfg[group], group)
    return cfg


def typed_component(node: DictConfig, group: str, where: str | None = None) -> DictConfig:
    """`node` (of `group`, found at `where`) merged onto its component's schema."""
    target = component_of(node, where or group)
    typed_ = typed_node(node, target, where or group, group)
    for name, node_group in getattr(target, "config_nodes", {}).items():
        typed_[name] = typed_component(typed_[name], node_group, f"{where or group}.{name}")
    return typed_


def component_of(node: DictConfig, where: str) -> Any:
    try:
        return component(node)
    except FedrunError:
        raise
    except Exception as e:  # noqa: BLE001 (an import error of any kind: one line)
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__  # Hydra's message runs over lines
        raise FedrunError(f"{where}._target_: {node.get('_target_')!r} cannot be imported ({reason})") from None


def _unknown_option(e: MissingConfigException) -> str:
    group, _, option = (e.missing_cfg_file or "").rpartition("/")
    if group and e.options is not None:
        return f"{group}: unknown option '{option}'; allowed: {', '.join(sorted(e.options))}"
    return one_line(e)


_TYPE_WORDS = {"Integer": "an integer", "Float": "a number", "Boolean": "true or false", "String": "a string"}


def one_line(e: Exception) -> str:
    """Hydra's and OmegaConf's multi-line errors as `key: what is wrong; allowed: ...`."""
    cause = e.__cause__ or e
    key = getattr(cause, "full_key", None)
    message = str(getattr(cause, "msg", None) or cause).splitlines()[0].strip()
    if m := re.match(r"Value '(.*)' of type '.*' could not be converted to (\w+)", message):
        message = f"{m.group(1)!r} is not allowed; allowed: {_TYPE_WORDS.get(m.group(2), m.group(2))}"
    elif (re.match(r"Key '.*' not in '.*'", message)
          and dataclasses.is_dataclass(object_type := getattr(cause, "object_type", None))):
        names = [f.name for f in dataclasses.fields(object_type) if not f.name.startswith("_")]
        return unknown_key_message(str(key), str(key).rpartition(".")[2], names)
    elif isinstance(e, OverrideParseException) or message.startswith("Error parsing override"):
        message = f"{message}; overrides look like key=value or group=option"
    elif not key and isinstance(e, ConfigCompositionException) and e.__cause__ is None:
        message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return f"{key}: {message}" if key else message


# ---- build -----------------------------------------------------------------------------------

def resolve_device(name: str, backend_target: str = "") -> torch.device:
    """`auto`: CUDA when present, unless the backend says its workers train on the CPU."""
    if name == "auto":
        on_cpu = bool(backend_target) and capability(backend_target, "backend", "trains_on_cpu")
        return torch.device("cuda" if torch.cuda.is_available() and not on_cpu else "cpu")
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


def build_data(cfg: DictConfig, *, audit: Any = None) -> FederatedData:
    """The run's federated data: from the on-disk cache when `data.cache` (fedrun/data/cache.py)."""
    options: dict[str, Any] = {}
    text = capability(cfg.data, "data", "data_kind") == "text"
    path = cfg.model.get("name_or_path")
    tokenizer = path if path and has_tokenizer(path) and text else None
    if audit is not None:
        if not text or tokenizer:
            raise FedrunError("audit: canaries are byte-level secrets planted in text; they need byte-level text "
                              "data (not data=synthetic, nor a model with its own tokenizer)")
        options["insert"] = audit.insert
    node = OmegaConf.masked_copy(cfg.data, [k for k in cfg.data if k != "cache"])
    source = instantiate(node)  # its keys only: it reads nothing before `load`

    def make() -> FederatedData:
        if tokenizer:  # windows of the model's own tokens; made only on a cache miss (it imports transformers)
            options["tokenizer"] = Tokenizer(tokenizer)
        return source.load(seed=cfg.seed, **options)

    startup.mark("data_start")
    if audit is not None or not cfg.data.get("cache", True):  # canaries plant secrets: never cached
        data = make()
        data.provenance = {"cache": "off"}
    else:
        spec = cast(dict, OmegaConf.to_container(node))  # a mapping's container is a dict
        key = data_cache.data_key(data=spec, seed=cfg.seed, tokenizer=tokenizer,
                                  implicit_sources=source.implicit_sources())
        source_module = str(spec.get("_target_", "")).rsplit(".", 1)[0]  # fedrun.data.synthetic.Synthetic
        about = {"source": source_module.rsplit(".", 1)[-1], "seed": cfg.seed, "data": spec}
        data = data_cache.load_or_build(key, make, about=about)  # about: what `fedrun cache list` shows
    startup.mark("data_end")
    return data


def absolute_paths(cfg: DictConfig) -> dict[str, str]:
    """Every key typed `LocalPath` (data.path, model.name_or_path, eval.choices, ...) made absolute
    in place: `~` expanded and resolved from the working directory, so that the run directory's
    config works from anywhere (resume, eval, generate, export). Returns {key: what was typed}
    for the keys it changed."""
    typed: dict[str, str] = {}

    def visit(node: DictConfig, target: Any, where: str, group: str) -> None:
        for key in config_keys(target, group):
            value = node.get(key.name)
            if any(isinstance(m, Local) for m in key.markers) and isinstance(value, str) and value:
                absolute = str(Path(value).expanduser().resolve())
                if absolute != value:
                    typed[f"{where}.{key.name}"], node[key.name] = value, absolute
        for name, node_group in getattr(target, "config_nodes", {}).items():  # e.g. feddf's public data
            visit(node[name], component(node[name]), f"{where}.{name}", node_group)

    for group in COMPONENT_GROUPS:
        visit(cfg[group], component(cfg[group]), group, group)
    visit(cfg.eval, EvalSettings, "eval", "eval")
    return typed


def build(cfg: DictConfig) -> Experiment:
    threads.apply(cfg.get("threads", threads.AUTO))  # before the run's first tensor operation
    typed_paths = absolute_paths(cfg)
    device = resolve_device(cfg.device, cfg.backend.get("_target_", ""))
    make_deterministic(device)
    audit = None  # audit=none (is_noop): no secrets planted, nothing measured
    if not capability(cfg.audit, "audit", "is_noop"):
        audit = with_context(instantiate(cfg.audit, _partial_=True), {"seed": cfg.seed})
    data = build_data(cfg, audit=audit if audit is not None and audit.plants_secrets else None)
    # audit=epsilon's canary clients are users to the sampler, the accountant and secure aggregation.
    population = audit.population(data.num_clients) if audit is not None and audit.inserts_clients \
        else data.num_clients
    k = cfg.sampler.clients_per_round
    if k > population:
        raise FedrunError(f"sampler.clients_per_round: {k} is more than the {population} clients "
                          f"of this data; allowed: 1..{population}")
    make_model = model_factory(cfg.model, data, key="model")
    num_params = sum(p.numel() for p in make_model().parameters() if p.requires_grad)
    # What a factory may ask for besides its own config keys.
    context = {"num_clients": population, "num_params": num_params, "device": device, "seed": cfg.seed,
               "make_model": make_model, "model_specs": model_specs(cfg, data, make_model),
               "sample_rate": k / population, "rounds": cfg.rounds, "batch_size": cfg.client.batch_size,
               "dropout": cfg.sampler.dropout, "data": data, "client_config": client_config(cfg)}
    strategy = build_strategy(cfg, context)
    # Logit exchange sends predictions, not weights: privacy clips and noises those vectors.
    mechanism = with_context(instantiate(cfg.privacy, _partial_=True),
                             context | {"num_params": getattr(strategy, "update_size", num_params),
                                        "strategy": strategy, "max_examples": int(data.client_sizes().max())})
    example_dp = getattr(mechanism, "example_dp", None)
    attack = with_context(instantiate(cfg.attack, _partial_=True), context)
    compression = with_context(instantiate(cfg.compression, _partial_=True), context)
    trainer_args = (client_config(cfg), device, example_dp)
    if hasattr(strategy, "make_trainer"):  # clients that keep their own models (fed_distill)
        make_trainer = strategy.make_trainer(*trainer_args)
    else:
        rule = getattr(strategy, "local_rule", None)  # the strategy's client side (fedrun.core.LocalRule)
        make_trainer = partial(LocalTrainer, make_model, *trainer_args, local_rule=rule)
    public = getattr(strategy, "public_fingerprint", None)
    if public is not None and public.get("sha256") == data.fingerprint.get("sha256"):
        raise FedrunError("strategy.public: the public corpus is the clients' own data; distillation must use "
                          "other text, e.g. data=shakespeare with the default public pystdlib")
    # Client-side order: the client's own state is kept, an attacker tampers with its update,
    # compression packs it, privacy clips (and masks) it last: DP bounds the vector actually sent,
    # error feedback's leftovers included (clipping a sparse or min-max-quantised vector keeps its format).
    lora_node = cfg.model.get("lora")
    lora = None if not (lora_node and lora_node.enabled) else round_method(
        lora_node.aggregation, make_model=make_model, device=device, seed=cfg.seed,
        rank_entries=cfg.client.lora_ranks, num_clients=data.num_clients)
    # A client keeps what is its own (its state, fedsa's B) before anything else sees its update.
    client_hooks = [h for h in (getattr(strategy, "client_state", None), lora, attack, compression, mechanism) if h]
    personal = strategy if hasattr(strategy, "personal_weights") else lora if lora and lora.personal else None
    client_eval = None if not (cfg.eval.per_client or personal) else ClientEvaluation(
        data, seed=cfg.seed, clients=cfg.eval.clients, listed=cfg.eval.per_client, personal=personal)
    own_models = getattr(strategy, "server_model", None)  # fed_distill: the clients' own models
    if own_models is not None and cfg.eval.per_client:
        own_models.evaluate_per_client(ClientEvaluation(data, seed=cfg.seed, clients=cfg.eval.clients, listed=True,
                                                        personal=None))
    server_model = own_models or GlobalModel(
        make_model, device=device, seed=cfg.seed, audit=audit, evals=build_evals(cfg, data), client_eval=client_eval,
        lora_method=lora, averages_updates=capability(cfg.strategy, "strategy", "exchanges") == "weights"
        and not capability(cfg.strategy, "strategy", "trains_centrally"))
    return Experiment(
        cfg=cfg,
        data=data,
        make_model=make_model,
        sampler=instantiate(cfg.sampler),
        strategy=strategy,
        mechanism=mechanism,
        # Objects go in through a partial: instantiate() would turn keyword objects into configs.
        backend=instantiate(cfg.backend, _partial_=True)(
            make_trainer=make_trainer, data=data, client_hooks=client_hooks),
        device=device,
        attack=attack,
        server_model=server_model,
        audit=audit,
        compression=compression,
        lora=lora,
        typed_paths=typed_paths,
    )


def build_evals(cfg: DictConfig, data: FederatedData) -> list[ResponseEval]:
    """What each evaluation measures besides the test loss: eval.choices, eval.samples."""
    if not cfg.eval.samples and cfg.eval.choices is None:
        return []
    path = cfg.model.get("name_or_path")
    tokenizer = Tokenizer(path) if path and has_tokenizer(path) else None  # the run's text: its ids
    evals: list[ResponseEval] = []
    if cfg.eval.choices is not None:
        evals.append(MultipleChoice(read_choices(cfg.eval.choices), template=cfg.data.get("template"),
                                    seq_len=data.model_dims["seq_len"], tokenizer=tokenizer))
    if cfg.eval.samples:
        evals.append(SampleResponses(data.test_examples(), samples=cfg.eval.samples, seed=cfg.seed,
                                     max_new_tokens=data.model_dims["seq_len"], tokenizer=tokenizer,
                                     template=cfg.data.get("template")))
    return evals


def build_strategy(cfg: DictConfig, context: dict[str, Any]) -> Any:
    """The strategy; a distillation strategy's public corpus is loaded like the clients' data."""
    if "public" not in cfg.strategy:
        return with_context(instantiate(cfg.strategy, _partial_=True), context)
    public_cfg = cfg.copy()
    public_cfg.data = cfg.strategy.public
    node = OmegaConf.masked_copy(cfg.strategy, [k for k in cfg.strategy if k != "public"])
    return with_context(instantiate(node, _partial_=True), context | {"public": build_data(public_cfg)})


def model_factory(node: DictConfig, data: FederatedData, *, key: str) -> Callable[[], torch.nn.Module]:
    """A zero-argument model constructor for this data (vocabulary, sequence length, features)."""
    make_model = instantiate(node, _partial_=True)
    if missing := set(data.model_dims) - set(inspect.signature(make_model.func).parameters):
        raise FedrunError(f"{key}: {node._target_.rsplit('.', 1)[-1]} does not fit this data (it takes no "
                          f"{', '.join(sorted(missing))}): text data needs model=tiny_gpt or lstm, "
                          "labelled data (data=synthetic) model=logreg or mlp")
    return partial(make_model, **data.model_dims)


def model_specs(cfg: DictConfig, data: FederatedData, make_model: Callable[[], torch.nn.Module]) -> list[ModelSpec]:
    """The architectures clients hold: `client.models` entries, or `model` for every client."""
    if cfg.client.models is None:
        return [ModelSpec(cfg.model._target_.rsplit(".", 1)[-1].lower(), make_model, 1.0)]
    return [ModelSpec(entry.name, model_factory(model_option(entry, i), data, key=f"client.models[{i}]"),
                      entry.fraction) for i, entry in enumerate(cfg.client.models)]


def model_option(entry: DictConfig, index: int) -> DictConfig:
    """conf/model/<entry.option>.yaml with the entry's other keys merged in, typed by its component."""
    key = f"client.models[{index}]"
    options = sorted(p.stem for p in (conf_dir() / "model").glob("*.yaml"))
    if entry.option not in options:
        raise FedrunError(f"{key}.option: unknown model option {entry.option!r}; allowed: {', '.join(options)}")
    node = cast(DictConfig, OmegaConf.load(conf_dir() / "model" / f"{entry.option}.yaml"))  # an option is a mapping
    node.pop("defaults", None)
    overrides = {k: v for k, v in entry.items() if k not in ("name", "option", "fraction")}
    try:
        node = cast(DictConfig, OmegaConf.merge(node, overrides))
    except OmegaConfBaseException as e:
        raise FedrunError(f"{key}.{one_line(e)}") from e
    return typed_component(node, "model", key)


def with_context(factory: partial, context: dict[str, Any]) -> Any:
    """Call `factory` with the entries of `context` that its target accepts by name."""
    accepted = inspect.signature(factory.func).parameters
    return factory(**{k: v for k, v in context.items() if k in accepted})
