"""Workers on other hosts: real workers in network namespaces of their own run a song and a video.

Two "other hosts" are made on this machine (tests/netns.py): each a Linux network
namespace with its own address on a veth link to this machine, and, for the processes
started in it, a mount namespace where the server's STORAGE_DIR, the repository's storage/
and the test's own files are empty, and a hostname of its own. This machine plays the server's
host at one address (its end of the first link; the second host reaches it through its own
link), and each host's firewall lets it open connections to exactly two ports there: the
broker's, for control, and the data endpoint's, for the bytes (jobs carry references to their
inputs and results, not the media: the claim check of src/data). The server's data endpoint
listens on every interface (DATA_HOST 0.0.0.0) and its API on loopback only, with DATA_URL
naming that address. One worker runs on each host, given nothing but the broker's address, a worker
login of its own (provisioned as `make broker` does, `least_privilege` in conftest.py) and the
deployment's names (QUEUE_PREFIX, MODEL, the heart-beat interval): not the data URL, which
arrives in each job's references. One takes the song (`separate`), the other the video
(`transcode`).

What it proves: a process launched that way sees none of the server's files and reaches the
broker and the data endpoint, but not the server's HTTP API nor any other port of this
machine (a listener the test opens on every interface); the song comes out equal to the
fault-free whole-file result and the video with every input frame, decoding, with each
result applied once; every attempt of both was done by a namespaced worker; the server's
`GET /workers` shows them with their hostnames and their broker connections from their
namespace addresses, and RabbitMQ itself sees the worker login's connections come from
those addresses. Where the machine cannot make namespaces (not root, no CAP_NET_ADMIN, no
`ip`, a refused `unshare`), the test is skipped with the failing command's error text.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from bench import harness
from src.config import Settings, is_loopback
from tests import netns, video
from tests.conftest import ROOT, Cluster
from tests.helpers import get_json, metric, post_json, reference_stems, sdr, served_stems, upload, wait_for
from tests.netns import Host
from tests.test_faults import wait_state
from tests.test_transcode import finished, transcode
from tests.test_transcode import upload as upload_media

# Lossless, so that "every input frame" can be checked frame by frame against the source.
LOSSLESS = {"codec": "h264", "crf": 0, "preset": "ultrafast"}


@pytest.fixture
def other_hosts() -> Iterator[list[Host]]:
    """Two hosts (network namespaces); the test is skipped, with the reason, where none can be made."""
    stack = ExitStack()
    try:
        made = stack.enter_context(netns.hosts(2))
    except netns.Unavailable as exc:
        pytest.skip(f"this machine cannot make network namespaces for workers on other hosts: {exc}")
    with stack:  # kills every process still inside, then deletes the links and namespaces
        yield made


@pytest.fixture
def server_address(least_privilege: Settings, other_hosts: list[Host]) -> str:
    """The address at which the other hosts reach this machine (the server's host): its end of the
    first link, routed to from the others, each host's firewall letting through only the broker's
    port and the data endpoint's (DATA_PORT) there.

    RabbitMQ's STOMP listener listens on every interface by default; one bound to loopback
    only cannot serve workers on other hosts, and the test says so rather than work around it."""
    settings, address = least_privilege, other_hosts[0].host_address
    if not (is_loopback(settings.broker_host) and netns.accepts(address, settings.broker_port)):
        pytest.skip(f"the broker's STOMP port {settings.broker_port} does not answer on the link's address "
                    "(a listener bound to loopback only): workers on other hosts could not reach it")
    try:
        for host in other_hosts:
            host.reach_only(address, [settings.broker_port, settings.data_port])
    except netns.Unavailable as exc:
        pytest.skip(f"this machine cannot put a firewall in a network namespace: {exc}")
    return address


def worker_env(settings: Settings, broker: tuple[str, int], kinds: str) -> dict[str, str]:
    """All a worker on another host is told: where the broker is, its login, the deployment's names
    (not the data endpoint's address: each job's references name it).

    Not this process's environment: no server login, no server storage, no config file
    (CONFIG_FILE and the logins file are looked for in its own empty working folder)."""
    return {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "HOME": netns.WORKDIR,
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(ROOT),  # the software installed on that host
        "PYTHONUNBUFFERED": "1",
        "BROKER_HOST": broker[0],
        "BROKER_PORT": str(broker[1]),
        "BROKER_WORKER_USER": settings.broker_worker_user,
        "BROKER_WORKER_PASSWORD": settings.broker_worker_password,
        "QUEUE_PREFIX": settings.queue_prefix,
        "MODEL": settings.model,
        # presence is sent every heart-beat interval and the server drops a worker after two of its own
        "BROKER_HEARTBEAT_MS": str(settings.broker_heartbeat_ms),
        "WORKER_THREADS": "1",
        "WORKER_KINDS": kinds,
        "STORAGE_DIR": f"{netns.WORKDIR}/storage",
    }


# What a process on another host sees: run there with the same launcher as the workers.
PROBE = """
import json, os, socket, sys
ask = json.loads(sys.argv[1])
def answers(address, port):
    try:
        socket.create_connection((address, port), timeout=3).close()
        return True
    except OSError:
        return False
print(json.dumps({
    "seen": [p for p in ask["files"] if os.path.exists(p)],
    "listed": {d: sorted(os.listdir(d)) if os.path.isdir(d) else None for d in ask["folders"]},
    "server": answers(*ask["server"]),
    "broker": answers(*ask["broker"]),
    "data": answers(*ask["data"]),
    "other": answers(*ask["other"]),
    "hostname": socket.gethostname(),
}))
"""


def probe(host: Host, hidden: list[Path], ask: dict) -> dict:
    done = subprocess.run(host.command([sys.executable, "-c", PROBE, json.dumps(ask)], hide=hidden),
                          capture_output=True, text=True, timeout=60, env={"PATH": os.environ.get("PATH", "")})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def start_worker(cluster: Cluster, host: Host, hidden: list[Path], env: dict[str, str]) -> subprocess.Popen:
    log = (cluster.log_dir / f"worker-{host.netns}.log").open("ab")
    worker = subprocess.Popen(host.command([sys.executable, "-m", "src.audio_worker"], hide=hidden), env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    cluster.workers.append(worker)  # killed by cluster.stop(); anything left inside by the hosts' teardown
    return worker


def panel_entry(cluster: Cluster, worker: subprocess.Popen, host: Host) -> dict:
    def listed():
        assert worker.poll() is None, f"the worker on {host.hostname} exited: {cluster.log(f'worker-{host.netns}')}"
        return next((w for w in get_json(f"{cluster.base}/workers") if w["pid"] == worker.pid), None)

    return wait_for(listed, 120, f"the worker on {host.hostname} on the panel", interval=0.5)


def broker_peers(user: str) -> set[str]:
    """host:port of every STOMP connection of the login, as RabbitMQ sees them."""
    out = subprocess.run(["rabbitmqctl", "-q", "list_stomp_connections", "auth_login", "peer_host", "peer_port"],
                         capture_output=True, text=True, timeout=60).stdout
    return {f"{parts[1]}:{parts[2]}" for parts in (line.split("\t") for line in out.splitlines()[1:])
            if len(parts) == 3 and parts[0] == user}


def test_workers_in_network_namespaces_of_their_own_run_a_song_and_a_video(other_hosts, least_privilege,
                                                                           server_address, tmp_path, make_song):
    # The data endpoint on every interface, the API on loopback; references name this machine's link address.
    settings = least_privilege.with_overrides(
        data_host="0.0.0.0", data_url=f"http://{server_address}:{least_privilege.data_port}")
    broker = (server_address, settings.broker_port)
    cluster = Cluster(settings, tmp_path)
    cluster.base = f"http://127.0.0.1:{settings.server_port}"
    singer, editor = other_hosts  # the song's host and the video's
    # The server's storage, this test's files and the repository's storage/ are hidden on the other hosts.
    hidden = [settings.storage_dir, tmp_path, ROOT / "storage"]
    # A port of this machine open on every interface that the firewall does not let through.
    elsewhere = socket.create_server(("0.0.0.0", harness.free_port()))
    try:
        cluster.start_server()
        # Started first: loading torch takes the longest; meanwhile the media are made and stored.
        workers = {singer.netns: start_worker(cluster, singer, hidden, worker_env(settings, broker, "separate")),
                   editor.netns: start_worker(cluster, editor, hidden, worker_env(settings, broker, "transcode"))}
        song = make_song(6.0, "wav")
        clip = video.make_clip(tmp_path / "clip.mp4", 4.2)  # 105 frames: two 3-second jobs, the last partial
        music = upload(cluster.base, song)
        media = upload_media(cluster.base, clip)

        # 1. On another host, nothing of the server's is there; the broker and the data endpoint
        #    answer, the server's API and any other port do not.
        stored = [p for p in settings.storage_dir.rglob("*") if p.is_file()]
        assert stored, "the server stored the uploads"
        assert netns.accepts("127.0.0.1", settings.server_port) and netns.accepts(server_address, settings.data_port)
        for host in other_hosts:
            seen = probe(host, hidden, {"files": [str(p) for p in stored],
                                        "folders": [str(settings.storage_dir), str(ROOT / "storage")],
                                        "server": [server_address, settings.server_port],
                                        "broker": list(broker), "data": [server_address, settings.data_port],
                                        "other": [server_address, elsewhere.getsockname()[1]]})
            assert seen["seen"] == [], f"{host.hostname} sees the server's files"
            assert all(not names for names in seen["listed"].values()), seen["listed"]
            assert not seen["server"], f"{host.hostname} reaches the server's HTTP API"
            assert not seen["other"], f"{host.hostname} reaches a port of this machine other than the two it needs"
            assert seen["broker"], f"{host.hostname} cannot reach the broker at {broker}"
            assert seen["data"], f"{host.hostname} cannot reach the data endpoint at {settings.data_address}"
            assert seen["hostname"] == host.hostname

        # 2. The workers, as the server's panel shows them: their hostnames, their ends of the
        #    broker connection on the namespace addresses.
        panel = {host.netns: panel_entry(cluster, workers[host.netns], host) for host in other_hosts}
        for host in other_hosts:
            entry = panel[host.netns]
            assert entry["host"] == host.hostname
            assert entry["address"].rpartition(":")[0] == host.address, entry["address"]
        assert len(get_json(f"{cluster.base}/workers")) == 2, "no other worker takes part"
        assert broker_peers(settings.broker_worker_user) == {panel[h.netns]["address"] for h in other_hosts}

        # 3. A song and a video through them, at the same time.
        status, _ = post_json(f"{cluster.base}/music/{music['music_id']}", [t["track_id"] for t in music["tracks"]])
        assert status == 200
        task_id = transcode(cluster.base, media["media_id"], LOSSLESS)

        song_status = wait_state(cluster.base, music["music_id"], "done", timeout=180)
        reference = reference_stems(song)  # whole-file demucs in this process: the fault-free result
        for name, stem in served_stems(cluster.base, music["music_id"]).items():
            assert stem.shape == reference[name].shape, name
            assert sdr(reference[name], stem) >= 60, name

        out = tmp_path / "out.mp4"
        out.write_bytes(finished(cluster.base, task_id))
        assert int(video.stream(out)["nb_read_packets"]) == media["video"]["frames"] == 105
        assert video.frame_hashes(out) == video.frame_hashes(clip), "every input frame, decoded, once"

        # 4. Done by the namespaced workers, each result applied once.
        for attempts, host in ((get_json(f"{cluster.base}/music/{music['music_id']}/timeline"), singer),
                               (get_json(f"{cluster.base}/tasks/{task_id}/timeline"), editor)):
            assert attempts and {a["worker"] for a in attempts} == {panel[host.netns]["worker"]}, attempts
            assert all(a["outcome"] == "done" for a in attempts), attempts
        video_jobs = get_json(f"{cluster.base}/tasks/{task_id}")["jobs_total"]
        assert metric(cluster.base, "karaoke_jobs_done") == song_status["jobs_total"] + video_jobs
        done_by = {w["worker"]: w["jobs_done"] for w in get_json(f"{cluster.base}/workers")}
        assert done_by == {panel[singer.netns]["worker"]: song_status["jobs_total"],
                           panel[editor.netns]["worker"]: video_jobs}
    finally:
        cluster.stop()
        elsewhere.close()
