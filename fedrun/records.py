"""The rows and summaries a run writes: metrics.csv and clients.csv rows, checkpoint state, summary."""
from __future__ import annotations

import torch

from fedrun.core import ClientJob, ClientUpdate, FedrunError
from fedrun.data.examples import FederatedData

METRIC_COLUMNS = ["round", "clients", "examples", "train_loss", "eval_loss", "eval_ppl", "eval_acc",
                  "bytes_up", "bytes_down", "seconds", "sampled", "reported", "dropped"]
CLIENT_COLUMNS = ["round", "client_id", "examples", "train_loss", "update_norm", "seconds", "status", "local_steps"]
LEDGER_COLUMNS = ["round", "sample_rate", "noise_multiplier", "clip_norm", "participants", "mechanism", "canaries"]
EVAL_KEYS = ("eval_loss", "eval_ppl", "eval_acc")
ROUND_TABLES = ("metrics.csv", "clients.csv", "privacy_ledger.csv", "samples.jsonl")  # a resume cuts each to its round


def round_row(round_idx: int, updates: list[ClientUpdate], weights: torch.Tensor, *,
              jobs: list[ClientJob], dropped: int) -> dict:
    """The round's metrics.csv row before evaluation; train_loss is example-weighted.

    The global weights (and any strategy state, e.g. SCAFFOLD's c) go down to every sampled
    client, dropped ones included, unless a baseline sends nothing (strategy=local, centralized);
    updates come up from those that report."""
    examples = sum(u.num_examples for u in updates)
    return {
        "round": round_idx,
        "clients": len(updates),
        "examples": examples,
        "train_loss": sum(u.train_loss * u.num_examples for u in updates) / examples if updates else None,
        "bytes_up": sum(u.bytes_up for u in updates),
        "bytes_down": sum(weights.element_size() * (weights.numel() if j.coords_down is None else j.coords_down)
                          + j.extra_bytes for j in jobs),
        "sampled": len(jobs),
        "reported": len(updates),
        "dropped": dropped,
    }


PRIVATE_CLIENT_FIELDS = ("examples", "train_loss", "update_norm", "local_steps")  # what secure aggregation hides


def client_rows(round_idx: int, updates: list[ClientUpdate], dropped: list[int], data: FederatedData, *,
                hide_stats: bool = False) -> list[dict]:
    """clients.csv rows; with `hide_stats` (secure aggregation) only what the server sees: who
    took part, who dropped, and how long each took to answer."""
    rows = [{"round": round_idx, "client_id": u.client_id, "examples": u.num_examples,
             "train_loss": u.train_loss, "update_norm": u.update_norm, "seconds": u.seconds,
             "status": "byzantine" if u.malicious else "ok", "local_steps": u.num_steps} for u in updates]
    rows += [{"round": round_idx, "client_id": c, "examples": data.clients[c].num_examples, "status": "dropped"}
             for c in dropped]
    if hide_stats:
        rows = [{k: v for k, v in row.items() if k not in PRIVATE_CLIENT_FIELDS} for row in rows]
    return rows


def parse_row(row: dict[str, str]) -> dict:
    """A metrics.csv row read back: numbers as numbers (exactly as written), empty as None."""
    def value(text: str):
        if text == "":
            return None
        return int(text) if text.lstrip("-").isdigit() else float(text)

    return {k: value(v) for k, v in row.items()}


def resumed_history(rows: list[dict[str, str]], round_idx: int) -> list[dict]:
    """metrics.csv's rows of rounds 0..round_idx (a checkpoint's round), parsed. Appends are not
    fsynced but checkpoints are, so a crash can lose rows the checkpoint counts on: then the run
    cannot resume exactly, and this says so rather than continue from the wrong state."""
    history = [parsed for r in rows if int(r["round"]) <= round_idx and (parsed := _parsed(r)) is not None]
    rounds = [r["round"] for r in history]
    if rounds != list(range(round_idx + 1)):
        missing = sorted(set(range(round_idx + 1)) - set(rounds))
        problem = (f"the rows of rounds {_spans(missing)} are missing" if missing
                   else "rows are repeated or out of order")
        raise FedrunError(f"metrics.csv: {problem} up to the checkpoint of round {round_idx} (lost in a crash); "
                          "the run cannot resume exactly; start it again with `fedrun train`")
    return history


def _parsed(row: dict[str, str]) -> dict | None:
    try:
        return parse_row(row)
    except ValueError:  # a number garbled by a crash counts as a missing row
        return None


def _spans(rounds: list[int]) -> str:
    """[3, 4, 5, 9] -> '3-5, 9'."""
    spans: list[list[int]] = []
    for r in rounds:
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def summarize(history: list[dict]) -> dict:
    evaluated = [r for r in history if r.get("eval_loss") is not None]
    best = min(evaluated, key=lambda r: r["eval_loss"])
    return {
        "rounds": history[-1]["round"],
        "initial": {k: history[0][k] for k in EVAL_KEYS},
        "final": {k: evaluated[-1][k] for k in EVAL_KEYS} | {"round": evaluated[-1]["round"]},
        "best": {k: best[k] for k in EVAL_KEYS} | {"round": best["round"]},
        "bytes_up": sum(r["bytes_up"] for r in history),
        "bytes_down": sum(r["bytes_down"] for r in history),
        "seconds": sum(r["seconds"] for r in history),
    }
