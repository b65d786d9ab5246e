"""What can be set: the config groups, their options, and each option's keys with their defaults
and allowed values, read from the sources validation reads (`fedrun options [GROUP]`).

A group's options are the YAML files of conf/<group>/ (`conf_dir()`); an option's keys are its
component's signature (`config_keys`, whose `Range`/`OneOf` markers are what `validate` checks),
and its defaults are what Hydra composes for `group=option`, as `fedrun train` would. Nothing
here is a second copy of a default or a range, so the listing cannot drift from the checks.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, cast

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from fedrun.client_config import ClientConfig
from fedrun.components import BUILDER_KEYS, Key, _source_of, component, config_keys, option_name
from fedrun.config import compose, conf_dir
from fedrun.core import FedrunError
from fedrun.settings import COMPONENT_GROUPS, EvalSettings, RunSettings

# Records that type a group without a `_target_` (fedrun/config.py `typed`).
RECORDS: dict[str, Any] = {"client": ClientConfig}
TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


@dataclass(frozen=True)
class KeyInfo:
    name: str
    default: str  # as YAML writes it; `???` where the option gives none (set it on the command line)
    allowed: str


@dataclass(frozen=True)
class OptionInfo:
    name: str
    is_default: bool
    keys: list[KeyInfo]
    sets: dict[str, str]  # keys of other groups the option sets (scaffold: client.optimizer=sgd)


def groups() -> dict[str, list[str]]:
    """Every config group and its options, in conf/config.yaml's order."""
    return {group: sorted(p.stem for p in (conf_dir() / group).glob("*.yaml")) for group in default_options()}


def default_options() -> dict[str, list[str]]:
    """The option(s) conf/config.yaml picks in each group (logger may pick several)."""
    primary = cast(DictConfig, OmegaConf.load(conf_dir() / "config.yaml"))
    picked: dict[str, list[str]] = {}
    for entry in primary.get("defaults") or []:
        if isinstance(entry, DictConfig):
            for group, choice in entry.items():
                picked[str(group)] = [str(c) for c in choice] if isinstance(choice, ListConfig) else [str(choice)]
    return picked


def options(group: str) -> list[OptionInfo]:
    """Each option of `group` with its keys; FedrunError naming the groups if `group` is not one."""
    every = groups()
    if group not in every:
        raise FedrunError(f"group: unknown group {group!r}; allowed: {', '.join(every)}")
    defaults = default_options()[group]
    found = []
    # Each option composed on its own (its defaults list included) by the Hydra that `train` uses.
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None, job_name="fedrun"):
        for option in every[group]:
            composed = hydra_compose(f"{group}/{option}")
            sets = {f"{k}.{name}": show(v) for k in map(str, composed) if k != group
                    for name, v in composed[k].items()}
            found.append(OptionInfo(option, option in defaults, option_keys(group, composed[group]), sets))
    return found


def option_keys(group: str, node: DictConfig) -> list[KeyInfo]:
    """The keys of a composed option node: from its component's signature (or the group's record)."""
    if group in COMPONENT_GROUPS:
        target = component(node)
        keys = config_keys(target, group) + [Key(n, kind, default=d) for n, kind, d in BUILDER_KEYS.get(group, [])]
        nodes = getattr(target, "config_nodes", {})  # built from an option of another group (feddf's public)
        built = [KeyInfo(name, option_name(kind, node[name]._target_),
                         f"an option of {kind}: {kind}@{group}.{name}=OPTION, then {group}.{name}.KEY=VALUE")
                 for name, kind in nodes.items()]
        return [info for key in keys for info in key_infos(key, node, target, skip=set(nodes))] + built
    if group in RECORDS:
        return [info for key in config_keys(RECORDS[group]) for info in key_infos(key, node, RECORDS[group])]
    # logger: switches read by fedrun/loggers.py, and the settings beside them
    return [KeyInfo(str(k), show(v), "a string or null") for k, v in node.items() if not isinstance(v, bool)]


def top_level_keys() -> list[KeyInfo]:
    """The run's own keys (RunSettings) and the `eval` node's (EvalSettings), with conf/config.yaml's values."""
    cfg = compose([], check_ranges=False)
    run = [info for key in config_keys(RunSettings) for info in key_infos(key, cfg, RunSettings)]
    return run + [info for key in config_keys(EvalSettings) for info in key_infos(key, cfg.eval, EvalSettings,
                                                                                    prefix="eval.")]


def key_infos(key: Key, node: DictConfig, target: Any, *, prefix: str = "",
              skip: frozenset[str] | set[str] = frozenset()) -> list[KeyInfo]:
    """One line per key; a nested record (model.lora) one line per key of its own."""
    if key.name in skip:
        return []
    value = node.get(key.name) if key.name in node else key.default
    if dataclasses.is_dataclass(key.kind) and isinstance(value, DictConfig):
        source = _source_of(target, key.name)
        return [info for sub in config_keys(source)
                for info in key_infos(sub, value, source, prefix=f"{prefix}{key.name}.")]
    return [KeyInfo(prefix + key.name, show(value), allowed(key))]


def allowed(key: Key) -> str:
    """What validation allows: the markers' words, else the type's."""
    if key.markers:
        return key.describe()
    kind = key.kind if isinstance(key.kind, type) else getattr(key.kind, "__origin__", None)  # list[str]: list
    words = TYPE_WORDS.get(kind) if isinstance(kind, type) else None
    words = words or ("a list" if kind is list else "a mapping" if kind is dict else "any value")
    return f"null or {words}" if key.optional else words


def show(value: Any) -> str:
    """A default as YAML writes it on one line."""
    if value is MISSING or (isinstance(value, str) and value == "???"):
        return "???"
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    if value is None or isinstance(value, (bool, list, dict)):
        return json.dumps(value)
    return str(value)


def options_with_key(group: str, name: str) -> list[str]:
    """The options of `group` one of whose keys is `name` (for the message of an unknown key)."""
    found = []
    for path in sorted((conf_dir() / group).glob("*.yaml")):
        node = cast(DictConfig, OmegaConf.load(path))
        names = {str(k) for k in node if k != "defaults"}
        try:
            names |= {k.name for k in config_keys(component(node), group)} if "_target_" in node else set()
        except Exception:  # noqa: BLE001 (an option whose optional package is missing: its YAML keys still count)
            pass
        if name in names:
            found.append(path.stem)
    return found
