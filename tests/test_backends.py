"""backend=process and backend=ray give backend=sequential's results; their workers end with the run."""
from __future__ import annotations

import os
import re
import signal
import threading
import time
from functools import partial
from pathlib import Path

import pandas as pd
import pytest
import torch

from fedrun import config, train
from fedrun.backends import process
from fedrun.backends.process import ProcessBackend, batched_chunks, cohort_chunks
from fedrun.backends.sequential import SequentialBackend
from fedrun.core import ClientJob, ClientUpdate, FedrunError, RoundContext
from fedrun.data.examples import ClientData, FederatedData, Labelled
from fedrun.rundir import load_checkpoint
from tests.conftest import TINY, make_play

# Each case exercises what a backend must carry across: plain FedAvg; SCAFFOLD's control
# variates (tensors in the jobs and in the updates); stateful client hooks of the main process
# (an attack, clipping, top-k error feedback); clients with different amounts of local work.
CASES = {
    "fedavg": [],
    "scaffold": ["strategy=scaffold", "client.optimizer=sgd", "client.lr=0.1"],
    "hooks": ["attack=sign_flip", "attack.fraction=0.5", "privacy=central_dp", "sampler.kind=poisson",
              "compression=topk", "compression.fraction=0.1", "rounds=3"],
    "stragglers": ["client.local_steps_min=1", "client.local_steps_max=8", "sampler.clients_per_round=5"],
}
# Ray's actors take seconds to start (each imports torch): two runs cover the four cases.
STRAGGLERS = CASES["stragglers"][:2]
CASES["hooks+stragglers"] = CASES["hooks"] + STRAGGLERS
CASES["scaffold+stragglers"] = CASES["scaffold"] + STRAGGLERS
RAY_CASES = ["hooks+stragglers", "scaffold+stragglers"]
PROCESS_CASES = ["fedavg", "scaffold", "hooks", "stragglers"]


# One torch thread, as in each worker (conftest.one_thread): the same floating-point order.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def play_file(tmp_path_factory) -> Path:
    return make_play(tmp_path_factory.mktemp("data") / "play.txt")


@pytest.fixture(scope="module")
def sequential(play_file, tmp_path_factory):
    """Each case's sequential run, computed once for all backends: (metrics, clients, final weights)."""
    cache: dict[str, tuple] = {}

    def result(case: str) -> tuple:
        if case not in cache:
            cache[case] = run(compose(play_file, tmp_path_factory.mktemp(case), *CASES[case]))
        return cache[case]

    return result


def compose(play: Path, run_dir: Path, *overrides: str):
    return config.compose([f"run_dir={run_dir}", "data=shakespeare", f"data.path={play}", "device=cpu",
                           *TINY, *overrides])


def run(cfg, *, make_trainer=None) -> tuple[pd.DataFrame, pd.DataFrame, torch.Tensor]:
    exp = config.build(cfg)
    if make_trainer is not None:
        exp.backend.make_trainer = partial(make_trainer, exp.backend.make_trainer)
    return results(*train.train(exp))


def results(run_dir: Path, summary: dict) -> tuple[pd.DataFrame, pd.DataFrame, torch.Tensor]:
    """A finished run's metrics and clients tables (less their timings) and final weights."""
    weights = load_checkpoint(run_dir / "checkpoints" / f"round_{summary['rounds']:04d}.pt")["weights"]
    return (pd.read_csv(run_dir / "metrics.csv").drop(columns="seconds"),
            pd.read_csv(run_dir / "clients.csv").drop(columns="seconds"), weights)


def assert_case_exercised(case: str, clients: pd.DataFrame) -> None:
    """The run did what its case is about (so that equality is not vacuous)."""
    if "hooks" in case:
        assert (clients["status"] == "byzantine").any()
    if "stragglers" in case:
        assert clients["local_steps"].nunique() > 1


