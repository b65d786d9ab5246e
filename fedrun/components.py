"""The contract between fedrun and its pluggable parts: a component's signature is its schema.

A component (strategy, data source, model, privacy mechanism, backend, attack, compression,
audit, sampler) is one class in one file, named by `_target_` in its YAML under conf/. Its
`__init__` says everything fedrun needs to know about its configuration:

    class Krum(ServerStrategy):
        needs_individual_updates = True                      # a capability (class attribute)

        def __init__(self, *, num_byzantine: Annotated[int, Range(ge=0)],
                     multi: Annotated[int, Range(ge=1)], num_clients: int): ...

- its named parameters are its config keys: their types are the keys' types and their
  `Range`/`OneOf` markers the allowed values, so a wrong value fails at composition with one
  line naming the key, the value and what is allowed;
- except the parameters the run provides when it builds a component of its group (CONTEXT:
  a model gets `vocab_size` from the data, a strategy `num_clients`, a backend `make_trainer`),
  which are never config keys;
- capabilities are class attributes, read with `capability(...)` from the class the config
  names, and the rules between components (fedrun/checks.py) are written over them.

The schema is a dataclass made from the signature (`dataclasses.make_dataclass`, ~40 lines
here rather than hydra-zen's `builds`: fedrun needs the range markers checked at composition,
which `builds` leaves to a runtime validator, and one dependency fewer), merged under the
composed node so OmegaConf converts and type-checks every value and refuses unknown keys.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from hydra.utils import get_object
from omegaconf import MISSING, DictConfig, OmegaConf

from fedrun.core import FedrunError

# ---- markers ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Range:
    """Allowed numbers: `Annotated[float, Range(gt=0)]`, `Annotated[int, Range(ge=1, le=32)]`.
    `words` replaces the generated description (e.g. to say what a bound is for); `null` says
    what None means for an Optional key."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    words: str | None = None
    null: str | None = None

    def allows(self, value: Any) -> bool:
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt)
                and not (isinstance(value, float) and math.isnan(value)))

    def describe(self, kind: type) -> str:
        if self.words:
            return self.words
        noun = "an integer" if kind is int else "a number"
        low = (f"[{_num(self.ge)}" if self.ge is not None else f"({_num(self.gt)}" if self.gt is not None else None)
        high = (f"{_num(self.le)}]" if self.le is not None else f"{_num(self.lt)})" if self.lt is not None else None)
        if low and high:
            return f"{noun} in {low}, {high}"
        if low:
            return f"{noun} {'>=' if self.ge is not None else '>'} {low[1:]}"
        if high:
            return f"{noun} {'<=' if self.le is not None else '<'} {high[:-1]}"
        return noun


@dataclass(frozen=True)
class OneOf:
    """Allowed strings: `Annotated[str, OneOf("rdp", "prv")]` (or `OneOf(*ACCOUNTANTS)`)."""

    values: tuple[Any, ...]

    def __init__(self, *values: Any):
        object.__setattr__(self, "values", tuple(values))

    def allows(self, value: Any) -> bool:
        return value in self.values

    def describe(self, kind: type) -> str:
        return "one of " + ", ".join(map(str, self.values))


@dataclass(frozen=True)
class Local:
    """A file or folder on this machine. Such a key is made absolute when a run is built
    (`absolute_paths`), so that its run directory works from any working directory."""

    def allows(self, value: Any) -> bool:
        return True

    def describe(self, kind: type) -> str:
        return "a local path"


LocalPath = Annotated[str, Local()]  # the type of a key that names a local file or folder
Marker = Range | OneOf | Local


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


# ---- schemas ---------------------------------------------------------------------------------

# What the run provides to a component of each group when it builds it (fedrun/config.py
# `build`), by parameter name; every other parameter is a config key.
RUN_CONTEXT = ("num_clients", "num_params", "device", "seed", "make_model", "model_specs", "sample_rate", "rounds",
               "batch_size", "dropout", "strategy", "max_examples", "public", "data", "client_config")
CONTEXT: dict[str, frozenset[str]] = {
    "data": frozenset(),  # a source is built from its keys alone; `load(seed=, ...)` gets the rest
    "model": frozenset({"vocab_size", "seq_len", "num_features", "num_classes"}),
    "backend": frozenset({"make_trainer", "data", "client_hooks"}),
    "sampler": frozenset(),
    **{group: frozenset(RUN_CONTEXT) for group in ("strategy", "privacy", "attack", "compression", "audit")},
}
# Keys every component of a group has, read by the builder itself and never passed to it.
BUILDER_KEYS: dict[str, list[tuple[str, type, Any]]] = {
    "data": [("cache", bool, True)],  # reuse prepared data from $FEDRUN_CACHE (fedrun/data/cache.py)
}


