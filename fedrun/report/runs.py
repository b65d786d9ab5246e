"""Reading run directories into one table: one row per run, its status, config and results.

A run directory is any folder holding `config.yaml` and `metrics.csv`. Nothing here raises
on a partial or malformed run (a run killed mid-write, an empty file, a missing column):
the run is still listed, with what could be read, and a `note` saying what could not.

Status: `finished` when summary.json exists; else from status.json (written by the run):
`failed` (with its error), `running` while its state is running and its pid is alive on this
machine, `finished` if it says so, otherwise `crashed`. Without status.json (older runs), a run
is `running` if metrics.csv changed in the last minute, else `crashed`.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import numbers
import os
import time
from pathlib import Path
from typing import Any

import pandas as pd

from fedrun.core import FedrunError
from fedrun.run_config import MAX_CONFIG_BYTES, parse_yaml
from fedrun.rundir import read_regular_bytes

log = logging.getLogger(__name__)

EVAL = ("eval_loss", "eval_ppl", "eval_acc")
# Final values of metrics only some runs have: eval.choices' accuracy, eval.per_client's ppl spread.
OPTIONAL = ("eval_mc_acc", "eval_client_ppl_mean", "eval_client_ppl_p10", "eval_client_ppl_p90")
RESULTS = ["path", "status", "rounds", *(f"final_{m}" for m in EVAL), *(f"best_{m}" for m in EVAL),
           *(f"final_{m}" for m in OPTIONAL), "epsilon", "epsilon_empirical", "bytes", "seconds", "error", "note"]
CONFIG_PREFIX = "config."  # for a config key that has a result's name (`rounds`: planned, not reached)
FRESH_SECONDS = 60  # a run with no status.json whose metrics.csv changed this recently is running
MAX_JSON_BYTES = 1 << 20  # status.json and summary.json are a few KiB
MAX_TABLE_BYTES = 1 << 30  # metrics.csv, clients.csv: a long run at population scale stays far below


def find_runs(paths: list[Path]) -> list[Path]:
    """Every run directory at or under `paths`, each once, in path order."""
    found: set[Path] = set()
    for path in map(Path, paths):
        if not path.exists():
            raise FedrunError(f"report: no such file or directory: {path}")
        if path.is_file():  # a file of a run (its metrics.csv, say) names that run
            path = path.parent
        candidates = [path, *(m.parent for m in path.rglob("metrics.csv"))]
        found |= {c.resolve() for c in candidates if (c / "config.yaml").is_file() and (c / "metrics.csv").is_file()}
    return sorted(found)


def collect_runs(paths: list[Path]) -> pd.DataFrame:
    """One row per run under `paths`: path, status, results (RESULTS), then config keys (dotted)."""
    results, configs = [], []
    for run in find_runs(paths):
        result, config = read_run(run)
        results.append(result)
        configs.append(config)
    # object dtype keeps config values as written (an int seed stays 1, not 1.0; null stays None)
    return pd.concat([pd.DataFrame(results, columns=RESULTS), pd.DataFrame(configs, dtype=object)], axis=1)


def read_run(run: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    notes: list[str] = []
    metrics = read_metrics(run / "metrics.csv", notes)
    summary = read_json(run / "summary.json", notes)
    status, error = run_status(run, notes)
    config = read_config(run / "config.yaml", notes)
    for note in notes:
        log.warning("%s: %s", run, note)
    result = {"path": str(run), "status": status, **results(metrics, summary or {}), "error": error,
              "note": "; ".join(notes)}
    return result, config


# ---- status -----------------------------------------------------------------------------------

def run_status(run: Path, notes: list[str]) -> tuple[str, str | None]:
    """(status, error): finished, failed, interrupted, running or crashed; error only for failed runs."""
    if (run / "summary.json").exists():
        return "finished", None
    status = read_json(run / "status.json", notes)
    if not status:
        fresh = time.time() - (run / "metrics.csv").stat().st_mtime < FRESH_SECONDS
        return ("running" if fresh else "crashed"), None
    state = status.get("state")
    if state == "failed":
        return "failed", str(status.get("error") or "(no error recorded)")
    if state == "finished":  # the run says so, though summary.json is missing
        return "finished", None
    if state == "interrupted":  # Ctrl-C or SIGTERM: stopped cleanly, resumable
        return "interrupted", None
    return ("running" if state == "running" and pid_alive(status.get("pid")) else "crashed"), None


def pid_alive(pid: Any) -> bool:
    """Whether process `pid` exists on this machine (signal 0 checks without sending anything)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:  # 0 and -1 would address groups
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return False
    return True


def read_json(path: Path, notes: list[str]) -> dict | None:
    if not path.exists():
        return None
    try:
        data = json.loads(read_regular_bytes(path, limit=MAX_JSON_BYTES))
    except FedrunError as e:  # a FIFO would block the report forever: only regular files are read
        notes.append(f"{path.name} skipped ({str(e).removeprefix(f'{path}: ')})")
        return None
    except ValueError as e:
        notes.append(f"{path.name} unreadable ({type(e).__name__})")
        return None
    if not isinstance(data, dict):
        notes.append(f"{path.name} is not a JSON object")
        return None
    return data


