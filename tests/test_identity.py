"""Who sent a message, as the broker vouches for it: presence slots per login, the server's own
subscription queues, and the small leaks (ids, patterns, paths, credentials).

Against the real RabbitMQ with worker logins provisioned as `make broker` does
(`worker_logins`), deleted afterwards. The server runs in this process (`app`) with the
guest login; the workers are real worker processes or this test speaking STOMP as a worker login.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Iterator

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from src.kinds import registry
from src.messaging import accounts
from src.messaging.broker import Broker
from src.messaging.destinations import Destinations
from src.messaging.schema import PresenceMessage
from src.server import presence
from src.server.store import Store
from tests import video
from tests.conftest import Cluster
from tests.helpers import services_of, wait_for
from tests.test_trust import stomp_login

MANAGEMENT = "http://localhost:15672"


@contextlib.contextmanager
def worker_logins(settings, count: int) -> Iterator[list[tuple[str, str]]]:
    """`count` worker logins of the deployment (the server keeps guest), deleted afterwards; the
    queues declared, as `make broker` does, so workers (which may not declare) can start first."""
    tag = uuid.uuid4().hex[:8]
    logins = [(f"test-worker-{tag}-{i}", f"-{uuid.uuid4().hex}") for i in range(count)]
    ctl = accounts.Ctl()
    accounts.provision(ctl, settings.queue_prefix, settings.server_login, *logins)
    try:
        Broker(settings, "provision").declare_topology(registry.queues(registry.names()))
        yield logins
    finally:
        accounts.remove(ctl, settings.queue_prefix, [user for user, _ in logins])


def presence_body(name: str) -> bytes:
    return PresenceMessage(worker=name, host="forged", address="a", pid=1, state="idle", job_id=None, task_id=None,
                           jobs_done=0, mean_job_seconds=None, model="demucs_unittest", sent_at=time.time(),
                           kinds=("separate",), session=uuid.uuid4().hex, heartbeat_ms=60_000).body()


def dropped(app) -> float:
    """karaoke_presence_dropped from the app's /metrics."""
    text = app.test_client().get("/metrics").get_data(as_text=True)
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "karaoke_presence_dropped_total")


# -- presence: a slot per login before names --------------------------------------------------------


def test_a_flood_of_forged_names_from_one_login_keeps_no_other_login_s_worker_out(app, settings, tmp_path):
    with worker_logins(settings, 2) as (flooder, honest):
        conn, frames = stomp_login(settings, *flooder)
        route = Destinations(settings.queue_prefix, flooder[0]).presence
        try:
            for i in range(300):  # more than the whole registry holds (MAX_WORKERS)
                conn.send(route, presence_body(f"forged-{i}"),
                          headers={"type": "presence", **({"receipt": "flood-sent"} if i == 299 else {})})
            wait_for(lambda: "flood-sent" in frames.receipts, 30, "the broker to take the flood")
        finally:
            conn.disconnect()
        registry = services_of(app).collector.workers
        wait_for(lambda: registry.count() + dropped(app) == 300, 30, "every forged name taken or dropped")

        cluster = Cluster(settings, tmp_path)
        try:
            worker = cluster.start_worker(BROKER_WORKER_USER=honest[0], BROKER_WORKER_PASSWORD=honest[1],
                                          WORKER_KINDS="separate")
            wait_for(lambda: any(w["pid"] == worker.pid for w in app.test_client().get("/workers").get_json()),
                     60, "the honest worker on the panel despite the flood")
        finally:
            cluster.stop()
        health = app.test_client().get("/health").get_json()
        assert health["registry_full"] == [flooder[0]], health
        assert health["status"] == "degraded" and any("registry is full" in r for r in health["reasons"]), health
        assert registry.count() == presence.MAX_NAMES_PER_LOGIN + 1


# -- the server's subscription queues are the server's ---------------------------------------------------


def test_a_worker_login_cannot_read_the_server_s_presence_subscription(app, settings):
    prefix = settings.queue_prefix

    def server_queues() -> list[str]:
        """The queues bound to the presence topic: the server's subscription (whatever its name)."""
        answer = requests.get(f"{MANAGEMENT}/api/exchanges/%2F/amq.topic/bindings/source", auth=("guest", "guest"),
                              timeout=30)
        return [b["destination"] for b in answer.json() if b["routing_key"].startswith(f"{prefix}.presence")]

    queue = wait_for(server_queues, 30, "the server's presence subscription queue")[0]
    with worker_logins(settings, 1) as [worker]:
        for destination in (f"/amq/queue/{queue}", f"/queue/{queue}"):
            conn, frames = stomp_login(settings, *worker)
            try:
                conn.subscribe(destination, id="1", ack="auto", headers={"receipt": "r"})
                wait_for(lambda f=frames: f.errors or f.receipts, 10, "the broker's answer")
            finally:
                if conn.is_connected():
                    conn.disconnect()
            assert any("access_refused" in e.lower() for e in frames.errors), \
                f"{destination}: a worker login read the server's subscription"
        # a name of the server login's own, and nothing a worker login may read is named like the
        # plugin's shared subscription queues
        assert queue.startswith(f"{prefix}.sub.{settings.server_login[0]}."), queue
        grant = accounts.worker_grant(prefix, worker[0])
        assert "stomp-subscription" not in grant.read + grant.configure


