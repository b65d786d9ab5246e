"""The per-group table as text: rich for the terminal, the same cells for Markdown and HTML;
and the runs set apart (not finished, so not in the means) as a table of their own."""
from __future__ import annotations

import math
import numbers
from typing import Any

import pandas as pd
from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.table import Table

from fedrun.report.groups import STATUSES
from fedrun.words import plural

LEGEND_CHARS = 32  # a plot's legend label longer than this squeezes the plot: letters keyed to `#` instead
REACHED = ("reached: the last round the runs logged (mean ± std); below the planned rounds where a run stopped "
           "early at its privacy budget (privacy.stop_at_budget)")
REACHED_APART = "reached: the last round in the run's metrics.csv, of the rounds its config planned"
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


def group_labels(groups: pd.DataFrame) -> list[str]:
    """One label per group, `key=value, ...` (or `all runs` when no key tells runs apart)."""
    keys = key_columns(groups)
    # a key a group's runs do not have (fedadam's server_lr beside fedavg) is left out of its label
    return [", ".join(f"{k}={row[k]}" for k in keys if row[k] != "") or "all runs" for _, row in groups.iterrows()]


def letters(count: int) -> list[str]:
    """A, B, ..., Z, AA, AB, ...: short labels for groups, keyed to the table's `#` column."""
    found = []
    for i in range(1, count + 1):
        text = ""
        while i:
            i, r = divmod(i - 1, 26)
            text = chr(ord("A") + r) + text
        found.append(text)
    return found


def legend_labels(groups: pd.DataFrame) -> list[str]:
    """What a plot's legend calls each group: its label where every label is short, else its
    letter (the `#` column of the tables): long labels would squeeze the plot out of its figure."""
    full = group_labels(groups)
    return full if all(len(label) <= LEGEND_CHARS for label in full) else letters(len(full))


def cells(groups: pd.DataFrame, *, settings: bool = True) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the table as strings: `#` (where plots use letters, or `settings` is
    False and the keys are shown apart, by `settings_cells`), keys, n, status (unless all
    finished), metrics."""
    keys, metrics = key_columns(groups) if settings else [], shown_metrics(groups)
    tags = letters(len(groups)) if not settings or legend_labels(groups) != group_labels(groups) else None
    with_status = not all_finished(groups)
    header = [*(["#"] if tags else []), *keys, "n", *(["status"] if with_status else []),
              *(HEADERS.get(m, m) for m in metrics)]
    rows = []
    for i, (_, row) in enumerate(groups.iterrows()):
        status = [status_text(row)] if with_status else []
        rows.append([*([tags[i]] if tags else []), *(str(row[k]) for k in keys), str(row["n"]), *status,
                     *(format_cell(m, row[f"{m}_mean"], row[f"{m}_std"]) for m in metrics)])
    return header, rows


def settings_cells(groups: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """The settings of the groups, keyed by the `#` column of `cells(groups, settings=False)`."""
    return ["#", "setting"], [list(pair) for pair in zip(letters(len(groups)), group_labels(groups))]


def footnote(groups: pd.DataFrame) -> str | None:
    """What the `reached` column means, where the table has it."""
    if "rounds" not in shown_metrics(groups):
        return None
    return REACHED


def caption(groups: pd.DataFrame, apart: pd.DataFrame | None = None) -> str:
    counts = ", ".join(f"{int(groups[s].sum())} {s}" for s in STATUSES if groups[s].sum())
    text = f"{plural(int(groups['n'].sum()), 'run')} in {plural(len(groups), 'group')}"
    text += f" ({counts})" if counts else ""
    text += "; mean ± std over seeds"
    if apart is not None and len(apart):
        others = ", ".join(f"{n} {s}" for s, n in apart["status"].value_counts(sort=False).items())
        text += f"; not in the means: {others} (listed apart)"
    return text


def render_table(groups: pd.DataFrame, apart: pd.DataFrame | None = None, *, settings: bool = True,
                 width: int | None = None) -> Table:
    """The groups as a rich table: one row per group, `mean ± std` per metric. Headers fold
    rather than end in an ellipsis (`roun…`): a narrow terminal must not hide what a column is.
    Where the longest words fit in `width`, no word (a number) is split either."""
    header, rows = cells(groups, settings=settings)
    text = "\n".join(filter(None, [caption(groups, apart), footnote(groups)]))
    table = Table(title="fedrun report", caption=text, caption_justify="left")
    numeric_from = header.index("n")
    longest = [max(len(word) for cell in [name, *(row[i] for row in rows)] for word in cell.split() or [""])
               for i, name in enumerate(header)]
    full = [max(len(cell) for cell in [name, *(row[i] for row in rows)]) for i, name in enumerate(header)]
    # Too narrow for whole cells: each column as wide as its longest word, so cells wrap between
    # words (`73.31` over `± 3.2`) and no number is split; narrower still, rich folds them.
    fixed = width is not None and _width(full) > width and _width(longest) <= width
    for i, name in enumerate(header):
        table.add_column(name, justify="right" if i >= numeric_from and name != "status" else "left",
                         overflow="fold", width=longest[i] if fixed else None)
    for row in rows:
        table.add_row(*row)
    return table


def _width(columns: list[int]) -> int:
    return sum(columns) + 3 * len(columns) + 1  # cells, their padding and the borders


class GroupTable:
    """The group table at the width of the console it is printed on: whole where it fits; else
    the metrics with a `#` column, and the settings keyed by it in a table of their own."""

    def __init__(self, groups: pd.DataFrame, apart: pd.DataFrame | None = None):
        self.groups, self.apart = groups, apart

    @property
    def row_count(self) -> int:
        return len(self.groups)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        whole = render_table(self.groups, self.apart)
        unbounded = options.update(max_width=10**6)  # Measurement.get clamps to the width it is given
        if Measurement.get(console, unbounded, whole).maximum <= options.max_width:
            yield whole
            return
        yield render_table(self.groups, self.apart, settings=False, width=options.max_width)
        header, rows = settings_cells(self.groups)
        table = Table(title="settings of each # above")
        table.add_column(header[0])
        table.add_column(header[1], overflow="fold")
        for row in rows:
            table.add_row(*row)
        yield table


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
    table = Table(title=title, caption=REACHED_APART, caption_justify="left")
    for name in header:
        table.add_column(name, justify="right" if name == "reached" else "left", overflow="fold")
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
