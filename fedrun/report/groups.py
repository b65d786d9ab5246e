"""From runs to groups: the config keys that tell runs apart, filters, and seed groups.

Only finished runs are grouped (by default): a run that crashed at round 2 of 6 averaged with
one that finished would be a mean of two different things. The others (running, interrupted,
crashed, failed) are set apart, one row each with their status and the last round they reached.

Presentation of a config key: its dotted name (`client.lr`), except that `X._target_` is shown
as `X` with the last component of the target as its value (`strategy` = `fedadam` for
`fedrun.strategies.fedadam`; the full target where two would otherwise look alike), and
`config.rounds` (the planned rounds, renamed beside the result `rounds`) as `rounds`. Values are
shown as in the config: `0.001`, `true`, `null`; an empty cell means the key is absent.
"""
from __future__ import annotations

import functools
import math
import numbers
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from fedrun.components import option_name
from fedrun.config import conf_dir
from fedrun.core import FedrunError
from fedrun.report.runs import CONFIG_PREFIX, OPTIONAL, RESULTS

IGNORED = {"run_dir", "name", "seed"}  # differ between runs of one setting; never distinguish groups
FINISHED = "finished"
STATUSES = (FINISHED, "running", "interrupted", "crashed", "failed")
METRICS = [r for r in RESULTS if r not in ("path", "status", "error", "note")]
DEFAULT_METRICS = ["final_eval_ppl", "final_eval_acc", "best_eval_ppl", "epsilon", "epsilon_empirical", "rounds",
                   "seconds", "bytes"]
TARGET = "._target_"


def config_keys(runs: pd.DataFrame) -> list[str]:
    return [c for c in runs.columns if c not in RESULTS]


def display_name(key: str) -> str:
    key = key.removeprefix(CONFIG_PREFIX)
    return key.removesuffix(TARGET)


