"""`fedrun report`: run directories -> a table of settings (mean ± std over seeds) and plots.

Reads nothing but run directories (config.yaml, metrics.csv, and where present summary.json,
status.json, clients.csv, partition.csv). Runs whose configs differ only in `seed`, `name`
and `run_dir` form one group.

    runs = collect_runs(paths)                      # one row per run
    keys = distinguishing_keys(runs)                # config keys that differ
    groups = group_runs(runs, keys, sort="eval_ppl", where=["strategy=fedadam"])
    render_table(groups); write_report(runs, groups, out)
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from rich.table import Table

from fedrun.core import FedrunError
from fedrun.report.groups import distinguishing_keys, filter_runs, group_runs
from fedrun.report.runs import collect_runs
from fedrun.report.table import render_table
from fedrun.report.write import write_report

__all__ = ["collect_runs", "distinguishing_keys", "filter_runs", "group_runs", "render_table", "report",
           "write_report"]


def report(paths: list[Path], *, sort: str | None = None, where: Iterable[str] = (),
           out: Path | None = None) -> tuple[Table, list[Path]]:
    """The table of the runs under `paths`, and the files written to `out` (none when out is None).

    Filters first, so the key columns are those that still differ among the runs shown.
    """
    where = list(where)
    runs = collect_runs(list(paths))
    if runs.empty:
        raise FedrunError(f"report: no run directories (config.yaml and metrics.csv) under "
                          f"{', '.join(map(str, paths))}")
    runs = filter_runs(runs, where)
    if runs.empty:
        raise FedrunError(f"report: no run matches --where {' '.join(where)}")
    groups = group_runs(runs, distinguishing_keys(runs), sort=sort)
    files = write_report(runs, groups, Path(out)) if out is not None else []
    return render_table(groups), files
