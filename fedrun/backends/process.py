"""`backend=process`: a pool of worker processes, each training a share of the round's clients
on one trainer it builds once and reuses for the whole run: one client after another, or, with
`vectorized=true`, the whole share as one batched group (`backend=vectorized`'s training).

Workers are forked after the experiment is built, so they inherit the client data without
pickling it (spawn, where fork is unavailable, ships it once per worker). Each round the state
the server sends (the global weights, whatever their shape) is written once into a
shared-memory tensor that every worker reads; jobs go out and updates come back a chunk of
clients per message, tensors pickled as raw numpy buffers. The client hooks (attack, privacy,
compression) hold state of the main process: they run here, in job order, on the updates that
come back.
"""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import pickle
import signal
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from multiprocessing.connection import Connection, wait
from multiprocessing.reduction import ForkingPickler
from typing import Annotated, Any, cast

import torch

from fedrun.backends.hooks import apply_client_hooks
from fedrun.backends.vectorized import VectorizedBackend
from fedrun.components import Range
from fedrun.core import ClientHook, ClientJob, ClientUpdate, FedrunError, RoundContext
from fedrun.data.examples import FederatedData
from fedrun.threads import per_worker

CHUNKS_PER_WORKER = 4  # a worker that finishes early takes another chunk: balance without per-client messages
STOP = b"stop"


class ProcessBackend:
    """Trains each round's clients in `workers` processes; results equal sequential training's."""

    trains_on_cpu = True  # device=auto means the CPU with this backend: forked workers cannot use CUDA

    def __init__(self, *, make_trainer: Callable[[], Any], data: FederatedData,
                 client_hooks: Sequence[ClientHook], workers: Annotated[int, Range(ge=1, null="one per core")] | None,
                 vectorized: bool):
        self.workers = resolve_workers(workers)
        self.vectorized = vectorized  # each worker trains its share as one batched group
        self.make_trainer = make_trainer
        self.data = data
        self.client_hooks = client_hooks
        self.pool: WorkerPool | None = None  # started at the first round: compose/build/--help never fork

    def train_cohort(self, weights: torch.Tensor, jobs: Sequence[ClientJob],
                     ctx: RoundContext) -> list[ClientUpdate]:
        if not jobs:
            return []
        if weights.device.type != "cpu":
            raise FedrunError(f"backend=process: trains on the CPU, the weights are on {weights.device}; "
                              "use device=cpu or backend=sequential")
        if self.pool is None:
            self.pool = WorkerPool(make_trainer=self.make_trainer, data=self.data, size=self.workers,
                                   vectorized=self.vectorized)
        costs = [self.data.clients[j.client_id].num_examples for j in jobs]
        # A batched share must arrive whole: one per worker.
        chunks = batched_chunks(costs, self.workers) if self.vectorized else cohort_chunks(
            costs, self.workers * CHUNKS_PER_WORKER)
        try:
            updates = self.pool.run(weights, jobs, chunks, ctx)
        except BaseException:
            self.close()  # a crash, or Ctrl-C mid-round: no worker outlives the error
            raise
        return [apply_client_hooks(u, self.client_hooks, ctx) for u in updates]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None


def resolve_workers(workers: int | None) -> int:
    """`backend.workers`: null means one per core."""
    return (os.cpu_count() or 1) if workers is None else workers


def cohort_chunks(costs: Sequence[int], count: int) -> list[list[int]]:
    """Job indices cut into at most `count` chunks of similar total cost (a client's examples
    stand for its work), costliest clients first so that no large one is left for the end."""
    order = sorted(range(len(costs)), key=lambda i: -costs[i])
    count = min(count, len(order))
    per_chunk = sum(costs) / count
    chunks: list[list[int]] = [[]]
    total = 0.0
    for i in order:
        if total >= per_chunk * len(chunks) and len(chunks) < count:
            chunks.append([])
        chunks[-1].append(i)
        total += costs[i]
    return chunks


# What one more client adds to a batched group's step, in plain steps: a step of 8 light clients
# costs about 2.7 plain steps, of 100 about 15 (logreg, batch 10; README, backend=vectorized).
BATCHED_CLIENT_COST = 0.2


def batched_chunks(costs: Sequence[int], count: int) -> list[list[int]]:
    """Job indices cut into at most `count` groups to train batched, one per worker. A group
    takes about as long as its costliest client, plus a little for each other one: the
    costliest clients go first, each to the group it lengthens least (largest first, as LPT)."""
    order = sorted(range(len(costs)), key=lambda i: -costs[i])
    chunks: list[list[int]] = [[] for _ in range(min(count, len(order)))]
    longest, total = [0.0] * len(chunks), [0.0] * len(chunks)

    def time_with(c: int, cost: float) -> float:
        top = max(longest[c], cost)
        return top + BATCHED_CLIENT_COST * (total[c] + cost - top)

    for i in order:
        c = min(range(len(chunks)), key=lambda c: time_with(c, costs[i]))
        chunks[c].append(i)
        longest[c], total[c] = max(longest[c], costs[i]), total[c] + costs[i]
    return [c for c in chunks if c]


