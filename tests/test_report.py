"""fedrun.report on fabricated run directories (hand-written CSV/YAML/JSON), plus one real tiny sweep.

Expected means and stds are computed here from the raw fabricated lists with pandas, never by
reading the report's own intermediate tables.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from fedrun.core import FedrunError
from fedrun.report import (
    collect_runs,
    distinguishing_keys,
    group_runs,
    render_apart,
    render_table,
    report,
    set_apart,
    write_report,
)
from fedrun.report.groups import STATUSES

METRIC_HEADER = "round,clients,examples,train_loss,eval_loss,eval_ppl,eval_acc,bytes_up,bytes_down,seconds"
STRATEGIES = ("fedavg", "fedadam")
LRS = (0.1, 0.01)


def config_yaml(*, strategy: str = "fedavg", lr: float = 0.1, seed: int = 0, run_dir: str = "x",
                rounds: int = 4) -> str:
    return (f"name: {strategy}\nrounds: {rounds}\nseed: {seed}\nrun_dir: {run_dir}\n"
            f"client:\n  lr: {lr}\n  batch_size: 16\nstrategy:\n  _target_: fedrun.strategies.{strategy}\n")


def write_metrics(path: Path, rows: list[dict], *, epsilon: bool = False) -> None:
    header = METRIC_HEADER + (",epsilon" if epsilon else "")
    lines = [header] + [",".join("" if row.get(c) is None else str(row[c]) for c in header.split(","))
                        for row in rows]
    path.write_text("\n".join(lines) + "\n")


def fabricated_rows(rng: np.random.Generator, *, rounds: int = 4, epsilon: bool = False) -> list[dict]:
    """Metrics of one run: evaluated at rounds 0, 2 and 4; every number drawn at random."""
    rows = []
    for r in range(rounds + 1):
        row = {"round": r, "clients": 3 * (r > 0), "examples": 30 * r,
               "bytes_up": int(rng.integers(100, 200)) * (r > 0),
               "bytes_down": int(rng.integers(100, 200)) * (r > 0), "seconds": float(rng.uniform(0.1, 1.0))}
        if r > 0:
            row["train_loss"] = float(rng.uniform(1, 2))
        if r % 2 == 0:
            loss = float(rng.uniform(0.5, 3.0))
            row |= {"eval_loss": loss, "eval_ppl": float(np.exp(loss)), "eval_acc": float(rng.uniform(0, 1))}
        if epsilon:
            row["epsilon"] = 0.5 * r + float(rng.uniform(0, 0.1))
        rows.append(row)
    return rows


def make_run(path: Path, *, rows: list[dict] | None = None, summary: bool = True, status: dict | None = None,
             epsilon: bool = False, **config) -> Path:
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(config_yaml(run_dir=str(path), **config))
    write_metrics(path / "metrics.csv", rows if rows is not None else fabricated_rows(np.random.default_rng(0)),
                  epsilon=epsilon)
    (path / "partition.csv").write_text("client_id,name,train_examples,test_examples\n"
                                        + "".join(f"{i},c{i},{10 * (i + 1)},{i + 1}\n" for i in range(6)))
    (path / "clients.csv").write_text("round,client_id,examples,train_loss,update_norm,seconds,status,local_steps\n"
                                      "1,0,10,1.0,0.1,0.1,ok,5\n1,2,30,1.0,0.1,0.1,ok,5\n1,3,40,1.0,0.1,0.1,dropped,5\n"
                                      "2,0,10,1.0,0.1,0.1,ok,5\n")
    if summary:
        (path / "summary.json").write_text(json.dumps({"rounds": 4}))
    if status is not None:
        (path / "status.json").write_text(json.dumps(status))
    return path


@pytest.fixture
def grid(tmp_path: Path) -> tuple[Path, dict]:
    """A 2x2 sweep (strategy x client.lr), two seeds each; returns the sweep and each run's raw rows."""
    raw = {}
    rng = np.random.default_rng(42)
    for strategy in STRATEGIES:
        for lr in LRS:
            for seed in (0, 1):
                rows = fabricated_rows(rng)
                make_run(tmp_path / "sweep" / f"{strategy}_{lr}_{seed}", rows=rows, strategy=strategy, lr=lr,
                         seed=seed)
                raw[(strategy, lr, seed)] = rows
    return tmp_path / "sweep", raw


