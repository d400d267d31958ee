"""A RabbitMQ cluster that loses a node mid-song: the song still comes out whole, and once.

A module fixture starts three clustered RabbitMQ nodes with `tools/broker-cluster.sh start`
(the nodes of `make broker-cluster`, STOMP on 61621-61623), or reuses them when they answer,
and stops at the end the nodes it started. Each test runs a real server and real workers
whose BROKER_HOSTS list all three nodes, each process starting from a node of its own, then
SIGKILLs the node that the server (or one worker) is connected to while the song is being
processed. It checks that the process fails over to another node, that the song finishes
with stems equal to the one-process reference (whole-file demucs, SDR >= 60 dB, as
tests/test_faults.py), that every job was accepted exactly once (the job records, and
karaoke_jobs_done equal to the job count), and prints how long the failover took with the
duplicate and redelivered figures the server exposes. While the server's node is down (the
leader of the queues, which the server declared there), it checks that the test's jobs and
results queues are quorum queues with a member on each of the three nodes.

The killed node is started again in the background once the failover is seen, and the next
test waits for three nodes. Skipped, with the reason, where this machine cannot run local
RabbitMQ nodes (no rabbitmq-server, or not root, which the Debian wrappers need).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from src.config import Settings
from tests.helpers import get, get_json, metric, post_json, reference_stems, sdr, served_stems, upload, wait_for

if TYPE_CHECKING:
    from tests.conftest import Cluster

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "broker-cluster.sh"
NODES = (1, 2, 3)
STOMP_PORTS = {n: 61620 + n for n in NODES}  # as tools/broker-cluster.sh
SLOW = "5"  # WORKER_SLOWDOWN: a job lasts a few seconds, so a kill lands mid-job
CONNECTED = re.compile(r"Connected to broker (\S+)")

pytestmark = pytest.mark.chaos


def answers(port: int) -> bool:
    try:
        socket.create_connection(("localhost", port), timeout=1).close()
        return True
    except OSError:
        return False


def node_of(endpoint: str) -> int:
    """The cluster node (1-3) of a "host:port" the Broker logged."""
    port = int(endpoint.rsplit(":", 1)[1])
    return next(n for n, p in STOMP_PORTS.items() if p == port)


def hosts_from(first: int) -> str:
    """BROKER_HOSTS that lists every node, starting with node `first`: each process its own node."""
    order = [*NODES[first - 1:], *NODES[:first - 1]]
    return ",".join(f"localhost:{STOMP_PORTS[n]}" for n in order)


class BrokerNodes:
    """The three local nodes: who answers, their OS processes, rabbitmqctl against a live one."""

    def __init__(self) -> None:
        # the script names nodes after `hostname -s`
        self.short = subprocess.run(["hostname", "-s"], capture_output=True, text=True, check=True).stdout.strip()
        self.restarting: subprocess.Popen | None = None

    def name(self, n: int) -> str:
        return f"rabbit-{n}@{self.short}"

    def up(self) -> set[int]:
        return {n for n in NODES if answers(STOMP_PORTS[n])}

    def start(self) -> str:
        """Start the nodes that are down and wait until the three are clustered (the script)."""
        env = {**os.environ, "BROKER_CLUSTER_LOCAL": "1"}  # a node this test can SIGKILL, not a container
        proc = subprocess.run([str(SCRIPT), "start"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            pytest.fail(f"tools/broker-cluster.sh start failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        return proc.stdout

    def restart_in_background(self) -> None:
        env = {**os.environ, "BROKER_CLUSTER_LOCAL": "1"}
        self.restarting = subprocess.Popen([str(SCRIPT), "start"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL)

    def wait_all(self) -> None:
        """Three nodes again: the background restart done, or started now."""
        if self.restarting is not None:
            self.restarting.wait(300)
            self.restarting = None
        if self.up() != set(NODES):
            self.start()

    def ctl(self, *args: str) -> str:
        """rabbitmqctl on the first live node."""
        live = sorted(self.up())
        assert live, "no cluster node answers"
        proc = subprocess.run(["rabbitmqctl", "-q", "-n", self.name(live[0]), *args], capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, f"rabbitmqctl {args[0]}: {proc.stderr.strip()[:500]}"
        return proc.stdout

    def pid(self, n: int) -> int:
        """The OS process of node n (its Erlang VM)."""
        proc = subprocess.run(["rabbitmqctl", "-q", "-n", self.name(n), "eval", "os:getpid()."],
                              capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            pytest.skip(f"node {self.name(n)} answers on STOMP but not to rabbitmqctl here (a container?): this "
                        f"test must SIGKILL a local node: {proc.stderr.strip()[:200]}")
        return int(proc.stdout.strip().strip('"'))

    def kill(self, n: int, pid: int) -> float:
        """SIGKILL node n (its process `pid`, looked up beforehand so that the kill lands at once); when."""
        killed_at = time.time()
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not answers(STOMP_PORTS[n]), 10, f"node {n}'s STOMP port to close")
        return killed_at

    def queues(self, prefix: str) -> dict[str, tuple[str, list[str]]]:
        """name -> (type, members) of one test's queues."""
        found = {}
        for line in self.ctl("list_queues", "name", "type", "members").splitlines()[1:]:
            name, kind, members = (line.split("\t") + ["", ""])[:3]
            if name.startswith(prefix + "."):
                found[name] = (kind, re.findall(r"[\w.-]+@[\w.-]+", members))
        return found

    def delete_queues(self, prefix: str) -> None:
        for name in self.queues(prefix):
            self.ctl("delete_queue", name)


