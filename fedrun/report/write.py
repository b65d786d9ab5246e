"""Writing a report folder: report.md, report.csv, report.html and the PNG plots."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from fedrun.report import html, plots
from fedrun.report.groups import set_apart
from fedrun.report.runs import read_metrics
from fedrun.report.table import (
    REACHED_APART,
    RUN_HEADER,
    apart_cells,
    apart_keys,
    caption,
    cells,
    footnote,
    group_labels,
    legend_labels,
    run_rows,
)

CURVES = ("eval_loss", "eval_ppl", "eval_acc", "train_loss")
UTILITIES = ["final_eval_acc", "final_eval_ppl"]


def apart_labels(apart: pd.DataFrame) -> dict[str, str]:
    """{path: `key=value, ...`} of the runs set apart, labelled as their group would be."""
    keys = apart_keys(apart)
    return {run["path"]: ", ".join(f"{k}={run[k]}" for k in keys) or "all runs" for _, run in apart.iterrows()}


def write_report(runs: pd.DataFrame, groups: pd.DataFrame, out: Path, *,
                 apart: pd.DataFrame | None = None) -> list[Path]:
    """Write the report of `groups` (from `group_runs`) and of the runs set `apart` (from
    `set_apart`; by default every run in no group) into `out`; return the files written.

    PNG plots from an earlier report in `out` that no longer apply are removed.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    member_labels = {path: name for name, paths in zip(group_labels(groups), groups["runs"]) for path in paths}
    if apart is None:
        apart = set_apart(runs[~runs["path"].isin(member_labels)], [], statuses=())
    member_labels |= apart_labels(apart)
    images = make_plots(runs, groups, legend_labels(groups))
    for stale in [*out.glob("learning_curves_*.png"), out / "utility_vs_epsilon.png"]:
        if stale.name not in images:
            stale.unlink(missing_ok=True)
    written = []
    for name, data in images.items():
        (out / name).write_bytes(data)
        written.append(out / name)
    table = groups.assign(runs=groups["runs"].map(";".join))
    table.to_csv(out / "report.csv", index=False)
    (out / "report.md").write_text(markdown(runs, groups, apart, member_labels, images), encoding="utf-8")
    (out / "report.html").write_text(html.page(runs, groups, apart, member_labels, images), encoding="utf-8")
    return [out / "report.md", out / "report.csv", out / "report.html", *written]


def make_plots(runs: pd.DataFrame, groups: pd.DataFrame, names: list[str]) -> dict[str, bytes]:
    """{file name: PNG}: learning curves per metric; utility against epsilon where runs have one."""
    tables = {p: read_metrics(Path(p) / "metrics.csv") for paths in groups["runs"] for p in paths}
    images = {}
    for metric in CURVES:
        curves = [(name, plots.curve([tables[p] for p in paths], metric)) for name, paths in zip(names, groups["runs"])]
        data = plots.learning_curves(metric, curves)
        if data is not None:
            images[f"learning_curves_{metric}.png"] = data
    group_of = {p: g for g, paths in enumerate(groups["runs"]) for p in paths}
    members = runs[runs["path"].isin(group_of)].assign(group=lambda r: r["path"].map(group_of))
    if members[["epsilon", "epsilon_empirical"]].notna().any(axis=None):
        data = plots.utility_vs_epsilon(members, UTILITIES, names)
        if data is not None:
            images["utility_vs_epsilon.png"] = data
    return images


def md_row(cells_: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells_) + " |"


def markdown(runs: pd.DataFrame, groups: pd.DataFrame, apart: pd.DataFrame, member_labels: dict[str, str],
             images: dict) -> str:
    header, rows = cells(groups)
    lines = ["# fedrun report", "", caption(groups, apart), "", md_row(header), md_row(["---"] * len(header)),
             *map(md_row, rows), "", *([note, ""] if (note := footnote(groups)) else [])]
    if len(apart):
        header, rows = apart_cells(apart)
        lines += ["## Not finished", "", "Not in the means above.", "", md_row(header),
                  md_row(["---"] * len(header)), *map(md_row, rows), "", REACHED_APART, ""]
    lines += [f"![{name.removesuffix('.png')}]({name})" for name in images] + [""]
    lines += ["## Runs", "", md_row(RUN_HEADER), md_row(["---"] * len(RUN_HEADER)),
              *map(md_row, run_rows(runs, member_labels))]
    return "\n".join(lines) + "\n"
