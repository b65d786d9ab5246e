"""The README's empirical-epsilon table from the runs of benchmarks/quality/epsilon_audit.sh.

Usage: python -m benchmarks.quality.epsilon_table OUT  (prints a markdown table)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def cell(value, digits: int = 2) -> str:
    return "-" if value is None else "inf" if value == float("inf") else f"{value:.{digits}f}"


def row(run: Path) -> str:
    s = json.loads((run / "summary.json").read_text())
    privacy, audit = s.get("privacy", {}), s["audit"]
    eps = audit["epsilon"]
    exposure = audit.get("canary_exposure")
    return "| " + " | ".join([
        run.name, cell(privacy.get("noise_multiplier", 0.0), 1),
        cell(privacy.get("epsilon_rdp", float("inf"))), cell(privacy.get("epsilon_prv", float("inf"))),
        cell(eps["all_rounds"]["epsilon"]), cell(eps["final"]["epsilon"]),
        f"{cell(eps['all_rounds']['epsilon_lower_bound'])} / {cell(eps['final']['epsilon_lower_bound'])}",
        f"{cell(eps['all_rounds']['noise_floor'])} / {cell(eps['final']['noise_floor'])}",
        f"{eps['canaries_inserted']}/{eps['canary_clients']}",
        "-" if exposure is None else f"{exposure:.1f} / {audit['max_exposure']:.1f}",
        cell(s["final"]["eval_ppl"]), f"{s['seconds']:.0f}"]) + " |"


def main(out: Path) -> None:
    print("| run | z | epsilon RDP | epsilon PRV | empirical, all rounds | empirical, final model "
          "| lower bound 95% (all / final) | noise floor (all / final) | canaries inserted | exposure (bits / max) "
          "| eval ppl | seconds |")
    print("|" + " --- |" * 12)
    for run in sorted(p for p in out.iterdir() if (p / "summary.json").exists()):
        print(row(run))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