@pytest.fixture(scope="module")
def broker_nodes() -> Iterator[BrokerNodes]:
    if shutil.which("rabbitmq-server") is None or shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmq-server is not installed: this test runs three local RabbitMQ nodes "
                    "(make broker-cluster installs it from Debian's packages)")
    if os.geteuid() != 0:
        pytest.skip("not root: Debian's rabbitmq-server wrapper runs local nodes (as the rabbitmq user) only for root")
    nodes = BrokerNodes()
    running = nodes.up()
    nodes.start()
    yield nodes
    nodes.wait_all()
    started = sorted(set(NODES) - running)
    if started:  # CI must not keep three nodes running; nodes that were running before stay
        subprocess.run([str(SCRIPT), "stop", *map(str, started)], cwd=ROOT, capture_output=True, timeout=180)


@pytest.fixture
def settings(settings: Settings, broker_nodes: BrokerNodes) -> Iterator[Settings]:
    """The test's settings on the cluster; its queues there are deleted afterwards."""
    broker_nodes.wait_all()
    yield settings.with_overrides(broker_hosts=hosts_from(1))
    broker_nodes.wait_all()  # a queue whose node is down cannot be deleted
    broker_nodes.delete_queues(settings.queue_prefix)


# -- the song ---------------------------------------------------------------------------------------


def connected_nodes(log: str) -> list[int]:
    """The nodes a process connected to, in order (its "Connected to broker host:port" lines)."""
    return [node_of(m) for m in CONNECTED.findall(log)]


def failover(cluster: Cluster, name: str, lost: int, since: float) -> float:
    """Seconds from `since` until process `name` logs a connection to a node other than `lost`."""
    seen = wait_for(lambda: [n for n in connected_nodes(cluster.log(name)) if n != lost] and time.time(),
                    60, f"{name} to connect to another node", interval=0.05)
    return seen - since


def start_song(cluster: Cluster, make_song) -> tuple[Path, int]:
    """An 8-second song (5 jobs) on its way through the server; (song, music id)."""
    song = make_song(8.0, "wav")
    music = upload(cluster.base, song)
    status, _ = post_json(f"{cluster.base}/music/{music['music_id']}", [t["track_id"] for t in music["tracks"]])
    assert status == 200
    return song, music["music_id"]


def after(log: str, first: str, then: str) -> bool:
    """Whether `log` has a line with `then` after its first line with `first`."""
    start = log.find(first)
    return start >= 0 and then in log[start:]


def assert_replicated(nodes: BrokerNodes, prefix: str) -> None:
    """The test's jobs and results queues are quorum queues with a member on every node."""
    queues = nodes.queues(prefix)
    for name in (f"{prefix}.jobs.separate", f"{prefix}.results"):
        kind, members = queues[name]
        assert kind == "quorum" and sorted(members) == sorted(nodes.name(n) for n in NODES), (name, queues[name])


def assert_whole_once(base: str, music_id: int, song: Path) -> dict[str, float]:
    """Done, equal to the one-process reference, each job accepted once; the server's figures."""
    def done():
        status = get_json(f"{base}/music/{music_id}")
        assert status["state"] != "failed", status["error"]
        return status if status["state"] == "done" else None

    status = wait_for(done, 180, f"music {music_id} to be done")
    reference = reference_stems(song)
    stems = served_stems(base, music_id)
    assert sorted(stems) == sorted(reference)
    for name, stem in stems.items():
        assert stem.shape == reference[name].shape, name
        assert sdr(reference[name], stem) >= 60, name
    jobs = [get_json(f"{base}/job/{j}") for j in get_json(f"{base}/job")]
    assert len(jobs) == status["jobs_total"] and len({j["job_id"] for j in jobs}) == len(jobs)
    assert all(j["music_id"] == music_id for j in jobs)
    figures = {name: metric(base, f"karaoke_{name}")
               for name in ("jobs_done", "duplicate_results", "jobs_redelivered", "jobs_republished")}
    assert figures["jobs_done"] == status["jobs_total"], f"a result was applied twice: {figures}"
    return figures