def expected_results(rows: list[dict]) -> dict[str, float]:
    """The results of one run, straight from its rows."""
    evaluated = [r for r in rows if "eval_loss" in r]
    return {"final_eval_loss": evaluated[-1]["eval_loss"], "final_eval_ppl": evaluated[-1]["eval_ppl"],
            "final_eval_acc": evaluated[-1]["eval_acc"], "best_eval_loss": min(r["eval_loss"] for r in evaluated),
            "best_eval_ppl": min(r["eval_ppl"] for r in evaluated),
            "best_eval_acc": max(r["eval_acc"] for r in evaluated),
            "bytes": sum(r["bytes_up"] + r["bytes_down"] for r in rows), "seconds": sum(r["seconds"] for r in rows),
            "rounds": max(r["round"] for r in rows)}


METRICS = ["final_eval_loss", "final_eval_ppl", "final_eval_acc", "best_eval_loss", "best_eval_ppl", "best_eval_acc",
           "bytes", "seconds", "rounds"]


# ---- grouping -------------------------------------------------------------------------------

def test_grid_groups_by_seed_with_pandas_mean_and_std(grid):
    sweep, raw = grid
    runs = collect_runs([sweep])
    assert len(runs) == 8 and set(runs["status"]) == {"finished"}
    keys = distinguishing_keys(runs)
    assert keys == ["client.lr", "strategy._target_"]  # seed, name and run_dir differ too, but never count
    groups = group_runs(runs, keys, METRICS)
    assert len(groups) == 4 and list(groups["n"]) == [2, 2, 2, 2]
    assert set(groups["strategy"]) == set(STRATEGIES)  # `_target_` shown by its last component
    for _, group in groups.iterrows():
        per_seed = [expected_results(raw[(group["strategy"], float(group["client.lr"]), s)]) for s in (0, 1)]
        for m in METRICS:
            values = pd.Series([r[m] for r in per_seed], dtype=float)
            assert group[f"{m}_mean"] == pytest.approx(values.mean(), rel=1e-12), m
            assert group[f"{m}_std"] == pytest.approx(values.std(ddof=1), rel=1e-12), m


def test_single_run_group_has_nan_std(tmp_path):
    make_run(tmp_path / "a", strategy="fedavg")
    make_run(tmp_path / "b", strategy="fedadam")
    groups = group_runs(collect_runs([tmp_path]), ["strategy._target_"], ["final_eval_ppl"])
    assert list(groups["n"]) == [1, 1] and groups["final_eval_ppl_std"].isna().all()


def test_runs_equal_but_for_seed_form_one_group_without_keys(tmp_path):
    for seed in (0, 1, 2):
        make_run(tmp_path / f"s{seed}", seed=seed)
    runs = collect_runs([tmp_path])
    assert distinguishing_keys(runs) == []
    groups = group_runs(runs, [])
    assert len(groups) == 1 and groups["n"].iloc[0] == 3


def test_a_single_run_path_is_found(tmp_path):
    run = make_run(tmp_path / "one")
    assert list(collect_runs([run])["path"]) == [str(run.resolve())]
    assert list(collect_runs([run / "metrics.csv", tmp_path])["path"]) == [str(run.resolve())]


def test_missing_path_is_a_user_error(tmp_path):
    with pytest.raises(FedrunError, match="no such file"):
        collect_runs([tmp_path / "nope"])


# ---- sorting and filtering ------------------------------------------------------------------