def train_share(trainer: Any, data: FederatedData, weights: torch.Tensor, ctx: RoundContext,
                jobs: Sequence[ClientJob], on_client: Callable[[int], None] = lambda cid: None) -> tuple:
    """("ok", updates) for a share of jobs, or ("error", client_id, message) at the first failure."""
    updates = []
    for job in jobs:
        on_client(job.client_id)
        try:
            updates.append(trainer.train(job, data.clients[job.client_id], weights, ctx))
        except Exception as e:
            return "error", job.client_id, one_line(e)
    return "ok", updates


class BatchedShare:
    """A worker's share trained as one batched group: `backend=vectorized` on this worker's
    trainer, without client hooks (they run in the main process)."""

    def __init__(self, trainer: Any, data: FederatedData):
        self.data = data
        self.backend = VectorizedBackend(make_trainer=lambda: trainer, data=data, client_hooks=[], max_clients=None)

    def train_share(self, weights: torch.Tensor, ctx: RoundContext, jobs: Sequence[ClientJob],
                    on_client: Callable[[int], None] = lambda cid: None) -> tuple:
        """As `train_share`. Clients that train together fail together: the error names the
        share's first client and how many trained with it."""
        if self.backend.fallback is not None:  # it trains one client after another: name the one
            return train_share(self.backend.trainer, self.data, weights, ctx, jobs, on_client)
        on_client(jobs[0].client_id)
        try:
            return "ok", self.backend.train_cohort(weights, jobs, ctx)
        except Exception as e:
            return "error", jobs[0].client_id, f"{one_line(e)} (trained batched with {len(jobs) - 1} other clients)"


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


# ---- messages: tensors as numpy buffers (a tenth of torch's default pickling cost) -----------

def _tensor(array) -> torch.Tensor:
    return torch.from_numpy(array)


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj):
        if type(obj) is torch.Tensor and obj.device.type == "cpu" and not obj.requires_grad:
            try:
                return _tensor, (obj.numpy(),)
            except TypeError:  # a dtype numpy lacks (bfloat16): torch's own pickling
                pass
        return NotImplemented


def dumps(obj: Any) -> bytes:
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buffer.getvalue()


# ---- the pool ---------------------------------------------------------------------------------

@dataclass
class Worker:
    process: mp.process.BaseProcess
    conn: Connection


