"""Workers on other hosts: real workers in network namespaces of their own run a song and a video.

Two "other hosts" are made on this machine (tests/netns.py): each a Linux network
namespace with its own address on a veth link to this machine and no other route, and,
for the processes started in it, a mount namespace where the server's STORAGE_DIR, the
repository's storage/ and the test's own files are empty, and a hostname of its own. The server runs here
as usual (listening on this machine's loopback only); one worker runs on each host, given
nothing but the broker's address on the link, a worker login of its own (provisioned as
`make broker` does, `least_privilege` in conftest.py) and the deployment's names
(QUEUE_PREFIX, MODEL, the heart-beat interval). One takes the song (`separate`), the other
the video (`transcode`).

What it proves: a process launched that way sees none of the server's files and cannot
reach the server's HTTP port, only the broker; the song comes out equal to the
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
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

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


Endpoints = dict[str, tuple[str, int]]  # host's netns name -> (address, port) of the broker for it


@pytest.fixture
def broker_links(least_privilege: Settings, other_hosts: list[Host]) -> Endpoints:
    """host name -> (address, port) where that host's workers reach the broker: this machine's end of its link.

    RabbitMQ's STOMP listener listens on every interface by default; one bound to loopback
    only cannot serve workers on other hosts, and the test says so rather than work around it."""
    settings, hosts = least_privilege, other_hosts
    if not (is_loopback(settings.broker_host)
            and all(netns.accepts(h.host_address, settings.broker_port) for h in hosts)):
        pytest.skip(f"the broker's STOMP port {settings.broker_port} does not answer on the links' addresses "
                    "(a listener bound to loopback only): workers on other hosts could not reach it")
    return {h.netns: (h.host_address, settings.broker_port) for h in hosts}


def worker_env(settings: Settings, broker: tuple[str, int], kinds: str) -> dict[str, str]:
    """All a worker on another host is told: where the broker is, its login, the deployment's names.

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


def test_workers_in_network_namespaces_of_their_own_run_a_song_and_a_video(other_hosts, least_privilege, broker_links,
                                                                           tmp_path, make_song):
    settings, brokers = least_privilege, broker_links
    cluster = Cluster(settings, tmp_path)
    singer, editor = other_hosts  # the song's host and the video's
    # The server's storage, this test's files and the repository's storage/ are hidden on the other hosts.
    hidden = [settings.storage_dir, tmp_path, ROOT / "storage"]
    try:
        cluster.start_server()
        # Started first: loading torch takes the longest; meanwhile the media are made and stored.
        workers = {singer.netns: start_worker(cluster, singer, hidden, worker_env(settings, brokers[singer.netns],
                                                                                   "separate")),
                   editor.netns: start_worker(cluster, editor, hidden, worker_env(settings, brokers[editor.netns],
                                                                                  "transcode"))}
        song = make_song(6.0, "wav")
        clip = video.make_clip(tmp_path / "clip.mp4", 4.2)  # 105 frames: two 3-second jobs, the last partial
        music = upload(cluster.base, song)
        media = upload_media(cluster.base, clip)

        # 1. On another host, nothing of the server's is there but the broker.
        stored = [p for p in settings.storage_dir.rglob("*") if p.is_file()]
        assert stored, "the server stored the uploads"
        for host in other_hosts:
            seen = probe(host, hidden, {"files": [str(p) for p in stored],
                                        "folders": [str(settings.storage_dir), str(ROOT / "storage")],
                                        "server": [settings.server_host, settings.server_port],
                                        "broker": list(brokers[host.netns])})
            assert seen["seen"] == [], f"{host.hostname} sees the server's files"
            assert all(not names for names in seen["listed"].values()), seen["listed"]
            assert not seen["server"], f"{host.hostname} reaches the server's HTTP port"
            assert seen["broker"], f"{host.hostname} cannot reach the broker at {brokers[host.netns]}"
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