def test_sort_by_metric(grid):
    runs = collect_runs([grid[0]])
    keys = distinguishing_keys(runs)
    by_ppl = group_runs(runs, keys, sort="eval_ppl")["final_eval_ppl_mean"]
    assert list(by_ppl) == sorted(by_ppl)
    by_acc = group_runs(runs, keys, sort="eval_acc")["final_eval_acc_mean"]
    assert list(by_acc) == sorted(by_acc, reverse=True)
    by_best = group_runs(runs, keys, ["bytes"], sort="best_eval_loss")
    assert list(by_best["best_eval_loss_mean"]) == sorted(by_best["best_eval_loss_mean"])
    with pytest.raises(FedrunError, match="unknown metric"):
        group_runs(runs, keys, sort="nonsense")


@pytest.mark.parametrize("where, expected", [
    (["strategy=fedadam"], {("fedadam", "0.1"), ("fedadam", "0.01")}),
    (["strategy._target_=fedrun.strategies.fedadam"], {("fedadam", "0.1"), ("fedadam", "0.01")}),
    (["client.lr=0.1"], {("fedavg", "0.1"), ("fedadam", "0.1")}),
    (["client.lr=1e-1"], {("fedavg", "0.1"), ("fedadam", "0.1")}),  # numbers compare as numbers
    (["client.lr=0.1", "strategy=fedavg"], {("fedavg", "0.1")}),
    (["strategy=fedavg", "strategy=fedadam", "client.lr=0.01"], {("fedavg", "0.01"), ("fedadam", "0.01")}),
    (["client.batch_size=16"], {(s, str(lr)) for s in STRATEGIES for lr in LRS}),  # a key that never differs
    (["rounds=4"], {(s, str(lr)) for s in STRATEGIES for lr in LRS}),  # the config's rounds, not the result
    (["strategy=nope"], set()),
])
def test_where(grid, where, expected):
    runs = collect_runs([grid[0]])
    groups = group_runs(runs, distinguishing_keys(runs), where=where)
    assert set(zip(groups["strategy"], groups["client.lr"])) == expected
    assert (groups["n"] == 2).all()


def test_where_errors(grid):
    runs = collect_runs([grid[0]])
    with pytest.raises(FedrunError, match="unknown key"):
        group_runs(runs, [], where=["nokey=1"])
    with pytest.raises(FedrunError, match="key=value"):
        group_runs(runs, [], where=["strategy"])


# ---- status and broken runs -----------------------------------------------------------------

def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_statuses_of_partial_runs(tmp_path):
    make_run(tmp_path / "finished")
    make_run(tmp_path / "crashed", summary=False, status={"state": "running", "pid": dead_pid(), "round": 2,
                                                          "updated": time.time()})
    make_run(tmp_path / "running", summary=False, status={"state": "running", "pid": os.getpid(), "round": 2,
                                                          "updated": time.time()})
    make_run(tmp_path / "failed", summary=False, status={"state": "failed", "pid": 1, "round": 1, "updated": 0,
                                                         "error": "ValueError: loss is nan"})
    old = make_run(tmp_path / "old", summary=False)
    os.utime(old / "metrics.csv", (time.time() - 3600,) * 2)
    make_run(tmp_path / "fresh", summary=False)
    make_run(tmp_path / "interrupted", summary=False, status={"state": "interrupted", "pid": os.getpid(), "round": 3,
                                                              "updated": time.time()})
    make_run(tmp_path / "badstatus", summary=False).joinpath("status.json").write_text('{"state": "runn')
    os.utime(tmp_path / "badstatus" / "metrics.csv", (time.time() - 3600,) * 2)
    runs = collect_runs([tmp_path])
    status = {Path(p).name: s for p, s in zip(runs["path"], runs["status"])}
    assert status == {"finished": "finished", "crashed": "crashed", "running": "running", "failed": "failed",
                      "old": "crashed", "fresh": "running", "badstatus": "crashed", "interrupted": "interrupted"}
    errors = {Path(p).name: e for p, e in zip(runs["path"], runs["error"]) if isinstance(e, str)}
    assert errors == {"failed": "ValueError: loss is nan"}