def format_value(value: Any) -> str:
    """A config value as the config shows it; '' for a key absent from the run's config."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isnan(value):
        return ""
    return str(value)  # repr for floats: the shortest text that reads back the same number


def display_values(key: str, values: pd.Series, runs: pd.DataFrame | None = None) -> pd.Series:
    """The values of a config column as shown: a `_target_` as the option that names it
    (`strategy=fedadam`: fedadam; `attack=sign_flip`, told from `scale` by the run's `attack.kind`
    when `runs` is given) when the names stay distinct."""
    text = values.map(format_value)
    if not key.endswith(TARGET):
        return text
    group = key.removeprefix(CONFIG_PREFIX).split(".")[0]
    node = key.removesuffix("_target_")
    columns = [c for c in (runs.columns if runs is not None else []) if c.startswith(node) and c != key]

    def chosen(index: Any, target: str) -> str:  # the option the run chose
        if not target or runs is None:
            return option_name(group, target) if target else target
        return chosen_option(group, target, {c.removeprefix(node): runs.at[index, c] for c in columns})

    short = pd.Series([chosen(i, t) for i, t in text.items()], index=text.index, dtype=object)
    distinct = short.nunique() == len(set(zip(text, short)))  # no two components shown under one name
    return short if distinct else text


@functools.cache
def _options_naming(group: str, target: str) -> dict[str, dict]:
    """{option: its YAML's keys and values} for the options of `group` whose `_target_` is `target`."""
    found = {}
    for path in sorted((conf_dir() / group).glob("*.yaml")) if (conf_dir() / group).is_dir() else []:
        node = OmegaConf.to_container(OmegaConf.load(path))
        if isinstance(node, dict) and node.get("_target_") == target:
            found[path.stem] = node
    return found


def identity_keys(group: str, target: str) -> list[str]:
    """Keys whose values differ between every two options naming `target` (attack's `kind`)."""
    options = list(_options_naming(group, target).values())
    if len(options) < 2:
        return []
    keys = set.intersection(*(set(o) for o in options)) - {"_target_", "defaults"}
    return sorted(k for k in keys if len({repr(o[k]) for o in options}) == len(options))


def chosen_option(group: str, target: str, values: dict[str, Any]) -> str:
    """The option a run chose: the one naming `target`, or where several do, the one whose
    identity keys the run's values match; the class's name when none does."""
    options = _options_naming(group, target)
    for key in identity_keys(group, target):
        matching = [name for name, node in options.items() if node[key] == values.get(key)]
        if len(matching) == 1:
            return matching[0]
    return option_name(group, target)


def distinguishing_keys(runs: pd.DataFrame) -> list[str]:
    """Config keys (dotted, as in `runs`) with different values in different runs, in config order.

    A key only some runs have (`strategy.server_lr` of FedAdam beside FedAvg, or a key added to
    the schema since older runs) distinguishes them only if the runs that have it disagree:
    its presence follows from another key, or from the version that wrote the run.
    """
    keys = []
    for key in config_keys(runs):
        if key in IGNORED or key.startswith("hydra."):
            continue
        present = runs[key].map(format_value)
        if present[present != ""].nunique() > 1:
            keys.append(key)
    # A key that only tells apart options of one class (attack.kind) repeats the option shown for it.
    repeated = {f"{k.removesuffix('_target_')}{name}" for k in keys if k.endswith(TARGET)
                for target in runs[k].dropna().unique()
                for name in identity_keys(k.removeprefix(CONFIG_PREFIX).split(".")[0], str(target))}
    return [k for k in keys if k not in repeated]


# ---- filtering --------------------------------------------------------------------------------

def filter_runs(runs: pd.DataFrame, where: Iterable[str]) -> pd.DataFrame:
    """Runs matching every `key=value` clause; clauses on the same key are alternatives.

    `key` is a dotted config key (`strategy._target_`, `client.lr`) or a key as shown
    (`strategy`, compared with the short target). Numbers compare as numbers (`1e-3` = `0.001`).
    """
    wanted: dict[str, list[str]] = defaultdict(list)
    for clause in where:
        key, sep, value = clause.partition("=")
        if not sep or not key.strip():
            raise FedrunError(f"report --where: {clause!r} is not key=value (e.g. strategy=fedadam, client.lr=0.1)")
        wanted[key.strip()].append(value.strip())
    mask = pd.Series(True, index=runs.index)
    for key, values in wanted.items():
        shown = shown_column(runs, key)
        mask &= shown.map(lambda v, values=values: any(matches(v, want) for want in values))
    return runs[mask]


def shown_column(runs: pd.DataFrame, key: str) -> pd.Series:
    keys = config_keys(runs)
    if key in keys:
        return runs[key]
    for column in keys:
        if display_name(column) == key:
            return display_values(column, runs[column], runs) if column.endswith(TARGET) else runs[column]
    shown = sorted({display_name(k) for k in keys})
    raise FedrunError(f"report --where: unknown key {key!r}; keys: {', '.join(shown) or '(no runs)'}")


def matches(value: Any, want: str) -> bool:
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value):
        try:
            return float(value) == float(want)
        except ValueError:
            return False
    text = format_value(value)
    return text.lower() == want.lower() if isinstance(value, bool) or value is None else text == want


# ---- grouping ---------------------------------------------------------------------------------

