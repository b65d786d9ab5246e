"""The per-group table as text: rich for the terminal, the same cells for Markdown and HTML;
and the runs set apart (not finished, so not in the means) as a table of their own."""
from __future__ import annotations

import math
import numbers
from typing import Any

import pandas as pd
from rich.table import Table

from fedrun.report.groups import STATUSES
from fedrun.words import plural

HEADERS = {"final_eval_loss": "eval loss", "final_eval_ppl": "eval ppl", "final_eval_acc": "eval acc",
           "best_eval_loss": "best loss", "best_eval_ppl": "best ppl", "best_eval_acc": "best acc",
           "final_eval_mc_acc": "mc acc", "final_eval_client_ppl_mean": "client ppl",
           "final_eval_client_ppl_p10": "client p10", "final_eval_client_ppl_p90": "client p90",
           "epsilon": "epsilon", "epsilon_empirical": "eps empirical", "rounds": "reached", "seconds": "seconds",
           "bytes": "MB"}


def key_columns(groups: pd.DataFrame) -> list[str]:
    columns = list(groups.columns)
    return columns[:columns.index("n")]


def shown_metrics(groups: pd.DataFrame) -> list[str]:
    """Metrics of the table that some group has a value for."""
    start = list(groups.columns).index("n")
    means = [c for c in groups.columns[start:] if c.endswith("_mean")]
    return [c.removesuffix("_mean") for c in means if groups[c].notna().any()]


def all_finished(groups: pd.DataFrame) -> bool:
    return bool((groups["finished"] == groups["n"]).all())


def format_number(metric: str, value: float, *, digits: int = 4) -> str:
    if value is None or math.isnan(value):
        return "-"
    if metric == "bytes":
        value /= 1e6  # shown in MB
    if metric == "rounds" and float(value).is_integer():
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


def format_cell(metric: str, mean: float, std: float) -> str:
    """`mean ± std`; the mean alone where std is undefined (one run)."""
    if mean is None or math.isnan(mean) or std is None or math.isnan(std):
        return format_number(metric, mean)
    return f"{format_number(metric, mean)} ± {format_number(metric, std, digits=2)}"


def status_text(row: pd.Series) -> str:
    return ", ".join(f"{row[s]} {s}" for s in STATUSES if row[s])


def cells(groups: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the table as strings: keys, n, status (unless all finished), metrics."""
    keys, metrics = key_columns(groups), shown_metrics(groups)
    with_status = not all_finished(groups)
    header = [*keys, "n", *(["status"] if with_status else []), *(HEADERS.get(m, m) for m in metrics)]
    rows = []
    for _, row in groups.iterrows():
        status = [status_text(row)] if with_status else []
        rows.append([*(str(row[k]) for k in keys), str(row["n"]), *status,
                     *(format_cell(m, row[f"{m}_mean"], row[f"{m}_std"]) for m in metrics)])
    return header, rows


def caption(groups: pd.DataFrame, apart: pd.DataFrame | None = None) -> str:
    counts = ", ".join(f"{int(groups[s].sum())} {s}" for s in STATUSES if groups[s].sum())
    text = f"{plural(int(groups['n'].sum()), 'run')} in {plural(len(groups), 'group')}"
    text += f" ({counts})" if counts else ""
    text += "; mean ± std over seeds"
    if apart is not None and len(apart):
        others = ", ".join(f"{n} {s}" for s, n in apart["status"].value_counts(sort=False).items())
        text += f"; not in the means: {others} (listed apart)"
    return text


def render_table(groups: pd.DataFrame, apart: pd.DataFrame | None = None) -> Table:
    """The groups as a rich table: one row per group, `mean ± std` per metric."""
    header, rows = cells(groups)
    table = Table(title="fedrun report", caption=caption(groups, apart))
    numeric_from = len(key_columns(groups))
    for i, name in enumerate(header):
        table.add_column(name, justify="right" if i >= numeric_from and name != "status" else "left")
    for row in rows:
        table.add_row(*row)
    return table


def apart_keys(apart: pd.DataFrame) -> list[str]:
    columns = list(apart.columns)
    return columns[:columns.index("status")]


def apart_cells(apart: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the runs set apart: keys, status, `reached` (last round of planned), path, error."""
    keys = apart_keys(apart)
    rows = [[*(str(run[k]) for k in keys), run["status"], reached(run["rounds"], run["planned"]), run["path"],
             run["error"] if isinstance(run["error"], str) else ""] for _, run in apart.iterrows()]
    return [*keys, "status", "reached", "path", "error"], rows


def reached(rounds: float, planned: Any) -> str:
    """`2 of 6`: the last round in metrics.csv and the planned rounds (when the config has them)."""
    last = format_number("rounds", rounds)
    known = isinstance(planned, numbers.Integral) and not isinstance(planned, bool)
    return f"{last} of {planned}" if known else last


def render_apart(apart: pd.DataFrame, *, title: str = "not finished: not in the means above") -> Table:
    """The runs set apart as a rich table, one row each."""
    header, rows = apart_cells(apart)
    table = Table(title=title)
    for name in header:
        table.add_column(name, justify="right" if name == "reached" else "left")
    for row in rows:
        table.add_row(*row)
    return table


RUN_HEADER = ["path", "group", "status", "rounds", "eval ppl", "eval acc", "error"]


def run_rows(runs: pd.DataFrame, labels: dict[str, str]) -> list[list[str]]:
    """One row per run of the groups (`labels`: path -> group label), for the runs tables."""
    rows = []
    for _, run in runs[runs["path"].isin(labels)].iterrows():
        error = run["error"] if isinstance(run["error"], str) else ""
        rows.append([run["path"], labels[run["path"]], run["status"], format_number("rounds", run["rounds"]),
                     format_number("final_eval_ppl", run["final_eval_ppl"]),
                     format_number("final_eval_acc", run["final_eval_acc"]), error])
    return rows