class WorkerPool:
    """`size` processes that each build one trainer and serve chunks of jobs until closed."""

    def __init__(self, *, make_trainer: Callable[[], Any], data: FederatedData, size: int,
                 vectorized: bool = False):
        if mp.current_process().daemon:  # Python forbids a daemonic process children: say so in one line
            raise FedrunError("backend: backend=process starts worker processes, which this process may not have: "
                              "it is a daemonic pool worker (e.g. hydra/launcher=joblib with "
                              "hydra.launcher.backend=multiprocessing); use the joblib launcher's default loky "
                              "backend, or backend=sequential or vectorized")
        # Each start method by its literal name: typeshed types only those contexts' Process.
        context = mp.get_context("fork") if start_method() == "fork" else mp.get_context("spawn")
        # The round's weights, written once per round and read by all; re-shared (a new version)
        # only when their shape or dtype changes, e.g. a strategy that sends predictions.
        self.weights: torch.Tensor | None = None
        self.version, self.versions = 0, [0] * size  # the version each worker holds
        self.current = torch.full((size,), -1, dtype=torch.int64).share_memory_()  # client in training
        threads = per_worker(size)  # the run's budget (fedrun/threads.py), split among the workers
        self.workers: list[Worker] = []
        for rank in range(size):
            parent, child = context.Pipe()
            process = context.Process(
                target=serve, name=f"fedrun-worker-{rank}", daemon=True,
                kwargs=dict(conn=child, make_trainer=make_trainer, data=data, current=self.current, rank=rank,
                            threads=threads, parent_pid=os.getpid(), vectorized=vectorized))
            process.start()
            child.close()
            self.workers.append(Worker(process, parent))
        self.state = {"busy": False}  # shared with the finalizer, which must not hold self
        # Also stop the workers if the backend is dropped without close() (e.g. a test's loop.run).
        self._finalizer = weakref.finalize(self, stop_workers, list(self.workers), self.state)

    def run(self, weights: torch.Tensor, jobs: Sequence[ClientJob], chunks: list[list[int]],
            ctx: RoundContext) -> list[ClientUpdate]:
        """Updates for `jobs`, in order: each idle worker takes the next chunk until none is left."""
        self._write(weights)
        self.state["busy"] = True
        updates: list[ClientUpdate | None] = [None] * len(jobs)
        waiting = list(reversed(chunks))
        assigned: dict[int, list[int]] = {}
        for rank in range(len(self.workers)):
            if waiting:
                assigned[rank] = self._send(rank, waiting.pop(), jobs, ctx)
        while assigned:
            for rank in self._ready(assigned):
                for i, update in zip(assigned.pop(rank), self._receive(rank)):
                    updates[i] = update
                if waiting:
                    assigned[rank] = self._send(rank, waiting.pop(), jobs, ctx)
        self.state["busy"] = False
        return cast("list[ClientUpdate]", updates)  # the chunks cover every job: no slot is left None

    def _write(self, weights: torch.Tensor) -> None:
        if self.weights is None or self.weights.shape != weights.shape or self.weights.dtype != weights.dtype:
            self.weights = torch.empty_like(weights).share_memory_()
            self.version += 1
        self.weights.copy_(weights)

    def _send(self, rank: int, chunk: list[int], jobs: Sequence[ClientJob], ctx: RoundContext) -> list[int]:
        # A new shared tensor goes to each worker once, as a handle to the same memory (not a copy).
        handle = None if self.versions[rank] == self.version else bytes(ForkingPickler.dumps(self.weights))
        self.versions[rank] = self.version
        try:
            self.workers[rank].conn.send_bytes(dumps((ctx, [jobs[i] for i in chunk], handle)))
        except OSError:  # it died between rounds
            self._died(rank)
        return chunk

    def _ready(self, assigned: dict[int, list[int]]) -> list[int]:
        """Ranks with a reply waiting; a worker that died instead is an error naming its client."""
        conns = {self.workers[r].conn: r for r in assigned}
        sentinels = {self.workers[r].process.sentinel: r for r in assigned}
        ready = wait([*conns, *sentinels])
        replied = [conns[c] for c in ready if c in conns]
        for s in ready:
            rank = sentinels.get(s) if isinstance(s, int) else None  # a sentinel is an int, a reply a Connection
            if rank is not None and rank not in replied and not self.workers[rank].conn.poll():
                self._died(rank)
        return replied

    def _receive(self, rank: int) -> list[ClientUpdate]:
        try:
            reply = pickle.loads(self.workers[rank].conn.recv_bytes())
        except (EOFError, OSError):
            self._died(rank)
        if reply[0] == "error":
            _, client_id, message = reply
            raise FedrunError(f"backend=process: client {client_id} failed in worker {rank}: {message}")
        return reply[1]

    def _died(self, rank: int) -> None:
        worker = self.workers[rank]
        worker.process.join(timeout=1)
        raise FedrunError(f"backend=process: worker {rank} died (exit code {worker.process.exitcode}) "
                          f"while training client {int(self.current[rank])}")

    def close(self) -> None:
        self._finalizer()


def start_method() -> str:
    """fork (workers inherit the data) where the platform has it, else spawn."""
    return "fork" if "fork" in mp.get_all_start_methods() else "spawn"


def stop_workers(workers: list[Worker], state: dict) -> None:
    """Ask idle workers to stop; terminate busy or stuck ones (Ctrl-C or an error mid-round)."""
    busy = state["busy"]
    if not busy:
        for w in workers:
            try:
                w.conn.send_bytes(STOP)
            except OSError:
                pass
    for w in workers:
        w.process.join(timeout=0 if busy else 2)
        if w.process.is_alive():
            w.process.terminate()
            w.process.join(timeout=2)
        if w.process.is_alive():
            w.process.kill()
            w.process.join()
        w.conn.close()


def serve(*, conn: Connection, make_trainer: Callable[[], Any], data: FederatedData, current: torch.Tensor,
          rank: int, threads: int, parent_pid: int, vectorized: bool = False) -> None:
    """A worker's life: build one trainer, then train each chunk of jobs it is sent (one
    client after another, or as one batched group)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    torch.set_num_threads(threads)
    try:
        trainer, failure = make_trainer(), None
        train = BatchedShare(trainer, data).train_share if vectorized else partial(train_share, trainer, data)
    except Exception as e:
        train, failure = None, one_line(e)
    weights = None

    def on_client(client_id: int) -> None:
        current[rank] = client_id

    while True:
        if not conn.poll(1.0):
            if os.getppid() != parent_pid:  # the main process is gone: so are we
                return
            continue
        message = conn.recv_bytes()
        if message == STOP:
            return
        ctx, jobs, handle = pickle.loads(message)
        if handle is not None:
            weights = pickle.loads(handle)
        if failure is not None:
            reply: tuple = ("error", jobs[0].client_id, f"building the trainer: {failure}")
        else:
            # The trainer was built (no failure), and a worker's first message carries the weights.
            assert train is not None and weights is not None
            reply = train(weights, ctx, jobs, on_client)
        conn.send_bytes(dumps(reply))