def assert_same_results(got: tuple, expected: tuple) -> None:
    # Equal to float tolerance: bit-identical when workers use as many threads as this process.
    for table, reference in zip(got[:2], expected[:2]):
        pd.testing.assert_frame_equal(table, reference, check_exact=False, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got[2], expected[2], rtol=1e-5, atol=1e-6)


def children() -> set[int]:
    """Live child processes of this process (Linux /proc)."""
    pids: set[int] = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        pids.update(int(p) for p in (task / "children").read_text().split())
    return {p for p in pids if Path(f"/proc/{p}").exists() and "Z" not in _state(p)}


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return "Z"


# ---- trainers that misbehave on one client (module level: spawned workers import them) --------

BAD_CLIENT = 2


class RaisingTrainer:
    def __init__(self, make_trainer):
        self.inner = make_trainer()

    def train(self, job, data, weights, ctx):
        if job.client_id == BAD_CLIENT:
            raise RuntimeError("out of cheese\nsecond line")
        return self.inner.train(job, data, weights, ctx)


class DyingTrainer(RaisingTrainer):
    def train(self, job, data, weights, ctx):
        if job.client_id == BAD_CLIENT:
            os._exit(3)  # a hard crash: no exception, no reply
        return self.inner.train(job, data, weights, ctx)


STUCK_FLAG = Path("/nonexistent")  # set by the test; forked workers inherit it


class StuckTrainer(RaisingTrainer):
    def train(self, job, data, weights, ctx):
        STUCK_FLAG.touch()
        time.sleep(60)


# ---- backend=process ----------------------------------------------------------------------------

@pytest.mark.parametrize("case", PROCESS_CASES)
def test_process_gives_the_results_of_sequential(case, play_file, tmp_path, sequential):
    before = children()
    got = run(compose(play_file, tmp_path, "backend=process", "backend.workers=2", *CASES[case]))
    assert_same_results(got, sequential(case))
    assert_case_exercised(case, got[1])
    assert children() <= before  # the run closed its pool


@pytest.mark.slow  # each spawned worker imports torch afresh: ~30 s on a busy two-core machine
def test_process_with_spawn_ships_the_data_and_gives_the_same_results(play_file, tmp_path, sequential,
                                                                      monkeypatch):
    monkeypatch.setattr(process, "start_method", lambda: "spawn")  # what platforms without fork use
    got = run(compose(play_file, tmp_path, "backend=process", "backend.workers=2"))
    assert_same_results(got, sequential("fedavg"))


class EchoTrainer:
    """Not a LocalTrainer: its update echoes the weights it saw (any shape) and the job's tensor."""

    def train(self, job, data, weights, ctx):
        delta = weights.flatten().float() * job.client_id + job.payload["control"].sum()
        return ClientUpdate(client_id=job.client_id, delta=delta, num_examples=data.num_examples,
                            train_loss=float(weights.sum()), seconds=0.0, bytes_up=0, extras={"seen": weights.clone()})


class OrderHook:
    """A stateful hook: its output depends on every update it saw before, in order."""

    def __init__(self):
        self.seen: list[int] = []

    def on_client(self, update, ctx):
        self.seen.append(update.client_id)
        update.delta = update.delta + len(self.seen)
        return update