def report(capsys: pytest.CaptureFixture, fault: str, seconds: float, figures: dict[str, float]) -> None:
    with capsys.disabled():
        print(f"\n  FAULT {fault}: failed over in {seconds:.2f}s; song whole, {figures['jobs_done']:.0f} jobs accepted "
              f"once each; duplicates ignored {figures['duplicate_results']:.0f}, redelivered "
              f"{figures['jobs_redelivered']:.0f}, republished {figures['jobs_republished']:.0f}")


def test_killing_the_servers_broker_node_mid_song(cluster: Cluster, broker_nodes: BrokerNodes, make_song,
                                                   capsys: pytest.CaptureFixture) -> None:
    cluster.start_server()
    server_node = connected_nodes(cluster.log("server"))[-1]
    # the workers start from the two other nodes, so this kill reaches the server alone
    others = [n for n in NODES if n != server_node]
    for first in others:
        cluster.start_worker(WORKER_SLOWDOWN=SLOW, BROKER_HOSTS=hosts_from(first))
    cluster.wait_workers(2)
    pid = broker_nodes.pid(server_node)
    song, music_id = start_song(cluster, make_song)
    status = wait_for(lambda: (s := get_json(f"{cluster.base}/music/{music_id}"))["jobs_done"] >= 1 and s, 120,
                      "a first job")

    killed_at = broker_nodes.kill(server_node, pid)
    assert status["jobs_done"] < status["jobs_total"], "the song was done before the kill"
    seconds = failover(cluster, "server", server_node, killed_at)
    # the queues' leaders were on the killed node (the server declared them there): the jobs and
    # results they held live on in the replicas of the other two, which elect new leaders
    assert_replicated(broker_nodes, cluster.settings.queue_prefix)
    broker_nodes.restart_in_background()
    wait_for(lambda: get(f"{cluster.base}/health")[0] == 200, 30, "the server's /health")
    figures = assert_whole_once(cluster.base, music_id, song)
    new_node = connected_nodes(cluster.log("server"))[1]
    assert after(cluster.log("server"), f"Connected to broker localhost:{STOMP_PORTS[new_node]}", "JobDoneMsg"), \
        "no result reached the server through its new node"
    for name in ("worker0", "worker1"):
        assert connected_nodes(cluster.log(name))[0] != server_node, f"{name} was on the killed node too"
    report(capsys, f"SIGKILL of the server's broker node (rabbit-{server_node})", seconds, figures)


def test_killing_a_workers_broker_node_mid_song(cluster: Cluster, broker_nodes: BrokerNodes, make_song,
                                                 capsys: pytest.CaptureFixture) -> None:
    cluster.start_server()
    server_node = connected_nodes(cluster.log("server"))[-1]
    victim_node, other_node = [n for n in NODES if n != server_node]
    victim = cluster.start_worker(WORKER_SLOWDOWN=SLOW, BROKER_HOSTS=hosts_from(victim_node))
    cluster.start_worker(WORKER_SLOWDOWN=SLOW, BROKER_HOSTS=hosts_from(other_node))
    cluster.wait_workers(2)
    assert connected_nodes(cluster.log("worker0")) == [victim_node]
    pid = broker_nodes.pid(victim_node)
    song, music_id = start_song(cluster, make_song)
    wait_for(lambda: any(w["pid"] == victim.pid and w["state"] == "busy" for w in get_json(f"{cluster.base}/workers")),
             60, "the worker to be busy")

    killed_at = broker_nodes.kill(victim_node, pid)
    seconds = failover(cluster, "worker0", victim_node, killed_at)
    broker_nodes.restart_in_background()
    figures = assert_whole_once(cluster.base, music_id, song)
    assert victim.poll() is None, "the worker died with its node"
    # the job it was running when its node died: finished, and its result sent through the new node
    new_node = connected_nodes(cluster.log("worker0"))[1]
    assert after(cluster.log("worker0"), f"Connected to broker localhost:{STOMP_PORTS[new_node]}", "finished Job")
    report(capsys, f"SIGKILL of a worker's broker node (rabbit-{victim_node}) mid-job", seconds, figures)