def test_the_dead_queue_is_capped_in_bytes_by_make_broker_s_policy(settings):
    with worker_logins(settings, 1):
        def policy() -> dict | None:
            answer = requests.get(f"{MANAGEMENT}/api/queues/%2F/{settings.queue_prefix}.dead", auth=("guest", "guest"),
                                  timeout=30).json()
            return answer.get("effective_policy_definition") or None

        definition = wait_for(policy, 30, "the dead queue's policy")
        assert definition["max-length-bytes"] == 256 * 1024 * 1024, definition


# -- the small ones ---------------------------------------------------------------------------------


@pytest.fixture
def with_media_and_task(client, make_song):
    """Media 1 and task 1 exist (a song upload makes both): a wrong id must never reach them."""
    song = client.post("/music", data=make_song(3.0, "wav").read_bytes(), content_type="application/octet-stream")
    assert song.status_code in (200, 201), song.get_json()
    return song.get_json()["music_id"]


ID_FORMS = ["%D9%A1", "%EF%BC%91", "%F0%9D%9F%8F", str(2**63), str(2**64), "-1", "1" * 40, "0x1", "1.0", "+1"]


def test_every_id_route_answers_404_or_400_for_foreign_digits_and_huge_or_negative_numbers(client,
                                                                                          with_media_and_task):
    task_id = with_media_and_task
    assert client.get(f"/tasks/{task_id}").status_code == 200  # the one the forms below resemble
    routes = [("GET", "/tasks/{}"), ("GET", "/tasks/{}/timeline"), ("GET", "/tasks/{}/workers"),
              ("GET", "/tasks/{}/outputs/mix"), ("DELETE", "/tasks/{}"), ("GET", "/media/{}"),
              ("GET", "/media/{}/original"), ("GET", "/music/{}"), ("POST", "/music/{}"), ("GET", "/job/{}")]
    for method, route in routes:
        for form in ID_FORMS:
            answer = client.open(route.format(form), method=method, json=[])
            assert answer.status_code in (400, 404, 405), (method, route, form, answer.status_code)
            assert answer.is_json and "error" in answer.get_json(), (method, route, form)
    assert client.get(f"/tasks/{task_id}").get_json()["state"] != "cancelled", "no form cancelled task 1"
    for media_id in (2**63, 2**64, 10**40, -1, 0, 1.0, "1", True):
        answer = client.post("/tasks", json={"kind": "separate", "media_id": media_id, "params": {}})
        assert answer.status_code in (400, 404), (media_id, answer.status_code, answer.get_json())


def test_a_pattern_matches_the_whole_value_so_a_trailing_newline_is_refused(client, tmp_path):
    clip = video.make_clip(tmp_path / "clip.mp4", 1.0)
    media = client.post("/media", data=clip.read_bytes(), content_type="application/octet-stream").get_json()
    for bitrate in ("2500k\n", "2500k\r\n", "١٠٠k"):
        answer = client.post("/tasks", json={"kind": "transcode", "media_id": media["media_id"],
                                             "params": {"codec": "h264", "bitrate": bitrate}})
        assert answer.status_code == 400 and "bitrate" in answer.get_json()["error"], (bitrate, answer.get_json())
    accepted = client.post("/tasks", json={"kind": "transcode", "media_id": media["media_id"],
                                           "params": {"codec": "h264", "bitrate": "2500k"}})
    assert accepted.status_code == 202, accepted.get_json()


def test_a_task_error_shows_no_server_path(app, client, with_media_and_task, settings):
    task_id = with_media_and_task
    store: Store = services_of(app).store
    checking = settings.storage_dir / "tasks" / str(task_id) / "checking" / "tmpk2x8.nut"
    store.mark_failed(task_id, f"job 3 (chunk 2) failed after 3 attempt(s): result refused: ffprobe cannot read "
                               f"{checking}: No such file or directory; see /etc/shadow")
    error = client.get(f"/tasks/{task_id}").get_json()["error"]
    assert error and str(settings.storage_dir) not in error and "/etc/" not in error and "/tasks/" not in error, error
    assert "tmpk2x8.nut" in error and "No such file or directory" in error, "the reason stays readable"


def test_a_password_in_the_management_url_never_reaches_the_dashboard(settings):
    from src.server import create_app

    secret = f"pw-{uuid.uuid4().hex}"
    # guest's own password in the URL: the monitor logs in with the URL's login (the queues are
    # read) and shows the URL without it
    with_login = settings.with_overrides(broker_management_url="http://guest:guest@localhost:15672")
    application = create_app(with_login)
    services_of(application).start()
    try:
        monitor = services_of(application).queues
        snapshot = wait_for(lambda: (s := monitor.poll())["error"] is None and s, 30, "the queues read")
        assert "guest:guest@" not in json.dumps(snapshot)
        state = application.test_client().get("/dashboard/state").get_data(as_text=True)
        assert "guest:guest" not in state and "localhost:15672" in state, state[:500]
    finally:
        services_of(application).close()
    wrong = settings.with_overrides(broker_management_url=f"http://guest:{secret}@localhost:15672")
    application = create_app(wrong)
    services_of(application).start()
    try:
        monitor = services_of(application).queues
        snapshot = wait_for(lambda: (s := monitor.poll())["error"] and s, 30, "the refused login's error")
        state = application.test_client().get("/dashboard/state").get_data(as_text=True)
        assert secret not in state and secret not in json.dumps(snapshot), "the password reached the dashboard"
    finally:
        services_of(application).close()