def test_process_carries_any_trainer_tensor_jobs_and_weights_of_changing_shape():
    clients = [ClientData(str(i), Labelled(torch.randn(i + 1, 2), torch.zeros(i + 1, dtype=torch.long)),
                          Labelled(torch.randn(1, 2), torch.zeros(1, dtype=torch.long))) for i in range(9)]
    data = FederatedData(clients, fingerprint={})
    backends = [cls(make_trainer=EchoTrainer, data=data, client_hooks=[OrderHook()], **kw)
                for cls, kw in ((SequentialBackend, {}), (ProcessBackend, {"workers": 2, "vectorized": False}))]
    try:
        for round_idx, weights in enumerate([torch.arange(6.0), torch.ones(2, 3) * 2, torch.arange(4)], 1):
            jobs = [ClientJob(c, payload={"control": torch.full((3,), float(c))}) for c in (8, 1, 5, 0, 3, 7, 2)]
            ctx = RoundContext(round_idx=round_idx, seed=0, num_clients=9, cohort=[j.client_id for j in jobs])
            expected, got = (b.train_cohort(weights, jobs, ctx) for b in backends)
            assert [u.client_id for u in got] == [j.client_id for j in jobs]
            for u, e in zip(got, expected):
                torch.testing.assert_close(u.delta, e.delta, rtol=0, atol=0)
                torch.testing.assert_close(u.extras["seen"], weights, rtol=0, atol=0)
                assert (u.num_examples, u.train_loss) == (e.num_examples, e.train_loss)
    finally:
        for b in backends:
            b.close()


def test_process_pool_starts_at_the_first_round_not_at_build(play_file, tmp_path):
    before = children()
    exp = config.build(compose(play_file, tmp_path, "backend=process", "backend.workers=2"))
    assert exp.backend.pool is None and children() == before
    exp.backend.close()  # closing a pool that never started is fine


@pytest.mark.parametrize("trainer, message", [
    (RaisingTrainer, f"backend=process: client {BAD_CLIENT} failed in worker [01]: RuntimeError: out of cheese$"),
    (DyingTrainer, f"backend=process: worker [01] died \\(exit code 3\\) while training client {BAD_CLIENT}$"),
])
def test_a_failing_worker_is_one_line_naming_the_client_and_leaves_no_process(trainer, message, play_file,
                                                                              tmp_path):
    before = children()
    cfg = compose(play_file, tmp_path, "backend=process", "backend.workers=2", "sampler.clients_per_round=6")
    with pytest.raises(FedrunError, match=message):
        run(cfg, make_trainer=trainer)
    assert children() <= before


def test_a_failing_batched_share_is_one_line_naming_its_clients(play_file, tmp_path, monkeypatch):
    def fail(self, plans, weights):  # not an error that means "vmap cannot batch this model"
        raise MemoryError("out of cheese")

    monkeypatch.setattr(process.VectorizedBackend, "train_group", fail)  # forked workers inherit it
    before = children()
    cfg = compose(play_file, tmp_path, "backend=process", "backend.workers=2", "backend.vectorized=true",
                  "sampler.clients_per_round=6")
    with pytest.raises(FedrunError, match=r"backend=process: client \d+ failed in worker [01]: MemoryError: "
                                          r"out of cheese \(trained batched with \d+ other clients\)$"):
        run(cfg)
    assert children() <= before


def test_a_batched_worker_that_falls_back_names_the_failing_client(play_file, tmp_path):
    # RaisingTrainer is not a plain LocalTrainer: the worker trains its share one by one.
    cfg = compose(play_file, tmp_path, "backend=process", "backend.workers=2", "backend.vectorized=true",
                  "sampler.clients_per_round=6")
    with pytest.raises(FedrunError, match=f"client {BAD_CLIENT} failed in worker [01]: RuntimeError: out of cheese$"):
        run(cfg, make_trainer=RaisingTrainer)


def test_ctrl_c_mid_round_stops_the_workers(play_file, tmp_path, monkeypatch):
    before = children()
    monkeypatch.setattr(__import__(__name__, fromlist=["x"]), "STUCK_FLAG", tmp_path / "training")
    done = threading.Event()

    def interrupt_once_training() -> None:  # Ctrl-C while the workers are busy with a round
        while not done.is_set() and not (tmp_path / "training").exists():
            time.sleep(0.05)
        if not done.is_set():
            os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=interrupt_once_training)
    thread.start()
    cfg = compose(play_file, tmp_path / "run", "backend=process", "backend.workers=2")
    try:
        with pytest.raises(KeyboardInterrupt):
            run(cfg, make_trainer=StuckTrainer)
    finally:
        done.set()
        thread.join()
    assert children() <= before