def test_torn_and_malformed_metrics_are_read_up_to_the_damage(tmp_path):
    rows = fabricated_rows(np.random.default_rng(1))
    run = make_run(tmp_path / "torn", rows=rows, summary=False)
    text = (run / "metrics.csv").read_text(encoding="utf-8")
    (run / "metrics.csv").write_text(text + "5,3,150,1.2,0.9,2.4")  # killed mid-line: no newline
    result = collect_runs([run]).iloc[0]
    assert result["status"] == "running"  # no status.json, metrics.csv just written
    assert result["rounds"] == 4 and result["final_eval_loss"] == pytest.approx(rows[4]["eval_loss"])
    assert "torn" in result["note"]

    lines = text.splitlines()
    (run / "metrics.csv").write_text("\n".join(lines[:3] + ["garbage,1"] + lines[3:]) + "\n")
    result = collect_runs([run]).iloc[0]
    assert result["rounds"] == 4 and "malformed" in result["note"]


@pytest.mark.parametrize("content", ["", "round\n", "foo,bar\n1,2\n", "round,eval_loss\n0,abc\n1,\n"])
def test_empty_or_columnless_metrics_do_not_raise(tmp_path, content):
    run = make_run(tmp_path / "r", summary=False)
    (run / "metrics.csv").write_text(content)
    result = collect_runs([run]).iloc[0]
    assert np.isnan(result["final_eval_loss"]) and np.isnan(result["bytes"])
    groups = group_runs(collect_runs([run]), [])
    write_report(collect_runs([run]), groups, tmp_path / "out")
    render_table(groups)


def test_broken_config_is_marked_not_raised(tmp_path):
    run = make_run(tmp_path / "r")
    (run / "config.yaml").write_text("client: [unclosed\n")
    result = collect_runs([run]).iloc[0]
    assert result["status"] == "finished" and "config.yaml" in result["note"]


def test_summary_fills_what_metrics_lack(tmp_path):
    run = make_run(tmp_path / "r", rows=[])
    (run / "summary.json").write_text(json.dumps({"rounds": 3, "final": {"eval_ppl": 7.5}, "bytes_up": 10,
                                                  "bytes_down": 5, "seconds": 2.0}))
    result = collect_runs([run]).iloc[0]
    assert (result["rounds"], result["final_eval_ppl"], result["bytes"], result["seconds"]) == (3, 7.5, 15, 2.0)


# ---- table and files ------------------------------------------------------------------------

def rendered(table) -> str:
    console = Console(record=True, width=250)
    console.print(table)
    return console.export_text()


def test_render_table_shows_mean_std_and_statuses(grid, tmp_path):
    sweep, _ = grid
    make_run(sweep / "crashed", summary=False, status={"state": "running", "pid": dead_pid()}, strategy="fedavg",
             lr=0.1, seed=2)
    runs = collect_runs([sweep])
    keys = distinguishing_keys(runs)
    table = render_table(group_runs(runs, keys), set_apart(runs, keys))
    text = rendered(table)
    assert table.row_count == 4 and "±" in text and "status" not in text  # finished runs only
    assert "8 runs in 4 groups (8 finished)" in text and "not in the means: 1 crashed (listed apart)" in text
    everything = render_table(group_runs(runs, keys, statuses=STATUSES))  # asked for: every run in the means
    assert "2 finished, 1 crashed" in rendered(everything) and "status" in rendered(everything)


