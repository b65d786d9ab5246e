"""The run directory: the interface between a run and everything that reads it.

config.yaml (resolved), metrics.csv and clients.csv (appended one round at a time), samples.jsonl
(eval.samples: the global model's responses, appended at each evaluation),
partition.csv, checkpoints/round_NNNN.pt with a .sha256 beside each (written to a temp file,
then renamed), status.json (running / interrupted / finished / failed), model.safetensors,
summary.json and train.log. `report` and `resume` need nothing else. `.lock` is held (flock) by the
one process that writes the run, so a second train or resume of it is refused.
"""
from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import json
import logging
import os
import re
import stat
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file
from torch import nn

from fedrun.core import FedrunError

log = logging.getLogger(__name__)

LOCK = ".lock"
NEW_RUN_MAY_HOLD = {".hydra", LOCK}  # Hydra's record of a sweep job is written before the job starts


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """An OSError while writing `path` (disk full, quota, read-only) becomes one line naming the file."""
    try:
        yield
    except OSError as e:
        raise FedrunError(f"run_dir: cannot write {path}: [Errno {e.errno}] {e.strerror or e}") from e


def _file_mode() -> int:
    """The mode an ordinary new file gets here (0o644 under the usual umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()


def atomic_write(path: Path, write, *, durable: bool = True) -> None:
    """Call `write(tmp_path)`, flush it to disk (if durable), then rename over `path`. The file
    gets an ordinary file's mode: safetensors writes 0600, which other users could not read."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with writing(path):
            write(tmp)
            os.chmod(tmp, FILE_MODE)
            if durable:
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a failed write leaves no half file behind (on a full disk above all)


class CsvTable:
    """A CSV file grown one row at a time; columns fixed when the file is created."""

    def __init__(self, path: Path, columns: list[str]):
        self.path = path
        self.columns = columns
        if not path.exists() or (path.is_file() and path.stat().st_size == 0):  # new, emptied or lost its header
            with writing(path), open(path, "w", newline="") as f:
                csv.writer(f).writerow(columns)

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        with writing(self.path), open(self.path, "a", newline="") as f:
            writer = csv.writer(f)
            for row in rows:
                writer.writerow(["" if row.get(c) is None else row[c] for c in self.columns])

    def intact_rows(self) -> list[dict[str, str]]:
        """The rows a crash left whole. Appends are not fsynced, so a crash can leave a torn last
        line (no newline yet: dropped, even if it parses) and, after a power cut, garbage: rows of
        the wrong width or whose round is not an integer are dropped too, with a warning."""
        with open_regular(self.path) as f:
            text = f.read().decode("utf-8", errors="replace")
        lines = text[:text.rfind("\n") + 1].splitlines()
        if not lines:  # not even the header survived
            return []
        if _fields(lines[0]) != self.columns:
            raise FedrunError(f"{self.path.name}: its columns {lines[0][:120]!r} are not this run's "
                              f"({','.join(self.columns)}); the run cannot resume")
        rows = [dict(zip(self.columns, fields)) for fields in map(_fields, lines[1:]) if self._intact(fields)]
        if len(rows) < len(text.splitlines()) - 1:
            log.warning("%s: dropped %d torn or malformed row(s)", self.path.name,
                        len(text.splitlines()) - 1 - len(rows))
        return rows

    def _intact(self, fields: list[str]) -> bool:
        return (len(fields) == len(self.columns)
                and re.fullmatch(r"[0-9]+", fields[self.columns.index("round")]) is not None)

    def truncate_after(self, round_idx: int) -> list[dict[str, str]]:
        """Keep the intact rows of rounds up to `round_idx` (a crashed run's rounds past its checkpoint go)."""
        rows = [r for r in self.intact_rows() if int(r["round"]) <= round_idx]
        self.replace(rows)
        return rows

    def replace(self, rows: Iterable[dict[str, Any]]) -> None:
        """The whole table written at once: a temp file, then renamed over the old one."""
        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.columns)
                writer.writeheader()
                writer.writerows(rows)

        atomic_write(self.path, write)