# ---- metrics ----------------------------------------------------------------------------------

def read_metrics(path: Path, notes: list[str] | None = None) -> pd.DataFrame:
    """A per-round CSV as numbers, one row per round, skipping torn and malformed lines.

    A line without its newline at the end of the file is a write cut short: it is dropped even
    when it has every field (its last number may be truncated). Text becomes NaN.
    """
    notes = [] if notes is None else notes
    table = read_csv_rows(path, notes)
    if "round" not in table:
        if len(table.columns):
            notes.append(f"{path.name}: no round column")
        return pd.DataFrame()
    frame = table.apply(pd.to_numeric, errors="coerce")
    frame = frame[frame["round"].notna()]
    return frame.drop_duplicates("round", keep="last").sort_values("round").reset_index(drop=True)


def read_csv_rows(path: Path, notes: list[str]) -> pd.DataFrame:
    """A CSV as strings, dropping a torn last line and lines with the wrong number of fields."""
    try:
        text = read_regular_bytes(path, limit=MAX_TABLE_BYTES).decode(errors="replace")
    except FedrunError as e:
        notes.append(f"{path.name} unreadable ({str(e).removeprefix(f'{path}: ')})")
        return pd.DataFrame()
    lines = text.splitlines()
    if lines and not text.endswith(("\n", "\r")):
        lines.pop()
        notes.append(f"{path.name}: dropped a torn last line")
    rows = list(csv.reader(lines))
    if not rows:
        notes.append(f"{path.name} is empty")
        return pd.DataFrame()
    header, body = rows[0], [r for r in rows[1:] if len(r) == len(rows[0])]
    if len(body) < len(rows) - 1:
        notes.append(f"{path.name}: skipped {len(rows) - 1 - len(body)} malformed line(s)")
    return pd.DataFrame(body, columns=header)


def results(metrics: pd.DataFrame, summary: dict) -> dict[str, float]:
    """Key results from metrics.csv, each filled from summary.json where metrics.csv lacks it."""
    out = {"rounds": column(metrics, "round").max(), "epsilon": last(column(metrics, "epsilon")),
           "epsilon_empirical": last(column(metrics, "epsilon_empirical")),  # audit=epsilon's estimate
           "bytes": total(metrics, "bytes_up", "bytes_down"), "seconds": total(metrics, "seconds")}
    evaluated = metrics[[c for c in EVAL if c in metrics]].dropna(how="all")
    for m in EVAL:
        values = column(evaluated, m)
        out[f"final_{m}"] = values.iloc[-1] if len(values) else math.nan
        out[f"best_{m}"] = values.max() if m == "eval_acc" else values.min()
    for m in OPTIONAL:
        out[f"final_{m}"] = last(column(metrics, m))
    fallback = {"rounds": summary.get("rounds"), "epsilon": summary.get("epsilon"),
                "bytes": _sum(summary.get("bytes_up"), summary.get("bytes_down")), "seconds": summary.get("seconds"),
                **{f"{k}_{m}": (summary.get(k) or {}).get(m) for k in ("final", "best") for m in EVAL}}
    return {k: _number(fallback.get(k)) if math.isnan(_number(v)) else _number(v) for k, v in out.items()}


def column(frame: pd.DataFrame, name: str) -> pd.Series:
    return frame[name] if name in frame else pd.Series(dtype=float)


def last(values: pd.Series) -> float:
    values = values.dropna()
    return values.iloc[-1] if len(values) else math.nan


def total(frame: pd.DataFrame, *names: str) -> float:
    present = [frame[n] for n in names if n in frame]
    return float(sum(s.sum() for s in present)) if present and len(frame) else math.nan


def _sum(*values: Any) -> float | None:
    present = [v for v in values if isinstance(v, numbers.Real)]
    return float(sum(present)) if present else None


def _number(value: Any) -> float:
    return float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else math.nan


# ---- config -----------------------------------------------------------------------------------

def read_config(path: Path, notes: list[str]) -> dict[str, Any]:
    """config.yaml flattened to dotted keys (`client.lr`, `strategy._target_`), values as written.

    Interpolations are not resolved: fedrun writes config.yaml resolved, and `${oc.env:...}` in
    someone else's run would copy this machine's environment into the report.
    """
    try:
        tree = parse_yaml(read_regular_bytes(path, limit=MAX_CONFIG_BYTES))
    except FedrunError as e:
        notes.append(f"config.yaml unreadable: {str(e).removeprefix(f'{path}: ')}")
        return {}
    if not isinstance(tree, dict):
        notes.append("config.yaml is not a mapping")
        return {}
    return {(CONFIG_PREFIX + k if k in RESULTS else k): v for k, v in flatten(tree).items()}


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flatten(value, name + ".")
        else:
            flat[name] = json.dumps(value) if isinstance(value, list) else value
    return flat
