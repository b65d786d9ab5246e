"""The run directory: the interface between a run and everything that reads it.

config.yaml (resolved), metrics.csv and clients.csv (appended one round at a time),
partition.csv, checkpoints/round_NNNN.pt (written to a temp file, then renamed),
model.safetensors, summary.json and train.log.
"""
from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file
from torch import nn

from fedrun.core import FedrunError

log = logging.getLogger(__name__)


def atomic_write(path: Path, write) -> None:
    """Call `write(tmp_path)`, flush it to disk, then rename over `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
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


class RunDir:
    def __init__(self, path: Path):
        self.path = path
        self.checkpoints = path / "checkpoints"

    @classmethod
    def create(cls, path: str | Path, cfg: DictConfig) -> "RunDir":
        run = cls(Path(path))
        if (run.path / "metrics.csv").exists():
            raise FedrunError(f"run_dir: {path} already holds a run; choose another run_dir")
        run.checkpoints.mkdir(parents=True, exist_ok=True)
        atomic_write(run.path / "config.yaml", lambda p: p.write_text(OmegaConf.to_yaml(cfg)))
        handler = logging.FileHandler(run.path / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger = logging.getLogger("fedrun")
        logger.addHandler(handler)
        if logger.level == logging.NOTSET:  # train.log gets INFO even when no CLI configured logging
            logger.setLevel(logging.INFO)
        run._log_handler = handler
        return run

    def table(self, name: str, columns: list[str]) -> CsvTable:
        return CsvTable(self.path / name, columns)

    def save_checkpoint(self, round_idx: int, state: dict[str, Any]) -> Path:
        path = self.checkpoints / f"round_{round_idx:04d}.pt"
        atomic_write(path, lambda p: torch.save(state, p))
        return path

    def save_model(self, model: nn.Module, metadata: dict[str, str]) -> None:
        """model.safetensors: named weights, a tied tensor once under its first name."""
        tensors = {name: p.detach().cpu().clone() for name, p in model.named_parameters()}
        atomic_write(self.path / "model.safetensors", lambda p: save_file(tensors, str(p), metadata=metadata))

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        text = json.dumps(data, indent=2, default=str)
        atomic_write(self.path / name, lambda p: p.write_text(text + "\n"))

    def close(self) -> None:
        handler = getattr(self, "_log_handler", None)
        if handler is not None:
            logging.getLogger("fedrun").removeHandler(handler)
            handler.close()


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)