def test_a_crashed_run_is_not_averaged_with_a_finished_run_of_its_config(tmp_path):
    rng = np.random.default_rng(7)
    done, cut = fabricated_rows(rng, rounds=6), fabricated_rows(rng, rounds=2)
    make_run(tmp_path / "runs" / "done", rows=done, rounds=6, seed=0)
    make_run(tmp_path / "runs" / "cut", rows=cut, rounds=6, seed=1, summary=False,
             status={"state": "running", "pid": dead_pid(), "round": 2, "updated": time.time()})
    runs = collect_runs([tmp_path / "runs"])
    groups = group_runs(runs, distinguishing_keys(runs), METRICS)
    assert list(groups["n"]) == [1] and groups["finished"].iloc[0] == 1
    for m, value in expected_results(done).items():  # the finished run's own results, not a mean with the crash
        assert groups[f"{m}_mean"].iloc[0] == pytest.approx(value, rel=1e-12), m
    apart = set_apart(runs, distinguishing_keys(runs))
    assert apart[["status", "rounds", "planned"]].values.tolist() == [["crashed", 2, 6]]
    assert apart["path"].iloc[0].endswith("cut")

    shown, files = report([tmp_path / "runs"], out=tmp_path / "out")
    text = " ".join(rendered(shown).split())  # the caption wraps at the table's width
    assert "1 run in 1 group (1 finished)" in text and "not in the means: 1 crashed" in text
    assert "not finished: not in the means above" in text and "2 of 6" in text
    md = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "## Not finished" in md and "| crashed | 2 of 6 |" in md
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert "<h2>Not finished</h2>" in page and page.count("<details") == 2
    assert pd.read_csv(tmp_path / "out" / "report.csv")["n"].tolist() == [1]


def test_every_unfinished_status_is_set_apart_with_its_key_values(grid):
    sweep, _ = grid
    runs = collect_runs([sweep]).reset_index(drop=True)
    others = ["running", "interrupted", "crashed", "failed"]
    runs.loc[:3, "status"] = others  # the first four runs by path: the fedadam runs, lr 0.01 and 0.1
    keys = distinguishing_keys(runs)
    groups = group_runs(runs, keys)
    assert groups["n"].sum() == 4 and list(groups["strategy"]) == ["fedavg", "fedavg"]
    apart = set_apart(runs, keys)
    assert sorted(apart["status"]) == sorted(others) and set(apart["strategy"]) == {"fedadam"}
    assert list(apart["client.lr"]) == ["0.01", "0.01", "0.1", "0.1"]
    assert render_apart(apart).row_count == 4
    caption = rendered(render_table(groups, apart))
    assert all(f"1 {s}" in caption for s in others)


def test_only_unfinished_runs_give_an_empty_group_table_and_the_runs_apart(tmp_path):
    for seed in (0, 1):
        make_run(tmp_path / "runs" / f"r{seed}", seed=seed, summary=False,
                 status={"state": "failed", "pid": 1, "error": "ValueError: loss is nan"})
    shown, files = report([tmp_path / "runs"], out=tmp_path / "out")
    text = " ".join(rendered(shown).split())
    assert "fedrun report: no finished run; not finished" in text
    assert text.count("ValueError: loss is nan") == 2 and (tmp_path / "out" / "report.html") in files
    md = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "0 runs in 0 groups; mean ± std over seeds; not in the means: 2 failed (listed apart)" in md


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.targets: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.targets += [v for k, v in attrs if k in ("src", "href", "srcset", "data", "action")]


def test_write_report_is_self_contained_and_shows_errors(grid, tmp_path):
    sweep, _ = grid
    make_run(sweep / "failed", summary=False, strategy="fedavg", lr=0.1, seed=3,
             status={"state": "failed", "pid": 1, "error": "RuntimeError: <out of memory> & more"})
    runs = collect_runs([sweep])
    groups = group_runs(runs, distinguishing_keys(runs))
    files = write_report(runs, groups, tmp_path / "out")
    names = {f.name for f in files}
    assert {"report.md", "report.csv", "report.html", "learning_curves_eval_ppl.png"} <= names
    assert "utility_vs_epsilon.png" not in names and not (tmp_path / "out" / "utility_vs_epsilon.png").exists()
    assert all(f.is_file() and f.stat().st_size > 0 for f in files)
    assert all(f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in files if f.suffix == ".png")
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    links = Links()
    links.feed(page)
    assert links.targets and all(t.startswith("data:image/png;base64,") for t in links.targets)
    assert "script" not in links.tags and "link" not in links.tags
    assert "RuntimeError: &lt;out of memory&gt; &amp; more" in page
    assert page.count("<details") == len(runs)
    csv = pd.read_csv(tmp_path / "out" / "report.csv")
    assert len(csv) == 4 and csv["n"].sum() == 8  # the failed run is listed apart, not counted in a group
    assert "RuntimeError" in (tmp_path / "out" / "report.md").read_text(encoding="utf-8")


