"""Broker trust against the real RabbitMQ: least-privilege logins, deadlines, control sanity, the supervisor.

Every test provisions its own server and worker logins with the code `make broker` uses
(`least_privilege` in conftest.py) and deletes them afterwards.
"""

from __future__ import annotations

import os
import signal
import time
import uuid

import pytest
import stomp

from src.messaging.destinations import Destinations
from src.messaging.schema import PresenceMessage
from tests.conftest import Cluster
from tests.helpers import get_json, metric, queue_depth, wait_for
from tests.test_faults import assert_whole, start_song


@pytest.fixture
def trusted(least_privilege, tmp_path):
    running = Cluster(least_privilege, tmp_path)
    yield running
    running.stop()


class _Frames(stomp.ConnectionListener):
    def __init__(self):
        self.errors: list[str] = []
        self.receipts: list[str] = []
        self.messages: list = []

    def on_error(self, frame):
        self.errors.append(frame.headers.get("message", "") + " " + str(frame.body)[:300])

    def on_receipt(self, frame):
        self.receipts.append(frame.headers.get("receipt-id"))

    def on_message(self, frame):
        self.messages.append(frame)


def stomp_login(settings, user: str, password: str) -> tuple[stomp.Connection12, _Frames]:
    conn = stomp.Connection12([(settings.broker_host, settings.broker_port)], vhost="/", auto_decode=False)
    frames = _Frames()
    conn.set_listener("frames", frames)
    conn.connect(user, password, wait=True)
    return conn, frames


def announce(conn: stomp.Connection12, settings) -> None:
    """A rogue consumer says it is a CPU worker that takes separate jobs (its login may: its own
    presence route), so that songs are routed and their jobs published while it is the only one."""
    rogue = PresenceMessage(worker=f"rogue-{uuid.uuid4().hex[:6]}", host="rogue", address="a", pid=1, state="idle",
                            job_id=None, task_id=None, jobs_done=0, mean_job_seconds=None, model=settings.model,
                            sent_at=time.time(), session=uuid.uuid4().hex, kinds=("separate",),
                            offers={"separate": "rogue"}, heartbeat_ms=60_000)
    route = Destinations(settings.queue_prefix, settings.worker_login[0]).presence
    conn.send(route, rogue.body(), headers=rogue.headers())


def attempt(settings, action) -> _Frames:
    """Run one frame as the worker login on a fresh connection; what the broker answered."""
    conn, frames = stomp_login(settings, *settings.worker_login)
    try:
        action(conn)
        wait_for(lambda: frames.errors or frames.receipts, 10, "the broker's answer")
    finally:
        if conn.is_connected():
            conn.disconnect()
    return frames


