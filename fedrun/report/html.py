"""report.html: one self-contained page (inline CSS, PNGs as data: URIs, no scripts, no links).

Besides the group table, the runs set apart (not finished) and the plots, each run has a
collapsible section: its partition (examples per client), how often each client took part,
bytes per round, its responses per round (samples.jsonl, eval.samples), the epsilon curve where
the run has one, and the error of a failed run.
"""
from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from html import escape
from pathlib import Path

import pandas as pd

from fedrun.core import FedrunError
from fedrun.report import plots
from fedrun.report.runs import read_csv_rows, read_metrics
from fedrun.report.table import REACHED_APART, RUN_HEADER, apart_cells, caption, cells, footnote, run_rows
from fedrun.rundir import read_regular_bytes

MAX_SAMPLES_BYTES = 1 << 26  # samples.jsonl: K responses per evaluation

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td.text { text-align: left; }
details { border: 1px solid #ddd; margin: 0.4em 0; padding: 0.3em 0.8em; }
summary { cursor: pointer; font-family: monospace; }
pre.error { background: #fff0f0; border-left: 4px solid #c00; padding: 0.5em; white-space: pre-wrap; }
.note { color: #a60; } img { max-width: 100%; }
table.samples td { text-align: left; white-space: pre-wrap; vertical-align: top; max-width: 32em; }
.status-failed, .status-crashed { color: #c00; } .status-running { color: #06c; } .status-interrupted { color: #a60; }
"""


def img(data: bytes | None, alt: str) -> str:
    if data is None:
        return ""
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def html_table(header: list[str], rows: list[list[str]], *, text: Iterable[int] = ()) -> str:
    """A table of strings; columns in `text` left-aligned, the others (numbers) right-aligned."""
    text = set(text)
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td{" class=text" if i in text else ""}>{escape(c)}</td>'
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def page(runs: pd.DataFrame, groups: pd.DataFrame, apart: pd.DataFrame, labels: dict[str, str],
         images: dict[str, bytes]) -> str:
    header, rows = cells(groups)
    text = [i for i, name in enumerate(header) if i < header.index("n") or name == "status"]
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>fedrun report</title>",
             f"<style>{STYLE}</style></head><body><h1>fedrun report</h1>",
             f"<p>{escape(caption(groups, apart))}</p>", "<h2>Groups</h2>", html_table(header, rows, text=text)]
    if note := footnote(groups):
        parts.append(f"<p>{escape(note)}</p>")
    if len(apart):
        header, rows = apart_cells(apart)
        parts += ["<h2>Not finished</h2>", "<p>Not in the means above.</p>",
                  html_table(header, rows, text=[i for i, name in enumerate(header) if name != "reached"]),
                  f"<p>{escape(REACHED_APART)}</p>"]
    parts += ["<h2>Plots</h2>", *(f"<p>{img(data, name)}</p>" for name, data in images.items()),
              "<h2>Runs</h2>", html_table(RUN_HEADER, run_rows(runs, labels), text=(0, 1, 2, 6))]
    members = runs[runs["path"].isin(labels)]
    parts += [run_section(run, labels[run["path"]]) for _, run in members.iterrows()]
    parts.append("</body></html>")
    return "\n".join(parts)


def run_section(run: pd.Series, label: str) -> str:
    path = Path(run["path"])
    metrics = read_metrics(path / "metrics.csv")
    status = run["status"]
    parts = [f"<details><summary>{escape(str(path))} &mdash; "
             f"<span class='status-{escape(status)}'>{escape(status)}</span> ({escape(label)})</summary>"]
    if isinstance(run["error"], str) and run["error"]:
        parts.append(f"<h4>Error</h4><pre class='error'>{escape(run['error'])}</pre>")
    if isinstance(run["note"], str) and run["note"]:
        parts.append(f"<p class='note'>{escape(run['note'])}</p>")
    parts += [partition_section(path), participation_section(path), "<h4>Bytes per round</h4>",
              img(plots.lines(metrics, ["bytes_up", "bytes_down"], ylabel="bytes", title="bytes per round"),
                  "bytes per round") or "<p>no bytes recorded</p>"]
    parts.append(samples_section(path))
    if "epsilon" in metrics:
        parts += ["<h4>Privacy</h4>", img(plots.lines(metrics, ["epsilon"], ylabel="epsilon", title="epsilon"),
                                          "epsilon") or "<p>no epsilon recorded</p>"]
    parts.append("</details>")
    return "\n".join(parts)


def spread(values: pd.Series) -> list[str]:
    return [f"{values.min():g}", f"{values.median():g}", f"{values.max():g}"] if len(values) else ["-"] * 3


def partition_section(path: Path) -> str:
    table = read_csv_rows(path / "partition.csv", [])
    if "train_examples" not in table:
        return "<h4>Partition</h4><p>no partition.csv</p>"
    train = pd.to_numeric(table["train_examples"], errors="coerce").dropna()
    test = pd.to_numeric(table.get("test_examples", pd.Series(dtype=str)), errors="coerce").dropna()
    rows = [["train", str(len(train)), *spread(train), f"{train.sum():g}"],
            ["test", str(len(test)), *spread(test), f"{test.sum():g}"]]
    stats = html_table(["examples per client", "clients", "min", "median", "max", "total"], rows, text=(0,))
    chart = plots.histogram(train.to_numpy(), xlabel="train examples", title="client sizes")
    return f"<h4>Partition</h4>{stats}{img(chart, 'client sizes')}"


def participation(path: Path) -> pd.Series | None:
    """Rounds in which each client took part (status ok), every client of the partition included."""
    table = read_csv_rows(path / "clients.csv", [])
    if "client_id" not in table:
        return None
    ok = table[table["status"] == "ok"] if "status" in table else table
    counts = ok["client_id"].value_counts()
    everyone = read_csv_rows(path / "partition.csv", []).get("client_id", pd.Series(dtype=str))
    return counts.reindex(counts.index.union(pd.Index(everyone)), fill_value=0)


def participation_section(path: Path) -> str:
    counts = participation(path)
    if counts is None:
        return "<h4>Participation</h4><p>no clients.csv</p>"
    took_part = int((counts > 0).sum())
    stats = html_table(["clients", "took part", "rounds per client: min", "median", "max"],
                       [[str(len(counts)), str(took_part), *spread(counts)]])
    chart = plots.histogram(counts.to_numpy(), xlabel="rounds with status ok", title="participation")
    return f"<h4>Participation</h4>{stats}{img(chart, 'participation')}"


def read_samples(path: Path) -> list[dict]:
    """samples.jsonl's whole lines that are objects with a round (a torn or foreign line is skipped)."""
    try:
        text = read_regular_bytes(path, limit=MAX_SAMPLES_BYTES).decode("utf-8", errors="replace")
    except FedrunError:
        return []
    rows = []
    for line in text[:text.rfind("\n") + 1].splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("round"), int):
            rows.append(row)
    return rows


def samples_section(path: Path) -> str:
    """The run's greedy responses (eval.samples), a table per evaluated round; nothing without samples.jsonl."""
    if not (path / "samples.jsonl").exists():
        return ""
    by_round: dict[int, list[dict]] = {}
    for row in read_samples(path / "samples.jsonl"):
        by_round.setdefault(row["round"], []).append(row)
    parts = ["<h4>Samples</h4>"] if by_round else ["<h4>Samples</h4><p>no whole line in samples.jsonl</p>"]
    for round_idx, rows in sorted(by_round.items()):
        body = "".join("<tr>" + "".join(f"<td>{escape(str(row.get(k, '')))}</td>"
                                        for k in ("prompt", "reference", "response")) + "</tr>" for row in rows)
        parts.append(f"<h5>Round {round_idx}</h5><table class=samples><tr><th>prompt</th><th>reference</th>"
                     f"<th>response</th></tr>{body}</table>")
    return "\n".join(parts)
