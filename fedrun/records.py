"""The rows and summaries a run writes: metrics.csv and clients.csv rows, checkpoint state, summary."""
from __future__ import annotations

import torch

from fedrun.core import ClientJob, ClientUpdate
from fedrun.data.examples import FederatedData

METRIC_COLUMNS = ["round", "clients", "examples", "train_loss", "eval_loss", "eval_ppl", "eval_acc",
                  "bytes_up", "bytes_down", "seconds", "sampled", "reported", "dropped"]
CLIENT_COLUMNS = ["round", "client_id", "examples", "train_loss", "update_norm", "seconds", "status", "local_steps"]
LEDGER_COLUMNS = ["round", "sample_rate", "noise_multiplier", "clip_norm", "participants", "mechanism"]
EVAL_KEYS = ("eval_loss", "eval_ppl", "eval_acc")


def round_row(round_idx: int, updates: list[ClientUpdate], weights: torch.Tensor, *,
              jobs: list[ClientJob], dropped: int) -> dict:
    """The round's metrics.csv row before evaluation; train_loss is example-weighted.

    The global weights (and any strategy state, e.g. SCAFFOLD's c) go down to every sampled
    client, dropped ones included; updates come up from those that report."""
    examples = sum(u.num_examples for u in updates)
    return {
        "round": round_idx,
        "clients": len(updates),
        "examples": examples,
        "train_loss": sum(u.train_loss * u.num_examples for u in updates) / examples if updates else None,
        "bytes_up": sum(u.bytes_up for u in updates),
        "bytes_down": sum(weights.numel() * weights.element_size() + j.extra_bytes for j in jobs),
        "sampled": len(jobs),
        "reported": len(updates),
        "dropped": dropped,
    }


def client_rows(round_idx: int, updates: list[ClientUpdate], dropped: list[int], data: FederatedData) -> list[dict]:
    rows = [{"round": round_idx, "client_id": u.client_id, "examples": u.num_examples,
             "train_loss": u.train_loss, "update_norm": u.update_norm, "seconds": u.seconds,
             "status": "byzantine" if u.malicious else "ok", "local_steps": u.num_steps} for u in updates]
    rows += [{"round": round_idx, "client_id": c, "examples": data.clients[c].num_examples, "status": "dropped"}
             for c in dropped]
    return rows


def parse_row(row: dict[str, str]) -> dict:
    """A metrics.csv row read back: numbers as numbers (exactly as written), empty as None."""
    def value(text: str):
        if text == "":
            return None
        return int(text) if text.lstrip("-").isdigit() else float(text)

    return {k: value(v) for k, v in row.items()}


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