class JsonLines:
    """A JSON Lines file grown a few lines at a time, each an object with a `round` (samples.jsonl)."""

    def __init__(self, path: Path):
        self.path = path

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        with writing(self.path), open(self.path, "a", encoding="utf-8") as f:
            f.write(text)

    def truncate_after(self, round_idx: int) -> None:
        """Keep the whole lines of rounds up to `round_idx`, as CsvTable does; no file, nothing to cut."""
        if not self.path.exists():
            return
        with open_regular(self.path) as f:
            text = f.read().decode("utf-8", errors="replace")
        lines = text[:text.rfind("\n") + 1].splitlines()  # a torn last line (no newline yet) goes
        kept = [line for line, r in zip(lines, map(_round_of, lines)) if r is not None and r <= round_idx]
        atomic_write(self.path, lambda p: p.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8"))


def _round_of(line: str) -> int | None:
    """The `round` of one JSON line; None when the line is torn or not such an object."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    value = row.get("round") if isinstance(row, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _fields(line: str) -> list[str]:
    """One CSV line's fields, each line on its own: a stray quote must not swallow the next rows."""
    try:
        return next(csv.reader([line]), [])
    except csv.Error:
        return []


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self._log_handler: logging.Handler | None = None
        self._lock_fd: int | None = None

    @classmethod
    def create(cls, path: str | Path, cfg: DictConfig) -> RunDir:
        """A new run in an empty (or absent) folder, locked before anything is written into it."""
        run = cls(Path(path))
        with writing(run.path):
            run.path.mkdir(parents=True, exist_ok=True)
        run.lock()
        try:
            run._refuse_used()
            # metrics.csv (empty) first: from the moment config.yaml exists, the folder is a run that
            # `fedrun resume` can restart, even if killed before its first row
            atomic_write(run.path / "metrics.csv", lambda p: p.write_bytes(b""), durable=False)
            atomic_write(run.path / "config.yaml", lambda p: p.write_text(OmegaConf.to_yaml(cfg)))
            run.open_log()
        except BaseException:
            run.close()
            raise
        return run

    def _refuse_used(self) -> None:
        """Never write a new run over files already there: only a resume continues a run."""
        if is_run_dir(self.path):
            finished = (self.path / "summary.json").exists()
            raise FedrunError(f"run_dir: {self.path} already holds a {'finished ' if finished else ''}run; choose "
                              f"another run_dir{'' if finished else f' or `fedrun resume {self.path}`'}")
        found = sorted(p.name for p in self.path.iterdir() if p.name not in NEW_RUN_MAY_HOLD
                       and not (p.name == "metrics.csv" and p.is_file() and p.stat().st_size == 0))
        if found:
            raise FedrunError(f"run_dir: {self.path} is not empty ({', '.join(found[:3])}"
                              f"{', ...' if len(found) > 3 else ''}) and holds no run fedrun can resume; "
                              "choose a new or empty run_dir")

    def lock(self) -> None:
        """Hold `.lock` (flock, released by close() or the process's end) while this process
        writes the run: a second train or resume of the same directory is refused."""
        path = self.path / LOCK
        with writing(path):  # O_NOFOLLOW: a run directory from elsewhere may hold a link here
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise FedrunError(f"run_dir: {path} is not a regular file; remove it")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 16, 0).decode(errors="replace").strip()
            os.close(fd)
            raise FedrunError(f"run_dir: {self.path} is in use by another fedrun process (pid "
                              f"{holder if holder.isdigit() else 'unknown'}); wait for it to end, or stop it and "
                              f"`fedrun resume {self.path}`") from None
        except BaseException:
            os.close(fd)
            raise
        with contextlib.suppress(OSError):  # the holder's pid, for the message above; only a hint
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

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
        with writing(self.checkpoints):  # made here, not at creation: a run killed early has no empty folder
            self.checkpoints.mkdir(exist_ok=True)
        atomic_write(path, lambda p: torch.save(state, p))
        digest = _sha256(path)
        atomic_write(path.with_suffix(".sha256"), lambda p: p.write_text(digest + "\n"))
        if keep is not None:
            for old in self._checkpoint_paths()[:-keep]:
                old.unlink()
                old.with_suffix(".sha256").unlink(missing_ok=True)
        return path

    def latest_checkpoint(self) -> dict[str, Any] | None:
        """The newest checkpoint whose checksum matches; a corrupt one is skipped with a warning."""
        for path in reversed(self._checkpoint_paths()):
            try:
                expected = read_regular_bytes(path.with_suffix(".sha256"), limit=1024).decode(errors="replace")
                intact = expected.strip() == _sha256(path)
            except FedrunError as e:  # missing, a FIFO, a link to a device: not a checkpoint to trust
                log.warning("checkpoint %s is unreadable (%s); using an earlier one", path.name, e)
                continue
            if not intact:
                log.warning("checkpoint %s is torn or corrupt (checksum mismatch); using an earlier one", path.name)
                continue
            return load_checkpoint(path)
        return None

    def _checkpoint_paths(self) -> list[Path]:
        """checkpoints/round_N.pt by round number (as text round_10000.pt sorts before round_9999.pt)."""
        rounds = {p: int(m[1]) for p in self.checkpoints.glob("round_*.pt")
                  if (m := re.fullmatch(r"round_([0-9]+)\.pt", p.name))}
        return sorted(rounds, key=rounds.__getitem__)

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
        if self._lock_fd is not None:  # the file stays: removing it could split waiters over two inodes
            os.close(self._lock_fd)
            self._lock_fd = None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open_regular(path) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    with open_regular(Path(path)) as f:
        return torch.load(f, map_location="cpu", weights_only=True)


# ---- reading files of a run directory that may come from someone else ------------------------

def open_regular(path: Path) -> BinaryIO:
    """`path` opened for reading if it is a regular file; FedrunError otherwise.

    A FIFO would block a reader forever and /dev/zero never ends, so anything but a regular
    file is refused: checked before opening (opening a device can have effects of its own)
    and again on the opened file, which may have been swapped in between. O_NONBLOCK keeps
    the open of a FIFO from waiting for a writer.
    """
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise FedrunError(f"{path}: not a regular file ({_file_kind(mode)})")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise FedrunError(f"{path}: cannot be read ({e.strerror})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise FedrunError(f"{path}: not a regular file ({_file_kind(mode)})")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_regular_bytes(path: Path, *, limit: int) -> bytes:
    """The bytes of `path`, a regular file of at most `limit` bytes; FedrunError otherwise."""
    with open_regular(path) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise FedrunError(f"{path}: larger than {limit} bytes; not read")
    return data


def _file_kind(mode: int) -> str:
    kinds = {stat.S_ISDIR: "a folder", stat.S_ISFIFO: "a FIFO", stat.S_ISCHR: "a character device",
             stat.S_ISBLK: "a block device", stat.S_ISSOCK: "a socket"}
    return next((word for test, word in kinds.items() if test(mode)), "not a plain file")


def file_in_the_way(path: Path) -> str | None:
    """Where a folder to be made at `path` would meet a file: "" (path itself is a file), " is
    inside F, which" (an ancestor F is), or None (it can be made)."""
    for folder in (path, *path.parents):
        if folder.exists():
            if folder.is_dir():
                return None
            return "" if folder == path else f" is inside {folder}, which"
    return None


def is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file() and (path / "metrics.csv").is_file()