@dataclass(frozen=True)
class Key:
    """One config key of a component: its OmegaConf type, markers and whether None is allowed."""

    name: str
    kind: Any  # what OmegaConf sees: int, float, bool, str, list[str], dict, Any, or a schema
    markers: tuple[Marker, ...] = ()
    optional: bool = False
    default: Any = MISSING

    def describe(self) -> str:
        base = " and ".join(m.describe(self.kind) for m in self.markers)
        if not self.optional:
            return base
        null = next((m.null for m in self.markers if isinstance(m, Range) and m.null), None)
        return f"null ({null}) or {base}" if null else f"null or {base}"


def config_keys(target: Any, group: str = "") -> list[Key]:
    """The config keys of a component of `group` (a class or function), or a dataclass's fields."""
    if _is_record(target, group):
        hints = typing.get_type_hints(target, include_extras=True)
        return [_key(f.name, hints[f.name], _field_default(f)) for f in dataclasses.fields(target)
                if not f.name.startswith("_")]
    if isinstance(target, type) and _init_of(target) is object.__init__:
        return []  # a component without settings
    fn = _init_of(target)
    params = list(inspect.signature(fn).parameters.values())
    provided = CONTEXT.get(group, frozenset())
    if isinstance(target, type) and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        # `**keys` hands keys on to the base class: its keys are this component's too
        inherited = config_keys(target.__mro__[1], group)
    else:
        inherited = []
    names = [p.name for p in params if p.name != "self" and p.name not in provided
             and p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    hints = _hints(fn, names)
    own = [_key(p.name, hints.get(p.name, Any), p.default) for p in params if p.name in hints]
    return own + [k for k in inherited if k.name not in hints]


def _init_of(target: Any) -> Any:
    """The function whose signature configures `target`: a class's __init__, or `target` itself."""
    if isinstance(target, type):
        cls: type[object] = target  # the class object, whose __init__ mypy lets us read
        return cls.__init__
    return target


def _is_record(target: Any, group: str = "") -> bool:
    """A dataclass outside a component group is a record of keys (its fields), as `client` and
    `model.lora` are; a dataclass component is read by its signature like any other class."""
    return isinstance(target, type) and dataclasses.is_dataclass(target) and group not in CONTEXT


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return MISSING


def _hints(fn: Any, names: Any) -> dict[str, Any]:
    """The annotations of `names` only: a component's run-provided parameters may name types
    imported for type checking alone, which need not resolve here."""
    raw = getattr(fn, "__annotations__", {})
    namespace = {**vars(typing), **getattr(fn, "__globals__", {})}
    hints = {}
    for name in names:
        annotation = raw.get(name, Any)
        # The annotation is source text of a fedrun class: a run directory can only name shipped
        # components (fedrun/run_config.py), so nothing a file holds is evaluated here.
        hints[name] = eval(annotation, namespace) if isinstance(annotation, str) else annotation  # noqa: S307
    return hints


def _key(name: str, hint: Any, default: Any) -> Key:
    markers: tuple[Marker, ...] = ()
    if typing.get_origin(hint) is Annotated:
        hint, *extra = typing.get_args(hint)
        markers = tuple(m for m in extra if isinstance(m, (Range, OneOf, Local)))
    optional = False
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0] if len(args) == 1 else Any
        if typing.get_origin(hint) is Annotated:
            hint, *extra = typing.get_args(hint)
            markers += tuple(m for m in extra if isinstance(m, (Range, OneOf, Local)))
    if typing.get_origin(hint) is Literal:
        markers += (OneOf(*typing.get_args(hint)),)
        hint = type(typing.get_args(hint)[0])
    if default is inspect.Parameter.empty:
        default = MISSING
    return Key(name, _omegaconf_type(hint), markers, optional, default)


def _omegaconf_type(hint: Any) -> Any:
    if hint in (int, float, bool, str):
        return hint
    origin = typing.get_origin(hint)
    if origin in (list, tuple) or hint in (list, tuple):
        args = typing.get_args(hint)
        return types.GenericAlias(list, (args[0],)) if args and args[0] in (int, float, bool, str) else list  # list[x]
    if origin is dict or hint is dict:
        return dict
    if dataclasses.is_dataclass(hint):
        return schema_of(typing.cast(type, hint))  # a hint: the dataclass itself, hashable
    return Any