def test_a_worker_login_cannot_publish_jobs_or_control_nor_read_results(least_privilege):
    s = least_privilege
    d = Destinations(s.queue_prefix, s.worker_login[0])
    job, jobs, worker_jobs = {"type": "job", "receipt": "r"}, d.jobs("separate"), d.worker_jobs("separate")
    refused = {
        "job via /queue/": lambda c: c.send(jobs, b"forged job", headers={**d.declaration(jobs), **job}),
        "job via /amq/queue/": lambda c: c.send(worker_jobs, b"forged job", headers=job),
        "control via /topic/": lambda c: c.send(d.control, b"", headers={"type": "control", "action": "reset",
                                                                         "task-ids": "999999999", "receipt": "r"}),
        "control via amq.topic": lambda c: c.send(f"/exchange/amq.topic/{s.queue_prefix}.control", b"",
                                                  headers={"type": "control", "receipt": "r"}),
        "results queue read": lambda c: c.subscribe(f"/amq/queue/{s.queue_prefix}.results", id="1",
                                                    headers={"receipt": "r"}),
        "presence read": lambda c: c.subscribe(d.presence_binding, id="1", headers={"receipt": "r"}),
        "presence read into its own queue": lambda c: c.subscribe(
            d.presence_binding, id="1", headers={"receipt": "r", "x-queue-name": d.subscription_queue()}),
        "a result as another login": lambda c: c.send(f"/topic/{s.queue_prefix}.results.{s.server_login[0]}", b"",
                                                      headers={"type": "nothing", "receipt": "r"}),
        "presence as another login": lambda c: c.send(f"/topic/{s.queue_prefix}.presence.guest", b"{}",
                                                      headers={"receipt": "r"}),
        "a subscription queue not of its own name": lambda c: c.subscribe(d.control, id="1",
                                                                           headers={"receipt": "r"}),
        "dead queue write": lambda c: c.send(d.dead, b"x", headers={**d.declaration(d.dead), "receipt": "r"}),
    }
    for what, action in refused.items():
        frames = attempt(s, action)
        assert any("access_refused" in e.lower() for e in frames.errors), f"{what}: the broker allowed it"
    allowed = {
        "result": lambda c: c.send(d.results_route, b"", headers={"type": "nothing", "receipt": "r"}),
        "presence": lambda c: c.send(d.presence, b"{}", headers={"receipt": "r"}),
        "jobs read": lambda c: c.subscribe(worker_jobs, id="1", headers={"receipt": "r", "prefetch-count": "1"}),
        "control read": lambda c: c.subscribe(d.control, id="1",
                                              headers={"receipt": "r", "x-queue-name": d.subscription_queue()}),
    }
    for what, action in allowed.items():
        frames = attempt(s, action)
        assert not frames.errors and frames.receipts, f"{what}: {frames.errors}"
    # (the broker's queue statistics lag a few seconds behind)
    wait_for(lambda: queue_depth(s.queue_prefix, "results") == 1, 30, "the worker's result through its route")
    assert queue_depth(s.queue_prefix, "jobs.separate") == 0, "no forged job reached the jobs queue"


def test_a_job_that_never_returns_is_published_again_after_its_deadline(least_privilege, tmp_path, make_song):
    settings = least_privilege.with_overrides(job_deadline_seconds=4.0, job_deadline_factor=2.0)
    cluster = Cluster(settings, tmp_path)
    try:
        cluster.start_server()
        # A rogue consumer with a worker's login: it takes one job, ACKs it and never answers.
        hole, frames = stomp_login(settings, *settings.worker_login)
        announce(hole, settings)
        hole.subscribe(Destinations(settings.queue_prefix).worker_jobs("separate"), id="1", ack="client-individual",
                       headers={"prefetch-count": "1"})
        song = make_song(6.0, "wav")
        music_id = start_song(cluster.base, song)
        swallowed = wait_for(lambda: frames.messages and frames.messages[0], 30, "the rogue consumer to take a job")
        hole.ack(swallowed.headers["ack"])
        hole.disconnect()
        cluster.start_worker()
        assert_whole(cluster.base, music_id, song)
        assert metric(cluster.base, "karaoke_jobs_republished") >= 1
        assert f"Job[{swallowed.headers['job-id']}] not done" in cluster.log("server")
    finally:
        cluster.stop()


class _Requeuer(stomp.ConnectionListener):
    """A rogue consumer: every job it is given goes straight back to the queue."""

    def __init__(self) -> None:
        self.conn: stomp.Connection12 | None = None
        self.requeued = 0

    def on_message(self, frame):
        self.conn.nack(frame.headers["ack"], requeue="true")
        self.requeued += 1


