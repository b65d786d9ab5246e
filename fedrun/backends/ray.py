"""`backend=ray`: the round's clients trained by Ray actors, on this machine or a cluster.

Each of `backend.workers` actors builds one trainer when it starts and reuses it for the whole
run. An actor loads the client data from the run's data cache entry where its machine has that
file: memory-mapped, so the machine's page cache holds it once for the driver and every actor
(100,000 clients' data is gigabytes). Only actors without it (another node, `data.cache=false`)
get the data through Ray's object store, put there once, which actors of one node map read-only.
The global weights go in once per round (`ray.put`). Jobs go out a chunk of clients per call,
handed to whichever actor is free. As with every backend, the client hooks (attack,
privacy, compression) run here, in the main process, in job order.

An actor that dies (its node lost) is dropped and its clients go to the others: each client's
randomness is its own, so the results stay those of an uninterrupted run. Only when every
actor is lost does the run stop, with one line saying to resume it.

A local Ray (`backend.address: null`), or a cluster joined on a loopback address, listens on
loopback only. (This module's name shadows `ray` only for relative imports, which fedrun does
not use: `import ray` here is the library.)
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Annotated, Any, cast

import torch

from fedrun.backends.hooks import apply_client_hooks
from fedrun.backends.process import CHUNKS_PER_WORKER, cohort_chunks, one_line, train_share
from fedrun.components import Range
from fedrun.core import ClientHook, ClientJob, ClientUpdate, FedrunError, RoundContext
from fedrun.data import cache as data_cache
from fedrun.data.examples import FederatedData

log = logging.getLogger(__name__)
EXTRA = "backend=ray needs the ray extra: pip install -e .[ray]"


class RayBackend:
    """Trains each round's clients in Ray actors; results equal sequential training's."""

    trains_on_cpu = True  # device=auto means the CPU with this backend: its actors ask Ray for CPUs only

    def __init__(self, *, make_trainer: Callable[[], Any], data: FederatedData, client_hooks: Sequence[ClientHook],
                 workers: Annotated[int, Range(ge=1, null="the cluster's CPUs / num_cpus_per_worker")] | None,
                 address: str | None, num_cpus_per_worker: Annotated[float, Range(gt=0)]):
        if importlib.util.find_spec("ray") is None:
            raise FedrunError(EXTRA)
        self.workers = workers
        self.address = address
        self.num_cpus_per_worker = num_cpus_per_worker
        self.make_trainer = make_trainer
        self.data = data
        self.client_hooks = client_hooks
        self.actors: dict[int, Any] | None = None  # the live actors by rank, started at the first round
        self.placement: list[str] = []  # the node id of each actor as it started, by rank
        self.started_ray = False  # shut down at close only the Ray this backend started

    def train_cohort(self, weights: torch.Tensor, jobs: Sequence[ClientJob],
                     ctx: RoundContext) -> list[ClientUpdate]:
        if not jobs:
            return []
        import ray

        if self.actors is None:
            self._start(ray)
        assert self.actors is not None  # _start made them or raised
        weights_ref = ray.put(weights.detach().cpu())  # once per round, read by every actor
        chunks = cohort_chunks([self.data.clients[j.client_id].num_examples for j in jobs],
                               len(self.actors) * CHUNKS_PER_WORKER)
        try:
            updates = self._run(ray, weights_ref, jobs, chunks, ctx)
        except BaseException:
            self.close()
            raise
        return [apply_client_hooks(u, self.client_hooks, ctx) for u in updates]

    def _run(self, ray, weights_ref, jobs: Sequence[ClientJob], chunks: list[list[int]],
             ctx: RoundContext) -> list[ClientUpdate]:
        """Updates in job order: each free actor takes the next chunk until none is left; the
        chunk of an actor that died goes back to the others."""
        actors = self.actors
        assert actors is not None  # train_cohort started them
        updates: list[ClientUpdate | None] = [None] * len(jobs)
        waiting = list(reversed(chunks))
        free = sorted(actors, reverse=True)
        pending: dict = {}
        while waiting or pending:
            while free and waiting:
                rank, chunk = free.pop(), waiting.pop()
                pending[actors[rank].train.remote(weights_ref, ctx, [jobs[i] for i in chunk])] = (rank, chunk)
            [ref], _ = ray.wait(list(pending), num_returns=1)
            rank, chunk = pending.pop(ref)
            reply = self._reply(ray, ref, rank, [jobs[i].client_id for i in chunk])
            if reply is None:
                waiting.append(chunk)
                continue
            for i, update in zip(chunk, reply):
                updates[i] = update
            free.append(rank)
        return cast("list[ClientUpdate]", updates)  # the chunks cover every job: no slot is left None

    def _reply(self, ray, ref, rank: int, client_ids: list[int]) -> list[ClientUpdate] | None:
        """The chunk's updates, or None when its actor died (dropped here; the last one raises)."""
        try:
            reply = ray.get(ref)
        except ray.exceptions.RayActorError as e:
            self._lose(rank, client_ids, e)
            return None
        if reply[0] == "error":
            raise FedrunError(f"backend=ray: client {reply[1]} failed in actor {rank}: {reply[2]}")
        return reply[1]

    def _lose(self, rank: int, client_ids: list[int], error: BaseException) -> None:
        import ray

        assert self.actors is not None  # only a running actor can die
        ray.kill(self.actors.pop(rank))  # one merely unreachable would otherwise hold its CPUs
        where = f"actor {rank} on node {self.placement[rank]}"
        if not self.actors:
            raise FedrunError(f"backend=ray: every actor is lost, the last ({where}) while training clients "
                              f"{client_ids}: {one_line(error)}; once the cluster has CPUs again, resume the run "
                              "from its last checkpoint with `fedrun resume RUN_DIR`")
        log.warning("backend=ray: %s was lost while training clients %s (%s); they go to the %d other actors",
                    where, client_ids, one_line(error), len(self.actors))

    def _start(self, ray) -> None:
        if not ray.is_initialized():
            self._init(ray)
        cpus = ray.cluster_resources().get("CPU", 0)
        workers = self.workers or max(1, int(cpus // self.num_cpus_per_worker))
        if workers * self.num_cpus_per_worker > cpus:
            raise FedrunError(f"backend.workers: {workers} actors x {self.num_cpus_per_worker} CPUs "
                              f"(backend.num_cpus_per_worker) need more than the {cpus:g} CPUs of the Ray cluster")
        # Tensors go into the object store as numpy arrays, which actors on one node map
        # read-only instead of copying: data sent that way is held once a node, not once per actor.
        ray.util.register_serializer(torch.Tensor, serializer=tensor_to_store, deserializer=tensor_from_store)
        actor = ray.remote(num_cpus=self.num_cpus_per_worker)(TrainerActor)
        threads = max(1, int(self.num_cpus_per_worker))
        entry = data_cache.entry_of(self.data)
        self.actors = dict(enumerate(actor.remote(self.make_trainer, entry, threads) for _ in range(workers)))
        try:  # each actor says where it runs once it has started: a run on a cluster can be checked
            started = ray.get([a.started.remote() for a in self.actors.values()])
            self.placement = [node for node, _ in started]
            lacking = [rank for rank, (_, has_data) in enumerate(started) if not has_data]
            if lacking:  # put once, only when some actor cannot load the cache entry itself
                data_ref = ray.put(self.data)
                ray.get([self.actors[rank].receive.remote(data_ref) for rank in lacking])
        except ray.exceptions.RayActorError as e:
            raise FedrunError(f"backend=ray: an actor died as it started: {one_line(e)}") from None
        nodes = ", ".join(f"{node} ({n})" for node, n in Counter(self.placement).items())
        log.info("backend=ray: %d actors on nodes %s, of a cluster of %g CPUs; %d loaded the data cache entry, "
                 "%d got the data through the object store", workers, nodes, cpus, workers - len(lacking), len(lacking))

    def _init(self, ray) -> None:
        if self.address is None:
            needed = (self.workers or 1) * self.num_cpus_per_worker
            with loopback_node():
                ray.init(**local_ray_options(num_cpus=max(os.cpu_count() or 1, int(needed + 0.999))))
        else:
            try:
                with loopback_node(on=is_loopback(self.address)):
                    ray.init(address=self.address, logging_level=logging.WARNING, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise FedrunError(f"backend.address: no Ray cluster reachable at {self.address} ({one_line(e)}); "
                                  "start one with `ray start --head`, or use backend.address=null "
                                  "for a local Ray") from None
        self.started_ray = True

    def close(self) -> None:
        if self.actors is None and not self.started_ray:
            return
        import ray

        for actor in (self.actors or {}).values():
            ray.kill(actor)
        self.actors = None
        if ray.is_initialized():
            ray.util.deregister_serializer(torch.Tensor)
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False


def tensor_to_store(t: torch.Tensor):
    """A CPU tensor as a numpy array (Ray stores those out of band, for zero-copy reads);
    torch's own bytes where numpy cannot hold it (bfloat16) or autograd must survive."""
    if t.device.type == "cpu" and not t.requires_grad:
        try:
            return t.numpy()
        except TypeError:
            pass
    buffer = io.BytesIO()
    torch.save(t, buffer)
    return buffer.getvalue()


def tensor_from_store(stored) -> torch.Tensor:
    if isinstance(stored, bytes):
        return torch.load(io.BytesIO(stored), weights_only=False)
    with warnings.catch_warnings():  # the store's arrays are read-only, and nothing writes to them
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(stored)


def local_ray_options(*, num_cpus: int) -> dict:
    """`ray.init` options for a Ray of this machine alone, listening on loopback only (by
    default Ray binds the machine's external address); also sets the environment it reads."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    return dict(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                logging_level=logging.WARNING, log_to_driver=False)


def is_loopback(address: str) -> bool:
    """Whether `backend.address` names a Ray on this machine's loopback (127.0.0.1:6379)."""
    host = address.removeprefix("ray://").rpartition(":")[0].strip("[]")
    return host == "localhost" or host == "::1" or host.startswith("127.")


@contextlib.contextmanager
def loopback_node(*, on: bool = True) -> Iterator[None]:
    """Within: `ray.init` keeps 127.0.0.1 as this node's IP. Ray otherwise replaces it, in a
    cluster address and as the node's own IP, by the machine's external address: a local Ray
    then listens on every interface, and a cluster started on loopback is never reached. Ray
    keeps it only where it deems clusters unsupported, a flag it reads from the environment
    (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER) once, at import: hence the flag set here."""
    from ray._private import ray_constants

    enabled = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = enabled and not on
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = enabled


class TrainerActor:
    """A Ray actor: one trainer, built once, trains every chunk of jobs it is sent."""

    def __init__(self, make_trainer: Callable[[], Any], entry: dict | None, threads: int):
        torch.set_num_threads(threads)
        # The data cache entry, where this machine has it; otherwise the driver sends the data (`receive`).
        self.data: FederatedData | None = None if entry is None else data_cache.reload(entry)
        try:
            self.trainer, self.failure = make_trainer(), None
        except Exception as e:
            self.trainer, self.failure = None, one_line(e)

    def train(self, weights: torch.Tensor, ctx: RoundContext, jobs: Sequence[ClientJob]) -> tuple:
        if self.failure is not None:
            return "error", jobs[0].client_id, f"building the trainer: {self.failure}"
        assert self.data is not None  # the driver sends it before the first chunk where reloading failed
        return train_share(self.trainer, self.data, weights, ctx, jobs)

    def started(self) -> tuple[str, bool]:
        """The node this actor runs on, and whether it has the data."""
        import ray

        return ray.get_runtime_context().get_node_id(), self.data is not None

    def receive(self, data: FederatedData) -> None:
        self.data = data
