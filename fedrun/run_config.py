"""A run directory's config.yaml, read as untrusted input.

`resume`, `eval`, `generate` and `export` rebuild a run from its config.yaml, and run
directories travel between people (sweeps on shared clusters, the artefacts of a paper).
Hydra builds whatever a `_target_` names, anywhere in a node it instantiates, so the file is
read as data and checked before anything is built from it:

- a regular file of at most MAX_CONFIG_BYTES, parsed by OmegaConf's safe YAML loader, without
  aliases (a few lines of nested aliases expand to billions of nodes);
- `_target_` (and Hydra's other special keys) only at the paths where a shipped option of conf/
  has one, with a value one of those options gives it: no extra or nested components;
- no interpolations: fedrun writes config.yaml resolved, and `${oc.env:...}` would read the
  environment;
- every other key typed by the schemas of the options the run used (fedrun/schemas.py) and its
  values range-checked (fedrun/checks.py), as `fedrun train` checks its own overrides.
"""
from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf._utils import get_yaml_loader  # the loader OmegaConf.load uses (safe, OmegaConf's floats)
from omegaconf.errors import OmegaConfBaseException

from fedrun import config
from fedrun.components import RENAMED_TARGETS
from fedrun.core import FedrunError
from fedrun.rundir import read_regular_bytes

log = logging.getLogger(__name__)
MAX_CONFIG_BYTES = 1 << 20  # fedrun's own config.yaml files are a few KiB
SPECIAL_KEYS = ("_target_", "_partial_", "_args_", "_recursive_", "_convert_")
REFUSED = "refused (a run directory is untrusted input)"


def load_run_config(run_dir: Path) -> DictConfig:
    """The run's config.yaml, checked as the module docstring says; one-line FedrunError otherwise."""
    path = Path(run_dir) / "config.yaml"
    try:
        tree = parse_yaml(read_regular_bytes(path, limit=MAX_CONFIG_BYTES))
        if not isinstance(tree, dict):
            raise FedrunError(f"not a mapping of keys to values; {REFUSED}")
        renamed(tree)
        check_untrusted(tree)
        return typed_config(tree)
    except FedrunError as e:
        message = str(e).removeprefix(f"{path}: ")  # read_regular_bytes names the path itself
        raise FedrunError(f"run_dir: {path}{'' if message.startswith('is not') else ':'} {message}") from None


# ---- YAML ------------------------------------------------------------------------------------

class _NoAliasLoader(get_yaml_loader()):  # type: ignore[misc]
    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed",
                                              self.peek_event().start_mark)
        return super().compose_node(parent, index)


def parse_yaml(data: bytes) -> Any:
    """Plain Python values from YAML text; FedrunError `is not valid YAML (line N: ...)`."""
    try:
        return yaml.load(data, Loader=_NoAliasLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise FedrunError(f"is not valid YAML ({where}{problem})") from None
    except RecursionError:
        raise FedrunError("is not valid YAML (nested too deeply)") from None


# ---- what conf/ ships ------------------------------------------------------------------------

@dataclass
class Mount:
    """A config group as placed in the composed config: the options conf/<group>/*.yaml at `path`."""

    path: str  # where an option lands, e.g. strategy.public
    selector: str  # the override's left side that picks one, e.g. data@strategy.public
    parent: str | None  # the override (group=option) whose file places this group; None: conf/config.yaml
    many: bool  # a list of options (logger: [csv])
    options: dict[str, set[str]] = field(default_factory=dict)  # option -> its keys


@dataclass
class Shipped:
    """Every special key the shipped options place, by dotted path, with the values they give it."""

    special: dict[str, set[Any]] = field(default_factory=dict)
    mounts: list[Mount] = field(default_factory=list)
    option_of: dict[tuple[str, str], str] = field(default_factory=dict)  # (mount path, _target_) -> option


@functools.cache
def shipped() -> Shipped:
    found = Shipped()
    _walk_defaults(_conf_yaml(config.conf_dir() / "config.yaml"), found, group="", path="", parent=None)
    return found


def _walk_defaults(node: dict, found: Shipped, *, group: str, path: str, parent: str | None) -> set[Any]:
    """Follow a defaults list: a file merged here (`/base/text@_here_`, `central_dp`), or a group
    mounted at a package (`data: pystdlib`, `/data@public: pystdlib`) whose every option may be
    chosen. Return the `_target_` values the merged files give `path`."""
    targets: set[Any] = set()
    for entry in node.get("defaults") or []:
        if isinstance(entry, str):
            name, _, package = entry.partition("@")
            file = _group_file(name, group)
            if file is not None:  # schemas (/schema/...) and _self_ are not files of conf/
                included = _walk_file(file, found, path=_package(path, package), parent=parent,
                                      group=str(Path(name.lstrip("/")).parent) if name.startswith("/") else group)
                targets |= included if package in ("", "_here_") else set()
        elif isinstance(entry, dict):
            for key, choice in entry.items():
                name, _, package = str(key).partition("@")
                sub = name.lstrip("/") if name.startswith("/") else "/".join(filter(None, [group, name]))
                mount_path = _package(path, package) if package else sub.replace("/", ".")
                _mount(found, sub, mount_path, parent=parent, many=isinstance(choice, list),
                       selector=f"{sub}@{mount_path}" if package else sub)
    return targets


def _mount(found: Shipped, group: str, path: str, *, parent: str | None, many: bool, selector: str) -> None:
    mount = Mount(path=path, selector=selector, parent=parent, many=many)
    found.mounts.append(mount)
    for file in sorted((config.conf_dir() / group).glob("*.yaml")):
        targets = _walk_file(file, found, group=group, path=path, parent=f"{selector}={file.stem}")
        mount.options[file.stem] = set(_conf_yaml(file)) - {"defaults"}
        for target in targets:
            found.option_of.setdefault((path, target), file.stem)


def _walk_file(file: Path, found: Shipped, *, group: str, path: str, parent: str | None) -> set[Any]:
    """Record the special keys of one option file (and what its defaults list pulls in) placed at
    `path`; return the `_target_` values it gives `path` itself."""
    node = _conf_yaml(file)
    _record({k: v for k, v in node.items() if k != "defaults"}, found, path)
    included = _walk_defaults(node, found, group=group, path=path, parent=parent)
    return {node["_target_"]} if "_target_" in node else included  # its own wins, as in Hydra's merge


def _record(node: Any, found: Shipped, path: str) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            where = _join(path, str(key))
            if key in SPECIAL_KEYS:
                found.special.setdefault(where, set()).add(value)
            _record(value, found, where)


def _group_file(name: str, group: str) -> Path | None:
    relative = name.lstrip("/") if name.startswith("/") else "/".join(filter(None, [group, name]))
    file = config.conf_dir() / f"{relative}.yaml"
    return file if file.is_file() else None


def _package(path: str, package: str) -> str:
    return path if package in ("", "_here_") else _join(path, package)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


@functools.cache
def _conf_yaml(file: Path) -> dict:
    return OmegaConf.to_container(OmegaConf.load(file)) or {}  # type: ignore[return-value]


# ---- checks ----------------------------------------------------------------------------------

def check_untrusted(node: Any, path: str = "") -> None:
    """Refuse special keys where conf/ has none (or with values it never gives) and interpolations."""
    if isinstance(node, dict):
        for key, value in node.items():
            where = _join(path, str(key))
            allowed = shipped().special.get(where, set())
            if key in SPECIAL_KEYS and not (_hashable(value) and value in allowed):
                what = "is not a component fedrun ships" if key == "_target_" else "is not a setting fedrun ships"
                raise FedrunError(f"{where}: {value!r} {what}; {REFUSED}")
        for key, value in node.items():
            check_untrusted(value, _join(path, str(key)))
    elif isinstance(node, list):
        for i, item in enumerate(node):
            check_untrusted(item, f"{path}[{i}]")
    elif isinstance(node, str) and "${" in node:
        raise FedrunError(f"{path}: {node!r} is an interpolation, and fedrun writes config.yaml resolved; {REFUSED}")


def renamed(node: Any, path: str = "") -> None:
    """Replace, in place, the `_target_`s an earlier fedrun wrote by the components' names now."""
    if isinstance(node, dict):
        target = node.get("_target_")
        if isinstance(target, str) and target in RENAMED_TARGETS:
            node["_target_"] = RENAMED_TARGETS[target]
            log.warning("%s: %s is now %s (read as such; an earlier fedrun wrote this run directory)",
                        _join(path, "_target_"), target, node["_target_"])
        for key, value in node.items():
            renamed(value, _join(path, str(key)))


def _hashable(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool)) or value is None


