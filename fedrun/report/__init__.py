"""`fedrun report`: run directories -> a table of settings (mean ± std over seeds) and plots.

Reads nothing but run directories (config.yaml, metrics.csv, and where present summary.json,
status.json, clients.csv, partition.csv). Finished runs whose configs differ only in `seed`,
`name` and `run_dir` form one group; the others (running, interrupted, crashed, failed) are
set apart, never averaged with them.

    runs = collect_runs(paths)                      # one row per run
    keys = distinguishing_keys(runs)                # config keys that differ
    groups = group_runs(runs, keys, sort="eval_ppl", where=["strategy=fedadam"])
    apart = set_apart(runs, keys)                   # the runs not finished, one row each
    render_table(groups, apart); render_apart(apart); write_report(runs, groups, out, apart=apart)
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd
from rich.console import Group, RenderableType

from fedrun.core import FedrunError
from fedrun.report.groups import distinguishing_keys, filter_runs, group_runs, set_apart
from fedrun.report.runs import collect_runs
from fedrun.report.table import GroupTable, render_apart, render_table
from fedrun.report.write import write_report
from fedrun.rundir import file_in_the_way

__all__ = ["collect_runs", "distinguishing_keys", "filter_runs", "group_runs", "render_apart", "render_table",
           "report", "set_apart", "write_report"]


def report(paths: list[Path], *, sort: str | None = None, where: Iterable[str] = (),
           out: Path | None = None) -> tuple[RenderableType, list[Path]]:
    """The table of the runs under `paths` (followed by the table of the runs set apart, if
    any), and the files written to `out` (none when out is None).

    Filters first, so the key columns are those that still differ among the runs shown.
    """
    where = list(where)
    if out is not None:
        check_out(Path(out))
    runs = collect_runs(list(paths))
    if runs.empty:
        raise FedrunError(f"report: no run directories (config.yaml and metrics.csv) under "
                          f"{', '.join(map(str, paths))}")
    runs = filter_runs(runs, where)
    if runs.empty:
        raise FedrunError(f"report: no run matches --where {' '.join(where)}")
    keys = distinguishing_keys(runs)
    groups, apart = group_runs(runs, keys, sort=sort), set_apart(runs, keys)
    files = write_report(runs, groups, Path(out), apart=apart) if out is not None else []
    return shown(groups, apart), files


def check_out(out: Path) -> None:
    """--out is a folder (made if missing): refuse a file there, or above it, before reading any run."""
    where = file_in_the_way(out)
    if where is not None:
        raise FedrunError(f"report --out: {out}{where} is a file; allowed: a folder (made if missing) "
                          "for report.md, report.csv, report.html and the plots")


def shown(groups: pd.DataFrame, apart: pd.DataFrame) -> RenderableType:
    """The group table, then the runs set apart; only the latter when no run finished."""
    if not len(apart):
        return GroupTable(groups)
    if not len(groups):
        return render_apart(apart, title="fedrun report: no finished run; not finished")
    return Group(GroupTable(groups, apart), render_apart(apart))