@pytest.mark.parametrize("overrides, message", [
    (["backend=process", "backend.workers=0"],
     "backend.workers: 0 is not allowed; allowed: null (one per core) or an integer >= 1"),
    (["backend=ray", "backend.workers=0"], "backend.workers: 0 is not allowed; allowed: null (the cluster's CPUs"),
    (["backend=ray", "backend.num_cpus_per_worker=0"],
     "backend.num_cpus_per_worker: 0.0 is not allowed; allowed: a number > 0"),
    (["backend=vectorized", "backend.max_clients=0"],
     "backend.max_clients: 0 is not allowed; allowed: null (the whole cohort)"),
])
def test_bad_backend_settings_are_one_line(overrides, message):
    """Refused by the backend's signature, whose ranges are checked when the config is composed."""
    from fedrun.components import check_values, component

    cfg = config.compose(overrides, check_ranges=False)
    with pytest.raises(FedrunError, match="^" + re.escape(message)):
        check_values(cfg.backend, component(cfg.backend), "backend", "backend")


def test_null_workers_means_one_per_core(play_file, tmp_path):
    exp = config.build(compose(play_file, tmp_path, "backend=process"))
    assert exp.backend.workers == os.cpu_count()


def test_chunks_cover_each_job_once_costliest_first_with_similar_costs():
    costs = [5, 1, 9, 3, 3, 7, 2, 8, 1, 1]
    chunks = cohort_chunks(costs, 4)
    assert sorted(i for c in chunks for i in c) == list(range(len(costs)))
    order = [costs[i] for c in chunks for i in c]
    assert order == sorted(costs, reverse=True)
    assert len(chunks) == 4 and max(sum(costs[i] for i in c) for c in chunks) <= 2 * sum(costs) / 4
    assert cohort_chunks([4, 4], 8) == [[0], [1]]  # never more chunks than jobs


def test_batched_groups_balance_their_longest_client_plus_a_little_for_each_other():
    # The largest client alone (it sets a group's time), the rest together: 100 against
    # 60 + 0.2 * 90 = 78, where dealing in turn would give 100 + 0.2 * 70 = 114 and 75.
    costs = [100, 60, 30, 20, 20, 10, 10]
    assert batched_chunks(costs, 2) == [[0], [1, 2, 3, 4, 5, 6]]
    chunks = batched_chunks([5, 5, 5, 5], 2)  # equal clients: equal groups
    assert sorted(len(c) for c in chunks) == [2, 2]
    assert batched_chunks([4], 3) == [[0]]  # no empty groups


def test_process_workers_can_train_their_shares_batched(tmp_path):
    """backend.vectorized=true: each worker trains its share as one batched group, with
    sequential training's updates (to float tolerance, as backend=vectorized)."""
    def build(*overrides):
        return config.build(config.compose([
            f"run_dir={tmp_path / 'run'}", "device=cpu", "data=synthetic", "data.num_clients=12", "model=mlp",
            "client.optimizer=sgd", "client.lr=0.1", "client.momentum=0.5", "client.local_steps=null",
            "client.local_epochs=1", "client.batch_size=8", *overrides]))

    sequential, batched = build("backend=sequential").backend, build("backend=process", "backend.workers=2",
                                                                      "backend.vectorized=true").backend
    torch.manual_seed(0)
    weights = sequential.trainer.flat.detach().clone()
    jobs = [ClientJob(c) for c in (3, 0, 7, 11, 5, 8, 1, 9)]
    ctx = RoundContext(round_idx=1, seed=0, num_clients=12, cohort=[j.client_id for j in jobs])
    try:
        expected, got = sequential.train_cohort(weights, jobs, ctx), batched.train_cohort(weights, jobs, ctx)
    finally:
        batched.close()
    assert [u.client_id for u in got] == [j.client_id for j in jobs]
    for u, e in zip(got, expected):
        assert (u.num_steps, u.num_examples) == (e.num_steps, e.num_examples)
        torch.testing.assert_close(u.delta, e.delta, rtol=1e-5, atol=1e-6)
        assert u.train_loss == pytest.approx(e.train_loss, rel=1e-5)
    # A batched group's clients each report the group's time over its size: one figure per worker.
    assert len({u.seconds for u in got}) == 2