def group_runs(runs: pd.DataFrame, keys: list[str], metrics: list[str] | None = None, *,
               sort: str | None = None, where: Iterable[str] = (),
               statuses: Iterable[str] = (FINISHED,)) -> pd.DataFrame:
    """One row per setting (runs equal in `keys`, i.e. differing by seed only), of the runs whose
    status is in `statuses` (finished ones by default; see `set_apart` for the others).

    Columns: each key as shown, `n`, a count per status, `<metric>_mean` and `<metric>_std`
    (sample std, ddof=1: NaN for one run) for each metric, and `runs` (the member paths).
    Ordered by the keys, or by `sort` (a metric: `eval_ppl` means `final_eval_ppl`), best first:
    ascending except for accuracies. Runs are filtered by `where` first (see `filter_runs`).
    """
    runs = filter_runs(runs, where)
    runs = runs[runs["status"].isin(list(statuses))]
    if metrics is None:  # eval.choices' and eval.per_client's metrics where some run measured them
        measured = [f"final_{m}" for m in OPTIONAL
                    if pd.to_numeric(runs.get(f"final_{m}", pd.Series(dtype=float)), errors="coerce").notna().any()]
        metrics = DEFAULT_METRICS + measured
    metrics = list(metrics)
    sort_by = resolve_metric(sort) if sort else None
    if sort_by and sort_by not in metrics:
        metrics.append(sort_by)
    names = [display_name(k) for k in keys]
    shown = [display_values(k, runs[k], runs) for k in keys]
    members: dict[tuple, list] = defaultdict(list)
    for index, label in zip(runs.index, zip(*shown) if keys else [()] * len(runs)):
        members[label].append(index)
    rows = [group_row(runs.loc[index], dict(zip(names, label)), metrics) for label, index in members.items()]
    rows.sort(key=lambda row: [natural(row[name]) for name in names])
    if sort_by:
        rows.sort(key=lambda row: sort_key(row[f"{sort_by}_mean"], descending="acc" in sort_by))
    columns = [*names, "n", *STATUSES, *(f"{m}_{s}" for m in metrics for s in ("mean", "std")), "runs"]
    return pd.DataFrame(rows, columns=columns)


def set_apart(runs: pd.DataFrame, keys: list[str], *, statuses: Iterable[str] = (FINISHED,)) -> pd.DataFrame:
    """The runs `group_runs` leaves out (status not in `statuses`), one row each, in key order:
    each key as shown, `status`, `rounds` (the last round in metrics.csv), `planned`, `path`, `error`."""
    runs = runs[~runs["status"].isin(list(statuses))]
    names = [display_name(k) for k in keys]
    planned = runs.get(CONFIG_PREFIX + "rounds", pd.Series(math.nan, index=runs.index))
    shown = {n: display_values(k, runs[k], runs) for n, k in zip(names, keys)}
    table = pd.DataFrame({**shown, "status": runs["status"], "rounds": runs["rounds"], "planned": planned,
                          "path": runs["path"], "error": runs["error"]},
                         columns=[*names, "status", "rounds", "planned", "path", "error"])
    order = sorted(table.index, key=lambda i: [*(natural(str(table.at[i, n])) for n in names), table.at[i, "path"]])
    return table.loc[order].reset_index(drop=True)


def group_row(members: pd.DataFrame, label: dict[str, str], metrics: list[str]) -> dict[str, Any]:
    row: dict[str, Any] = {**label, "n": len(members)}
    row |= {s: int((members["status"] == s).sum()) for s in STATUSES}
    for m in metrics:
        values = pd.to_numeric(members[m], errors="coerce") if m in members else pd.Series(dtype=float)
        row[f"{m}_mean"], row[f"{m}_std"] = values.mean(), values.std()
    row["runs"] = list(members["path"])
    return row


def resolve_metric(name: str) -> str:
    for candidate in (name, f"final_{name}"):
        if candidate in METRICS:
            return candidate
    raise FedrunError(f"report --sort: unknown metric {name!r}; allowed: eval_loss, eval_ppl, eval_acc, "
                      f"{', '.join(METRICS)}")


def natural(text: str) -> tuple:
    """Numbers before text, numbers by value: 0.01 < 0.1 < 1 < 10 < 'adam'."""
    try:
        return (0, float(text), "")
    except ValueError:
        return (1, 0.0, text)


def sort_key(value: float, *, descending: bool) -> tuple:
    if value is None or math.isnan(value):
        return (1, 0.0)  # groups without the metric go last either way
    return (0, -value if descending else value)