def test_utility_vs_epsilon_only_with_epsilon(tmp_path):
    rng = np.random.default_rng(3)
    for lr in LRS:
        for seed in (0, 1):
            make_run(tmp_path / "dp" / f"{lr}_{seed}", rows=fabricated_rows(rng, epsilon=True), epsilon=True, lr=lr,
                     seed=seed)
    runs = collect_runs([tmp_path / "dp"])
    assert runs["epsilon"].notna().all()
    out = tmp_path / "out"
    (out).mkdir()
    (out / "learning_curves_stale.png").write_bytes(b"old")
    files = write_report(runs, group_runs(runs, distinguishing_keys(runs)), out)
    assert out / "utility_vs_epsilon.png" in files and not (out / "learning_curves_stale.png").exists()
    assert "epsilon" in (out / "report.html").read_text(encoding="utf-8")


def test_plots_cope_with_one_evaluated_round_and_one_group(tmp_path):
    rows = [{"round": 0, "clients": 0, "examples": 0, "bytes_up": 0, "bytes_down": 0, "seconds": 0.1,
             "eval_loss": 2.0, "eval_ppl": 7.39, "eval_acc": float("nan")},
            {"round": 1, "clients": 3, "examples": 30, "bytes_up": 10, "bytes_down": 10, "seconds": 0.1,
             "train_loss": float("nan")}]
    make_run(tmp_path / "a", rows=rows)
    runs = collect_runs([tmp_path])
    files = write_report(runs, group_runs(runs, []), tmp_path / "out")
    assert tmp_path / "out" / "learning_curves_eval_loss.png" in files
    assert tmp_path / "out" / "learning_curves_eval_acc.png" not in files  # nothing to draw


def test_report_entry_point(grid, tmp_path):
    table, files = report([grid[0]], sort="eval_ppl", where=["strategy=fedavg"], out=tmp_path / "out")
    assert table.row_count == 2 and (tmp_path / "out" / "report.html") in files
    table, files = report([grid[0]])
    assert table.row_count == 4 and files == []
    with pytest.raises(FedrunError, match="no run directories"):
        report([tmp_path / "out"])
    with pytest.raises(FedrunError, match="no run matches"):
        report([grid[0]], where=["strategy=nope"])


# ---- end to end -----------------------------------------------------------------------------

def test_real_runs_with_two_seeds_form_one_group(tmp_path):
    from fedrun import config, train

    for seed in (0, 1):
        cfg = config.compose(["data=synthetic", "model=logreg", "rounds=2", "data.num_clients=6",
                              "sampler.clients_per_round=3", "device=cpu", f"seed={seed}",
                              f"run_dir={tmp_path / 'sweep' / f'seed{seed}'}"])
        train.train(config.build(cfg))
    table, files = report([tmp_path / "sweep"], out=tmp_path / "report")
    runs = collect_runs([tmp_path / "sweep"])
    groups = group_runs(runs, distinguishing_keys(runs))
    assert list(runs["status"]) == ["finished", "finished"]
    assert len(groups) == 1 and groups["n"].iloc[0] == 2 and table.row_count == 1
    assert groups["final_eval_acc_mean"].iloc[0] == pytest.approx(runs["final_eval_acc"].mean())
    assert (tmp_path / "report" / "learning_curves_eval_loss.png") in files
