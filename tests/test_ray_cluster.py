"""backend=ray on a real multi-node Ray cluster: a head and two worker nodes, each its own raylet
(and the head its own GCS), all on 127.0.0.1 of this machine. fedrun joins it by address as it
would a cluster of machines; the results equal sequential training's, the actors run on both
worker nodes, and losing one node mid-run moves its clients to the other with the same results;
losing both stops in one line, and resume on a new node is exact. Every server listens on
loopback only, fedrun's own local Ray's included."""
from __future__ import annotations

import ipaddress
import os
import re
import time
from pathlib import Path

import pytest
from omegaconf import DictConfig

from fedrun import config, train
from fedrun.core import FedrunError
from tests.conftest import make_play
from tests.test_backends import CASES, assert_case_exercised, assert_same_results, compose, results, run

ray = pytest.importorskip("ray")

LOOPBACK = "127.0.0.1"
CASE = "scaffold+stragglers"  # tensors in jobs and updates, clients of unequal work
ROUNDS, LOST_AFTER = 5, 2  # a worker node is killed after round 2 of 5


# One torch thread, as each actor has (num_cpus_per_worker=1): the same floating-point order.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def cluster():
    """A head without CPUs (the driver's node: actors go to the workers) and two worker nodes of one
    CPU and a resource of their own each; every node torn down, and its processes gone, however the
    test ends."""
    from ray.cluster_utils import Cluster

    cluster = Cluster()  # nodes are added one by one, so that a failed start still tears down the others
    try:
        cluster.add_node(node_ip_address=LOOPBACK, num_cpus=0, include_dashboard=False,
                         dashboard_agent_listen_port=None)  # its default port would clash with another Ray's
        for name in ("left", "right"):
            cluster.add_node(node_ip_address=LOOPBACK, num_cpus=1, resources={f"node_{name}": 1})
        yield cluster
    finally:
        started = descendants()  # by pid: an actor's worker outlives its parent raylet as an orphan
        ray.shutdown()
        cluster.shutdown()
        assert_gone(started)


def on_cluster(cluster, tmp_path: Path, *ray_overrides: str) -> tuple[DictConfig, tuple]:
    """The config of a backend=ray run of CASE on `cluster`, and sequential's results for CASE."""
    play = make_play(tmp_path / "play.txt")
    overrides = [*CASES[CASE], f"rounds={ROUNDS}", "checkpoint_every=1"]
    expected = run(compose(play, tmp_path / "sequential", *overrides))
    return compose(play, tmp_path / "ray", "backend=ray", f"backend.address={cluster.address}", "backend.workers=2",
                   "backend.num_cpus_per_worker=1", *overrides, *ray_overrides), expected


def test_a_loopback_cluster_of_two_worker_nodes_gives_sequential_results_and_survives_losing_one(
        cluster, tmp_path):
    # Without a data cache entry (as on machines that do not have the driver's), the actors get
    # the data through the object store, from the driver's node to each worker node's.
    cfg, expected = on_cluster(cluster, tmp_path, "data.cache=false")
    exp = config.build(cfg)
    head, (lost, kept) = cluster.head_node, sorted(cluster.worker_nodes, key=lambda n: n.node_id)
    listening: list[tuple[int, str]] = []

    def on_round(row: dict) -> None:
        if row["round"] == 1:  # every node and actor is up
            listening.extend(listeners({os.getpid()} | descendants()))
        if row["round"] == LOST_AFTER:
            cluster.remove_node(lost, allow_graceful=False)  # SIGKILL: its raylet and its actor die

    run_dir, summary = train.train(exp, on_round=on_round)
    assert_same_results(results(run_dir, summary), expected)
    assert_case_exercised(CASE, results(run_dir, summary)[1])

    assert sorted(exp.backend.placement) == sorted([lost.node_id, kept.node_id])  # one actor on each
    assert head.node_id not in exp.backend.placement
    log = (run_dir / "train.log").read_text()
    assert "backend=ray: 2 actors on nodes " in log
    assert "0 loaded the data cache entry, 2 got the data through the object store" in log
    assert re.search(rf"backend=ray: actor \d on node {lost.node_id} was lost while training clients \[[\d, ]+\] "
                     r"\(.*\); they go to the 1 other actors", log)
    assert listening and all(is_loopback(address) for _, address in listening), listening


