"""What every contender reports, measured the same way for all of them (standard library only).

A contender runs in its own process. It calls `RoundClock.start_round()` at the start of each
round and `finish()` at the end; `report` writes seconds per round, the time from process
start (the orchestrator's `BENCH_T0`, taken just before it started the process) to the first
round, the process's own peak resident memory (VmHWM) and the final eval loss to a JSON file.
The orchestrator adds the peak memory of the whole process tree (Ray's and worker pools'
processes included) from `TreeMemory`.
"""
from __future__ import annotations

import json
import math
import os
import signal
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


def peak_rss_mb() -> float:
    """This process's peak resident set size (VmHWM), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class RoundClock:
    """Wall-clock seconds of each round, and when the first one started."""

    t0: float = field(default_factory=lambda: float(os.environ.get("BENCH_T0", time.time())))
    starts: list[float] = field(default_factory=list)
    ends: list[float] = field(default_factory=list)

    def start_round(self) -> None:
        self.starts.append(time.time())

    def end_round(self) -> None:
        self.ends.append(time.time())

    def seconds(self) -> list[float]:
        return [end - start for start, end in zip(self.starts, self.ends)]

    def report(self, path: str | Path, *, eval_loss: float, warmup: int, **extra) -> dict:
        """Write (and return) the contender's result. The median skips `warmup` rounds and the
        last one (fedrun evaluates and checkpoints inside its last round)."""
        seconds = self.seconds()
        timed = seconds[warmup:-1] or seconds
        result = {
            "seconds_per_round": statistics.median(timed) if timed else float("nan"),
            "round_seconds": seconds,
            "time_to_first_round": self.starts[0] - self.t0 if self.starts else float("nan"),
            "peak_rss_mb": peak_rss_mb(),
            "eval_loss": eval_loss,
            **extra,
        }
        Path(path).write_text(json.dumps(result, indent=2) + "\n")
        return result


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it, from /proc's parent links."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def pss_mb(pid: int) -> float:
    """Proportional set size: shared pages (torch's libraries, shared tensors) split between
    the processes that map them, so summing it over a tree does not count them twice."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class TreeMemory:
    """Samples the summed PSS of a process tree in a thread; `peak_mb` is the largest sum seen.

    On a shared machine a runaway contender must not bring in the kernel's OOM killer (which
    may pick someone else's process): past `limit_mb` its whole session is killed."""

    def __init__(self, pid: int, *, limit_mb: float = math.inf, interval: float = 0.25):
        self.pid, self.limit_mb, self.interval = pid, limit_mb, interval
        self.peak_mb, self.exceeded = 0.0, False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, sum(pss_mb(p) for p in descendants(self.pid)))
            if self.peak_mb > self.limit_mb and not self.exceeded:
                self.exceeded = True
                try:
                    os.killpg(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self._stop.wait(self.interval)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_mb


class Turnstile:
    """One thread at a time, in a fixed cycle; a finished thread leaves the cycle."""

    def __init__(self, size: int):
        self.size, self.turn, self.done = size, 0, set()
        self.cond = threading.Condition()

    def wait_for(self, i: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn == i)

    def pass_on(self, i: int, *, finished: bool = False) -> None:
        with self.cond:
            if finished:
                self.done.add(i)
            if len(self.done) < self.size:
                nxt = (i + 1) % self.size
                while nxt in self.done:
                    nxt = (nxt + 1) % self.size
                self.turn = nxt
            self.cond.notify_all()

    def boundary(self, i: int) -> float:
        """Hand the turn on, wait for it to come back, and return the time it did."""
        self.pass_on(i)
        self.wait_for(i)
        return time.perf_counter()