# ---- backend=ray --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def local_ray():
    """One small local Ray for the module (loopback only, 2 CPUs, a capped object store)."""
    import ray

    from fedrun.backends.ray import local_ray_options, loopback_node

    with loopback_node():
        ray.init(**local_ray_options(num_cpus=2) | {"object_store_memory": 200 * 2**20})
    yield ray
    ray.shutdown()


@pytest.mark.parametrize(("case", "cached"), list(zip(RAY_CASES, [True, False])))
def test_ray_gives_the_results_of_sequential(case, cached, local_ray, play_file, tmp_path, sequential):
    """Actors load the data from the run's cache entry, or (data.cache=false) get it through
    the object store; either way the results are sequential's."""
    got = run(compose(play_file, tmp_path, "backend=ray", "backend.workers=2", f"data.cache={cached}",
                      *CASES[case]))
    assert_same_results(got, sequential(case))
    assert_case_exercised(case, got[1])
    loaded = 2 if cached else 0
    assert (f"{loaded} loaded the data cache entry, {2 - loaded} got the data through the object store"
            in (tmp_path / "train.log").read_text())
    assert local_ray.is_initialized()  # the run left running the Ray it did not start
    assert_actors_released(local_ray)


def assert_actors_released(ray, seconds: float = 30) -> None:
    """The run's actors were killed: the cluster's CPUs come free (Ray frees them asynchronously)."""
    deadline = time.monotonic() + seconds
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray.available_resources().get("CPU", 0) == 2


def test_ray_failing_client_is_one_line_naming_it(local_ray, play_file, tmp_path):
    cfg = compose(play_file, tmp_path, "backend=ray", "backend.workers=1", "sampler.clients_per_round=6")
    with pytest.raises(FedrunError, match=f"^backend=ray: client {BAD_CLIENT} failed in actor 0: "
                                          "RuntimeError: out of cheese$"):
        run(cfg, make_trainer=RaisingTrainer)
    assert_actors_released(local_ray)


def test_tensors_reach_the_object_store_as_numpy_arrays_read_in_place():
    """What backend=ray registers for torch.Tensor: numpy arrays (which Ray maps read-only in
    each actor instead of copying) where numpy can hold the tensor, torch's bytes otherwise."""
    import numpy as np

    from fedrun.backends.ray import tensor_from_store, tensor_to_store

    t = torch.arange(12, dtype=torch.float32).view(3, 4)
    stored = tensor_to_store(t)
    assert isinstance(stored, np.ndarray) and np.shares_memory(stored, t.numpy())
    stored.flags.writeable = False  # as the object store hands it to an actor
    back = tensor_from_store(stored)
    assert torch.equal(back, t) and np.shares_memory(back.numpy(), stored)  # no copy on arrival
    for special in (torch.ones(3, dtype=torch.bfloat16), torch.ones(3, requires_grad=True)):
        stored = tensor_to_store(special)
        assert isinstance(stored, bytes)
        back = tensor_from_store(stored)
        assert back.dtype == special.dtype and back.requires_grad == special.requires_grad
        assert torch.equal(back.detach(), special.detach())


def test_ray_without_the_extra_is_one_line(play_file, tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else find_spec(name, *a))
    with pytest.raises(FedrunError, match=r"^backend=ray needs the ray extra: pip install -e \.\[ray\]$"):
        config.build(compose(play_file, tmp_path, "backend=ray"))