def test_losing_every_worker_node_stops_in_one_line_and_resume_on_a_new_node_is_exact(cluster, tmp_path):
    cfg, expected = on_cluster(cluster, tmp_path)

    def on_round(row: dict) -> None:
        if row["round"] == LOST_AFTER:
            for node in list(cluster.worker_nodes):
                cluster.remove_node(node, allow_graceful=False)

    with pytest.raises(FedrunError, match=r"^backend=ray: every actor is lost, the last \(actor \d on node \w+\) "
                                          r"while training clients \[[\d, ]+\]: [^\n]*; once the cluster has CPUs "
                                          r"again, resume the run from its last checkpoint with `fedrun resume "
                                          r"RUN_DIR`$"):
        train.train(config.build(cfg), on_round=on_round)
    cluster.add_node(node_ip_address=LOOPBACK, num_cpus=2, resources={"node_replacement": 1})
    exp, rundir, checkpoint = train.load_for_resume(cfg.run_dir)
    assert checkpoint is not None and checkpoint["round"] == LOST_AFTER
    assert_same_results(results(*train.resume(exp, rundir, checkpoint)), expected)



def test_fedrun_s_own_local_ray_listens_on_loopback_only(tmp_path):
    """backend.address=null: the Ray that fedrun starts (Ray's default would be every interface)."""
    play = make_play(tmp_path / "play.txt")
    exp = config.build(compose(play, tmp_path / "run", "backend=ray", "backend.workers=1", "rounds=1"))
    listening: list[tuple[int, str]] = []
    try:
        train.train(exp, on_round=lambda row: listening.extend(listeners({os.getpid()} | descendants()))
                    if row["round"] == 1 else None)
    finally:
        started = descendants()
        ray.shutdown()  # the run shut it down already; this is for a run that failed first
        assert_gone(started)
    assert len({pid for pid, _ in listening}) > 2  # the GCS, the raylet, this driver, the actor, ...
    assert all(is_loopback(address) for _, address in listening), listening

# ---- processes and their sockets (Linux /proc) ------------------------------------------------

def descendants(pid: int | None = None) -> set[int]:
    """This process's live descendants: the nodes' GCS, raylets and agents, and the actors."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid or os.getpid()}/task").glob("*"):
        try:
            children = {int(p) for p in (task / "children").read_text().split()}
        except OSError:  # the task ended
            continue
        for child in children - found:
            found |= {child} | descendants(child)
    return found


def assert_gone(pids: set[int], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while (alive := {p for p in pids if is_alive(p)}) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive, [Path(f"/proc/{p}/cmdline").read_bytes() for p in alive if is_alive(p)]


def is_alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def listeners(pids: set[int]) -> list[tuple[int, str]]:
    """(pid, address) of every TCP socket listening in one of `pids`."""
    owner = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:["):
                    owner[link[8:-1]] = pid
        except OSError:  # the process ended, or an fd closed while listed
            continue
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            local, state, inode = line.split()[1], line.split()[3], line.split()[9]
            if state == "0A" and inode in owner:  # 0A: LISTEN
                found.append((owner[inode], f"{address(local.split(':')[0])}:{int(local.split(':')[1], 16)}"))
    return found


def address(hex_ip: str) -> str:
    """/proc/net/tcp{,6}'s hex address (32-bit words in host order, little-endian here)."""
    raw = b"".join(bytes.fromhex(hex_ip[i:i + 8])[::-1] for i in range(0, len(hex_ip), 8))
    return str(ipaddress.ip_address(raw))


def is_loopback(host_port: str) -> bool:
    ip = ipaddress.ip_address(host_port.rpartition(":")[0])
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)
