"""The run directory: the interface between a run and everything that reads it.

config.yaml (resolved), metrics.csv and clients.csv (appended one round at a time),
partition.csv, checkpoints/round_NNNN.pt with a .sha256 beside each (written to a temp file,
then renamed), status.json (running / finished / failed), model.safetensors, summary.json and
train.log. `report` and `resume` need nothing else.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file
from torch import nn

from fedrun.core import FedrunError

log = logging.getLogger(__name__)


def atomic_write(path: Path, write, *, durable: bool = True) -> None:
    """Call `write(tmp_path)`, flush it to disk (if durable), then rename over `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    if durable:
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    os.replace(tmp, path)


class CsvTable:
    """A CSV file grown one row at a time; columns fixed when the file is created."""

    def __init__(self, path: Path, columns: list[str]):
        self.path = path
        self.columns = columns
        if not path.exists():
            with open(path, "w", newline="") as f:
                csv.writer(f).writerow(columns)

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        with open(self.path, "a", newline="") as f:
            writer = csv.writer(f)
            for row in rows:
                writer.writerow(["" if row.get(c) is None else row[c] for c in self.columns])

    def truncate_after(self, round_idx: int) -> list[dict[str, str]]:
        """Drop rows of rounds after `round_idx` (a crashed run's rounds past its checkpoint)."""
        with open(self.path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("round", "").isdigit() and int(r["round"]) <= round_idx]

        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.columns)
                writer.writeheader()
                writer.writerows(rows)

        atomic_write(self.path, write)
        return rows


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self._log_handler: logging.Handler | None = None

    @classmethod
    def create(cls, path: str | Path, cfg: DictConfig) -> "RunDir":
        run = cls(Path(path))
        if (run.path / "metrics.csv").exists():
            raise FedrunError(f"run_dir: {path} already holds a run; choose another run_dir or `fedrun resume {path}`")
        run.checkpoints.mkdir(parents=True, exist_ok=True)
        atomic_write(run.path / "config.yaml", lambda p: p.write_text(OmegaConf.to_yaml(cfg)))
        run.open_log()
        return run

    def open_log(self) -> None:
        handler = logging.FileHandler(self.path / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger = logging.getLogger("fedrun")
        logger.addHandler(handler)
        if logger.level == logging.NOTSET:  # train.log gets INFO even when no CLI configured logging
            logger.setLevel(logging.INFO)
        self._log_handler = handler

    def table(self, name: str, columns: list[str]) -> CsvTable:
        return CsvTable(self.path / name, columns)

    def set_status(self, state: str, *, round_idx: int, error: str | None = None) -> None:
        """status.json: lets `report` tell a running run from a crashed or failed one."""
        status = {"state": state, "pid": os.getpid(), "round": round_idx, "updated": time.time()}
        if error is not None:
            status["error"] = error
        atomic_write(self.path / "status.json", lambda p: p.write_text(json.dumps(status) + "\n"), durable=False)

    # ---- checkpoints ------------------------------------------------------------------------

    def save_checkpoint(self, round_idx: int, state: dict[str, Any], *, keep: int | None = None) -> Path:
        path = self.checkpoints / f"round_{round_idx:04d}.pt"
        atomic_write(path, lambda p: torch.save(state, p))
        digest = _sha256(path)
        atomic_write(path.with_suffix(".sha256"), lambda p: p.write_text(digest + "\n"))
        if keep is not None:
            for old in sorted(self.checkpoints.glob("round_*.pt"))[:-keep]:
                old.unlink()
                old.with_suffix(".sha256").unlink(missing_ok=True)
        return path

    def latest_checkpoint(self) -> dict[str, Any] | None:
        """The newest checkpoint whose checksum matches; a corrupt one is skipped with a warning."""
        for path in sorted(self.checkpoints.glob("round_*.pt"), reverse=True):
            expected = path.with_suffix(".sha256")
            if not expected.exists() or expected.read_text().strip() != _sha256(path):
                log.warning("checkpoint %s is torn or corrupt (checksum mismatch); using an earlier one", path.name)
                continue
            return load_checkpoint(path)
        return None

    # ---- final outputs ----------------------------------------------------------------------

    def save_model(self, model: nn.Module, metadata: dict[str, str]) -> None:
        """model.safetensors: named weights, a tied tensor once under its first name."""
        tensors = {name: p.detach().cpu().clone() for name, p in model.named_parameters()}
        atomic_write(self.path / "model.safetensors", lambda p: save_file(tensors, str(p), metadata=metadata))

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        text = json.dumps(data, indent=2, default=str)
        atomic_write(self.path / name, lambda p: p.write_text(text + "\n"))

    def close(self) -> None:
        if self._log_handler is not None:
            logging.getLogger("fedrun").removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file() and (path / "metrics.csv").is_file()