def test_a_rogue_consumer_that_requeues_jobs_cannot_fail_a_song(least_privilege, tmp_path, make_song):
    """It once inflated the delivery count until a healthy song failed "after 13 attempts"."""
    settings = least_privilege.with_overrides(job_deadline_seconds=4.0, job_deadline_factor=2.0)
    cluster = Cluster(settings, tmp_path)
    rogue = _Requeuer()
    try:
        cluster.start_server()
        rogue.conn, _ = stomp_login(settings, *settings.worker_login)
        rogue.conn.set_listener("rogue", rogue)
        announce(rogue.conn, settings)
        rogue.conn.subscribe(Destinations(settings.queue_prefix).worker_jobs("separate"), id="1",
                             ack="client-individual",
                             headers={"prefetch-count": "1"})
        song = make_song(6.0, "wav")
        music_id = start_song(cluster.base, song)
        wait_for(lambda: rogue.requeued >= 3 * settings.max_attempts * 2, 60, "the rogue to requeue every job a lot")
        cluster.start_worker()  # a healthy worker shares the queue with the rogue from now on
        assert_whole(cluster.base, music_id, song)
        assert rogue.requeued > 3 * settings.max_attempts
    finally:
        if rogue.conn is not None and rogue.conn.is_connected():
            rogue.conn.disconnect()
        cluster.stop()


def test_a_reset_beyond_the_songs_a_worker_has_seen_stops_nothing(app, client, cluster, make_song, settings):
    worker = cluster.start_worker()
    wait_for(lambda: client.get("/workers").get_json(), 60, "the worker to subscribe")
    conn, _ = stomp_login(settings, *settings.server_login)  # control needs the server's login now
    d = Destinations(settings.queue_prefix)
    conn.send(d.control, b"", headers={"type": "control", "action": "reset", "task-ids": "999999999"})
    conn.send(d.control, b"", headers={"type": "control", "action": "reset", "task-ids": "-1,x"})
    conn.disconnect()
    wait_for(lambda: "goes beyond the highest task seen" in cluster.log("worker0"), 30, "the worker to hear it")
    music = client.post("/music", data=make_song(4.0, "wav").read_bytes(),
                        content_type="application/octet-stream").get_json()
    client.post(f"/music/{music['music_id']}", json=[])
    wait_for(lambda: client.get(f"/music/{music['music_id']}").get_json()["state"] == "done", 120, "the song")
    assert worker.poll() is None


def test_the_supervisor_restarts_a_killed_worker_and_health_says_degraded(trusted):
    trusted.start_server()
    health = get_json(trusted.base + "/health")
    assert health["status"] == "degraded" and "no worker is alive" in " ".join(health["reasons"])
    supervisor = trusted._spawn("src.audio_worker.supervisor", "supervisor", WORKERS_HEALTHY="2")
    try:
        workers = trusted.wait_workers(2)
        wait_for(lambda: get_json(trusted.base + "/health")["status"] == "ok", 30, "health ok with 2 workers")
        victim = workers[0]["pid"]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: "restarted: pid" in trusted.log("supervisor"), 30, "the supervisor to restart it")
        wait_for(lambda: len([w for w in get_json(trusted.base + "/workers") if w["pid"] != victim]) == 2, 60,
                 "two live workers again")
        assert supervisor.poll() is None
        assert f"(pid {victim}) exited with code -9" in trusted.log("supervisor")
    finally:
        supervisor.terminate()
        supervisor.wait(20)


@pytest.mark.unit
def test_config_reads_the_logins_make_broker_provisioned(tmp_path):
    from src import config

    logins = tmp_path / "logins.yaml"
    logins.write_text("karaoke:\n  BROKER_USER: karaoke-server\n  BROKER_PASSWORD: s\n"
                      "  BROKER_WORKER_USER: karaoke-worker\n  BROKER_WORKER_PASSWORD: w\n")
    base = {"CONFIG_FILE": str(tmp_path / "none.yaml"), "BROKER_LOGINS_FILE": str(logins)}
    provisioned = config.load(base)
    assert provisioned.server_login == ("karaoke-server", "s") and provisioned.worker_login == ("karaoke-worker", "w")
    assert config.load({**base, "QUEUE_PREFIX": "other"}).worker_login == ("guest", "guest"), "per prefix"
    explicit = config.load({**base, "BROKER_USER": "guest"})
    assert explicit.server_login == explicit.worker_login == ("guest", "guest"), "explicit settings win"
