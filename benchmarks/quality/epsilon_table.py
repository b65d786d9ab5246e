"""The README's empirical-epsilon table from the runs of benchmarks/quality/epsilon_audit.sh.

Usage: python -m benchmarks.quality.epsilon_table OUT  (prints a markdown table)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

from fedrun.privacy.empirical import bootstrap_interval


def cell(value, digits: int = 2) -> str:
    return "-" if value is None else "inf" if value == float("inf") else f"{value:.{digits}f}"


def spread(run: Path, column: str, delta: float) -> str:
    """The estimate's bootstrap 90% range, from audit_epsilon.csv's cosines."""
    d = pd.read_csv(run / "audit_epsilon.csv")
    seen = d[(d["kind"] == "canary") & (d["insertions"] > 0)][column]
    low, high = bootstrap_interval(seen.to_numpy(), d[d["kind"] == "held_out"][column].to_numpy(), delta)
    return f"{low:.2f}..{high:.2f}"


def row(run: Path) -> str:
    s = json.loads((run / "summary.json").read_text())
    privacy, audit = s.get("privacy", {}), s["audit"]
    eps = audit["epsilon"]
    exposure = audit.get("canary_exposure")
    return "| " + " | ".join([
        run.name, cell(privacy.get("noise_multiplier", 0.0), 1),
        cell(privacy.get("epsilon_rdp", float("inf"))), cell(privacy.get("epsilon_prv", float("inf"))),
        f"{cell(eps['all_rounds']['epsilon'])} ({spread(run, 'cosine_max_round', eps['delta'])})",
        f"{cell(eps['final']['epsilon'])} ({spread(run, 'cosine_final', eps['delta'])})",
        f"{cell(eps['all_rounds']['epsilon_lower_bound'])} / {cell(eps['final']['epsilon_lower_bound'])}",
        f"{cell(eps['all_rounds']['noise_floor'])} / {cell(eps['final']['noise_floor'])}",
        f"{eps['canaries_inserted']}/{eps['canary_clients']}",
        "-" if exposure is None else f"{exposure:.1f} / {audit['max_exposure']:.1f}",
        cell(s["final"]["eval_ppl"]), f"{s['seconds']:.0f}"]) + " |"


def main(out: Path) -> None:
    print("| run | z | epsilon RDP | epsilon PRV | empirical, all rounds (bootstrap 90%) "
          "| empirical, final model (bootstrap 90%) | lower bound 95% (all / final) | noise floor (all / final) "
          "| canaries inserted | exposure (bits / max) "
          "| eval ppl | seconds |")
    print("|" + " --- |" * 12)
    for run in sorted(p for p in out.iterdir() if (p / "summary.json").exists()):
        print(row(run))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