@functools.cache
def schema_of(target: Any, group: str = "") -> type:
    """The structured-config dataclass of a component: `_target_` plus its config keys."""
    fields: list[tuple] = []
    if not _is_record(target, group):
        fields.append(("_target_", str, dataclasses.field(default=MISSING)))
    for key in config_keys(target, group):
        kind = Optional[key.kind] if key.optional else key.kind  # noqa: UP045 (OmegaConf reads typing.Optional)
        if key.default is MISSING:
            default = dataclasses.field(default=MISSING)
        elif isinstance(key.default, (list, dict)) or dataclasses.is_dataclass(key.default):
            default = dataclasses.field(default_factory=_returning(key.default))
        else:
            default = dataclasses.field(default=key.default)
        fields.append((key.name, kind, default))
    fields += [(name, kind, dataclasses.field(default=default)) for name, kind, default in BUILDER_KEYS.get(group, [])]
    for name in getattr(target, "config_nodes", ()):  # nodes the run builds into objects (feddf's public data)
        fields.append((name, Any, dataclasses.field(default=MISSING)))
    name = getattr(target, "__name__", "Component") + "Schema"
    return dataclasses.make_dataclass(name, fields)


def _returning(value: Any) -> Callable[[], Any]:
    """A default_factory that hands out `value` (a field may not default to a list or dict)."""
    return lambda: value


def typed_node(node: DictConfig, target: Any, where: str, group: str = "") -> DictConfig:
    """`node` merged onto `target`'s schema: values converted to their types, unknown keys refused."""
    from fedrun.config import one_line  # the message shape for OmegaConf's errors

    try:
        # A structured config merged with a mapping is a DictConfig.
        typed = typing.cast(DictConfig, OmegaConf.merge(OmegaConf.structured(schema_of(target, group)), node))
    except Exception as e:  # noqa: BLE001 (OmegaConf raises a dozen types; each becomes one line)
        message = one_line(e)
        if where:
            message = f"{where}.{message}" if ":" in message.split(" ")[0] else f"{where}: {message}"
        raise FedrunError(message) from None
    OmegaConf.set_readonly(typed, None)  # a frozen record's schema would freeze the node
    return typed


def check_values(node: DictConfig, target: Any, where: str, group: str = "") -> None:
    """Each key's value against its markers; FedrunError naming the first that is not allowed."""
    for key in config_keys(target, group):
        if key.name not in node or OmegaConf.is_missing(node, key.name):
            continue
        value = node[key.name]
        if isinstance(key.kind, type) and dataclasses.is_dataclass(key.kind) and isinstance(value, DictConfig):
            check_values(value, _source_of(target, key.name), f"{where}.{key.name}")
            continue
        if value is None:
            if key.optional:
                continue
        elif all(m.allows(value) for m in key.markers):
            continue
        name = f"{where}.{key.name}" if where else key.name
        raise FedrunError(f"{name}: {value!r} is not allowed; allowed: {key.describe()}")