def typed_config(tree: dict) -> DictConfig:
    """The run's values merged onto a fresh composition of the options it used, so unknown keys and
    wrong types fail as they would in `fedrun train`; then missing values and ranges are checked."""
    base = config.compose(chosen_options(tree), check_ranges=False)
    _open_free_form(base)
    try:
        cfg = config.typed(cast(DictConfig, OmegaConf.merge(base, tree)))  # a composed config merged stays a mapping
    except FedrunError as e:
        raise FedrunError(f"{e}; {REFUSED}") from None
    except OmegaConfBaseException as e:
        message = re.sub(r"Key '.*' is not in struct$", "unknown key", config.one_line(e))  # logger's words
        message = re.sub(r"allowed keys here: $", "allowed keys here: none", message)  # an option without settings
        raise FedrunError(f"{message}; {REFUSED}") from None
    if missing := sorted(OmegaConf.missing_keys(cfg)):
        raise FedrunError(f"{missing[0]}: has no value; {REFUSED}")
    config.validate(cfg)
    return cfg


def _open_free_form(node: DictConfig, path: str = "") -> None:
    """Let a schemaless dict that is not a group's node (model.from_config, a transformers config)
    take keys its default lacks, as `+model.from_config.KEY=...` does; a group without a schema
    (logger) keeps only its options' keys."""
    mounts = {m.path for m in shipped().mounts}
    for key in node:
        child = None if OmegaConf.is_missing(node, key) else node[key]
        if isinstance(child, DictConfig):
            if OmegaConf.get_type(child) is dict and _join(path, str(key)) not in mounts:
                OmegaConf.set_struct(child, False)
            _open_free_form(child, _join(path, str(key)))


def chosen_options(tree: dict) -> list[str]:
    """The overrides that compose the options the run used: each group's option from its `_target_`
    (a list group such as logger: the options whose keys it has)."""
    overrides: list[str] = []
    for mount in shipped().mounts:
        node = _node(tree, mount.path)
        if not isinstance(node, dict) or (mount.parent is not None and mount.parent not in overrides):
            continue
        if mount.many:
            options = [o for o, keys in mount.options.items() if keys & set(node)]
            overrides += [f"{mount.selector}=[{','.join(options)}]"] if options else []
        elif isinstance(target := node.get("_target_"), str) and (
                option := shipped().option_of.get((mount.path, target))) is not None:
            overrides.append(f"{mount.selector}={option}")
    return overrides


def _node(tree: Any, path: str) -> Any:
    for key in path.split("."):
        if not isinstance(tree, (dict, DictConfig)) or key not in tree:
            return None
        tree = tree[key]
    return tree