def _source_of(target: Any, name: str) -> Any:
    """The dataclass a nested key was declared with (its markers live there, not in the schema)."""
    if _is_record(target):
        hint = typing.get_type_hints(target, include_extras=True)[name]
    else:
        hint = _hints(_init_of(target), {name})[name]
    while typing.get_origin(hint) in (Annotated, Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


# ---- renamed components -----------------------------------------------------------------------

# `_target_`s that run directories written by earlier versions hold, and what they are now:
# `fedrun resume/eval/generate/export` read them with a one-line deprecation warning.
RENAMED_TARGETS: dict[str, str] = {
    # privacy
    "fedrun.privacy.central": "fedrun.privacy.central.CentralPrivacy",
    # strategies
    "fedrun.strategies.fedavg": "fedrun.strategies.fedavg.FedAvg",
    "fedrun.strategies.fedavgm": "fedrun.strategies.fedavgm.FedAvgM",
    "fedrun.strategies.fedadam": "fedrun.strategies.fedadam.FedAdam",
    "fedrun.strategies.fedyogi": "fedrun.strategies.fedyogi.FedYogi",
    "fedrun.strategies.fedadagrad": "fedrun.strategies.fedadagrad.FedAdagrad",
    "fedrun.strategies.fedprox": "fedrun.strategies.fedprox.FedProx",
    "fedrun.strategies.scaffold": "fedrun.strategies.scaffold.Scaffold",
    "fedrun.strategies.median": "fedrun.strategies.median.Median",
    "fedrun.strategies.trimmed_mean": "fedrun.strategies.trimmed_mean.TrimmedMean",
    "fedrun.strategies.krum": "fedrun.strategies.krum.Krum",
    "fedrun.strategies.feddf": "fedrun.strategies.feddf.FedDF",
    "fedrun.strategies.fed_distill.fed_distill": "fedrun.strategies.fed_distill.FedDistill",
    # data, models, backends, attacks, compression, sampler, audit
    "fedrun.data.text.pystdlib": "fedrun.data.pystdlib.PyStdlib",
    "fedrun.data.text.shakespeare": "fedrun.data.shakespeare.Shakespeare",
    "fedrun.data.synthetic.synthetic": "fedrun.data.synthetic.Synthetic",
    "fedrun.sampling.make_sampler": "fedrun.sampling.ClientSampler",
    "fedrun.privacy.audit.no_audit": "fedrun.privacy.audit.NoAudit",
}


@functools.cache
def option_name(group: str, target: str) -> str:
    """The `group=option` whose YAML names `target` (an earlier name read as today's), for
    messages and reports; the class's name when no single option does."""
    from fedrun.config import conf_dir

    target = RENAMED_TARGETS.get(target, target)
    names = [path.stem for path in sorted((conf_dir() / group).glob("*.yaml"))
             if _option_node(path).get("_target_") == target] if (conf_dir() / group).is_dir() else []
    return names[0] if len(names) == 1 else target.rsplit(".", 1)[-1]


def _option_node(path: Path) -> DictConfig:
    """An option's YAML: a mapping."""
    return typing.cast(DictConfig, OmegaConf.load(path))


# ---- capabilities ----------------------------------------------------------------------------

# Every capability a component may declare (a class attribute), by group: its meaning and the
# value a component that does not declare it has. Rules between components (fedrun/checks.py)
# and the builder (fedrun/config.py) read these, never class names.
CAPABILITIES: dict[str, dict[str, tuple[str, Any]]] = {
    "strategy": {
        "needs_individual_updates": ("its aggregate reads each client's update (robust rules, ensemble "
                                     "distillation): DP noise and secure aggregation hide them", False),
        "secure_sum_weighting": ("how its aggregate weighs clients when it is a weighted mean ('examples', "
                                 "'uniform'), so secure aggregation can compute it from sums; None: it cannot", None),
        "secure_sum_extras": ("names of extra vectors its clients send that secure aggregation sums beside the "
                              "update (SCAFFOLD's control deltas)", ()),
        "client_sends_extras": ("its clients send vectors besides the update, which user-level DP does not clip "
                                "or noise", False),
        "needs_plain_sgd": ("its client rule assumes plain local SGD (client.optimizer=sgd, momentum 0)", False),
        "exchanges": ("what clients send: 'weights' (updates), 'logits' (predictions on public data) or 'nothing' "
                      "(strategy=local)", "weights"),
        "averages_plainly": ("its server step adds the example-weighted mean of the updates as is (FedAvg), so a "
                             "LoRA method that forms its own step (flexlora) may take its place", False),
        "trains_centrally": ("it pools the clients' data and trains one model itself, in the main process "
                             "(strategy=centralized): there is no client to attack, protect or compress", False),
        "config_nodes": ("nodes of its config the run builds into objects before building it, by group "
                         "({'public': 'data'}: a public corpus)", {}),
    },
    "privacy": {
        "dp_level": ("the unit its guarantee protects: 'user', 'example', or None (no DP)", None),
        "secure_sum": ("the server sees only the sum of the clients' masked updates: True, or the name of a "
                       "boolean key of its own config that decides it", False),
    },
    "data": {
        "data_kind": ("'text' (byte or token windows) or 'labelled' (features and class labels)", "text"),
    },
    "backend": {
        "trains_on_cpu": ("its workers train on the CPU whatever device=auto finds", False),
    },
    **{group: {"is_noop": ("the option that does nothing (none): changes no update", False)}
       for group in ("attack", "compression")},
    "audit": {
        "is_noop": ("the option that does nothing (none): changes no update", False),
        "plants_secrets": ("it plants text secrets in clients' data, which must then be byte-level text (an "
                           "instance may say no: audit=epsilon with num_canaries 0)", False),
        "inserts_clients": ("canary clients join the population (audit=epsilon): the sampler, the accountant "
                            "and secure aggregation count them as users", False),
    },
}


def component(node: DictConfig | str) -> Any:
    """The class (or function) a config node's `_target_` names; imported, not built."""
    target = node if isinstance(node, str) else node.get("_target_")
    if not target:
        raise FedrunError(f"{node}: names no component (_target_)")
    return get_object(target)


def capability(node: DictConfig | str, group: str, name: str) -> Any:
    """The capability `name` of the component the node names (CAPABILITIES[group] says what it
    means and its default for a component that does not declare it)."""
    _, default = CAPABILITIES[group][name]
    return getattr(component(node), name, default)
