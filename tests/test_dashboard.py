"""The operations dashboard: node figures from real workers, queues from RabbitMQ's management API, the page live.

- The worker registry keeps a worker that missed two heart-beats as offline (and live again if the same
  process speaks again), with a bounded history of its CPU and memory.
- `QueueMonitor` reads the real management API with the server's provisioned login (tagged `management`
  by the provisioning), says why when it cannot, and never hands the login on.
- In Chromium, at desktop and phone widths: two real workers appear with their load, a song's jobs show in
  the queue table and in the throughput and latency per kind, and a worker killed with SIGKILL turns
  offline on the open page, pushed by the server, without a reload. Screenshots in test-artifacts/dashboard/.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from playwright.sync_api import expect

from src.messaging.schema import PresenceMessage
from src.server.dashboard import percentile
from src.server.presence import HISTORY_POINTS, WorkerRegistry
from src.server.queues import QueueMonitor
from tests import helpers as http
from tests.conftest import ARTIFACTS, Cluster
from tests.test_browser import serious_accessibility_violations

SHOTS = ARTIFACTS / "dashboard"


def presence(worker: str = "w1", session: str = "s" * 32, cpu: float = 50.0, **fields) -> PresenceMessage:
    values = dict(worker=worker, host="h", address="127.0.0.1:1", pid=1, state="idle", job_id=None, task_id=None,
                  jobs_done=0, mean_job_seconds=None, model="m", sent_at=time.time(), session=session,
                  cpu_percent=cpu, memory_bytes=1000, heartbeat_ms=100)
    return PresenceMessage(**{**values, **fields})


def test_a_silent_worker_goes_offline_and_comes_back_when_it_speaks_again(monkeypatch):
    monkeypatch.setattr("src.server.presence.PRESENCE_RATE", 1e6)  # many messages at once, none dropped
    gone = []
    registry = WorkerRegistry(heartbeat_ms=100, on_job_started=lambda *a: None, on_worker_gone=gone.append)
    for i in range(HISTORY_POINTS + 5):
        registry.update(presence(cpu=float(i), sent_at=1000.0 + i))
    time.sleep(0.25)  # two heart-beats of 100 ms, and a little
    assert registry.expire() == ["w1"] and gone == ["w1"]
    assert registry.snapshot() == [] and registry.count() == 0
    [offline] = registry.history()
    assert offline["online"] is False and offline["offline_since"] is not None
    assert len(offline["history"]) == HISTORY_POINTS  # bounded, the newest kept
    assert offline["history"][-1] == [1000.0 + HISTORY_POINTS + 4, HISTORY_POINTS + 4.0, 1000]

    # another process cannot claim it; the same one (a frozen worker resumed) is live again
    assert registry.update(presence(session="t" * 32)) is None
    registry.update(presence())
    [back] = [w for w in registry.history() if w["online"]]
    assert back["worker"] == "w1" and len(back["history"]) == HISTORY_POINTS

    # a worker whose own interval is longer (configured apart, on another host) gets two of its own
    registry.update(presence(worker="w2", heartbeat_ms=1000))
    time.sleep(0.25)
    assert registry.expire() == ["w1"] and [w["worker"] for w in registry.snapshot()] == ["w2"]


def test_percentiles_are_nearest_rank():
    assert percentile([], 0.5) is None
    assert percentile([3.0], 0.95) == 3.0
    values = [float(v) for v in range(1, 21)]
    assert percentile(values, 0.50) == 10.0 and percentile(values, 0.95) == 19.0


def test_queue_monitor_reads_rabbitmq_with_the_servers_login(least_privilege):
    monitor = QueueMonitor(least_privilege)
    snapshot = monitor.poll()
    assert snapshot["error"] is None, snapshot["error"]
    names = {q["name"]: q for q in snapshot["queues"]}
    prefix = least_privilege.queue_prefix
    assert f"{prefix}.jobs.separate" in names and f"{prefix}.results" in names
    assert all(name.startswith(prefix + ".") for name in names)  # no other deployment's queues
    separate = names[f"{prefix}.jobs.separate"]
    assert (separate["role"], separate["kind"], separate["route"], separate["type"]) == ("jobs", "separate", None,
                                                                                         "quorum")
    assert names[f"{prefix}.jobs.transcode.h264"]["route"] == "h264"
    assert least_privilege.broker_password not in json.dumps(snapshot)

    wrong = QueueMonitor(least_privilege.with_overrides(broker_password="not-the-password"))
    assert "401" in wrong.poll()["error"]
    nowhere = QueueMonitor(least_privilege.with_overrides(broker_management_url="http://127.0.0.1:9"))
    assert "127.0.0.1:9" in nowhere.poll()["error"]


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_the_dashboard_shows_workers_queues_and_throughput_live(least_privilege, tmp_path: Path, page, make_song):
    farm = Cluster(least_privilege, tmp_path)
    try:
        farm.start_server()
        for _ in range(2):
            farm.start_worker()
        farm.wait_workers(2)
        page.goto(farm.base + "/")
        page.get_by_role("link", name="Dashboard").click()
        expect(page).to_have_url(farm.base + "/dashboard")
        expect(page.locator("#connection")).to_have_text("live")
        cards = page.locator('#workers [data-online="true"]')
        expect(cards).to_have_count(2)
        expect(cards.first.locator("svg.spark")).to_have_count(2)  # CPU and memory
        expect(cards.first).to_contain_text("load")

        # a song through the farm: its jobs appear in the queue table and in the per-kind figures
        song = http.upload(farm.base, make_song(6.0))
        tracks = [t["track_id"] for t in song["tracks"]]
        assert http.post_json(f"{farm.base}/music/{song['music_id']}", tracks)[0] == 200
        http.wait_for(lambda: http.get_json(f"{farm.base}/music/{song['music_id']}")["state"] == "done", 120,
                      "the song done")
        prefix = least_privilege.queue_prefix
        row = page.locator(f'#queues tr[data-queue="{prefix}.jobs.separate"]')
        expect(row).to_be_visible(timeout=20_000)
        expect(row.locator("td").nth(2)).to_have_text("2", timeout=20_000)  # consumers: both workers
        separate = page.locator('#kinds [data-kind="separate"]')
        expect(separate).to_contain_text("1 done, 0 failed", timeout=20_000)
        expect(separate.locator("dd").nth(2)).not_to_have_text("–")  # a p50 latency
        state = http.get_json(farm.base + "/dashboard/state")
        jobs = sum(w["jobs_by_kind"].get("separate", 0) for w in state["workers"])
        assert jobs == state["kinds"]["separate"]["jobs_done"] > 0
        assert all(w["memory_bytes"] > 0 and w["cores"] >= 1 for w in state["workers"])
        node = f"{least_privilege.broker_host}:{least_privilege.broker_port}"
        assert {w["broker"] for w in state["workers"]} == {node}
        assert http.get_json(farm.base + "/health")["broker_node"] == node
        body = json.dumps(state)
        assert least_privilege.broker_password not in body and least_privilege.broker_user not in body
        shot(page, "desktop")

        # a worker dies: the open page marks it offline when its heart-beats stop, pushed, without a reload
        victim = farm.workers[0]
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        expect(page.locator('#workers [data-online="false"]')).to_have_count(1, timeout=30_000)
        expect(page.locator('#workers [data-online="false"]')).to_contain_text("offline since")
        expect(page.locator("#workers-count")).to_have_text("1 online, 1 offline")

        page.set_viewport_size({"width": 390, "height": 844})
        expect(page.locator('#workers [data-online="true"]')).to_have_count(1)
        width = page.evaluate("document.scrollingElement.scrollWidth")
        assert width <= 390, f"the page is {width} px wide on a 390 px phone"
        shot(page, "phone")
    except Exception:
        print(farm.log("server")[-3000:])
        raise
    finally:
        farm.stop()


@pytest.mark.parametrize("path", ["/dashboard", "/dashboard/"])
def test_the_page_is_served(client, path):
    answer = client.get(path)
    assert answer.status_code == 200 and b"/web/js/dashboard.js" in answer.data


@pytest.mark.browser
def test_reset_is_the_dashboards_behind_a_typed_confirmation_and_the_token(cluster, settings, page, tmp_path,
                                                                           make_song):
    """The musician's page loads with no console error and no Reset; the dashboard's Reset names what it
    deletes, waits for that phrase typed, and is refused by a server with OPERATOR_TOKEN until it is given."""
    cluster.settings = settings.with_overrides(operator_token="s3cret")
    cluster.start_server()
    http.upload(cluster.base, make_song(2.0, "wav"))
    console: list[str] = []
    page.on("console", lambda m: m.type == "error" and console.append(f"{m.text} at {m.location}"))
    page.goto(cluster.base)  # a cold load: no 404 (favicon) or any other error on the console
    page.wait_for_selector("#connection.ok")
    expect(page.locator("#library li")).to_have_count(1)
    assert page.locator("#reset").count() == 0
    expect(page.locator("#farm-text")).to_have_text("No worker is online: processing waits until one starts.")

    page.goto(cluster.base + "/dashboard")
    expect(page.locator("#reset-phrase")).to_have_text("delete 1 song and 1 task")
    expect(page.locator("#reset")).to_be_disabled()
    assert console == [], "cold loads of both pages put nothing on the console"
    page.fill("#reset-confirm", "delete everything")
    expect(page.locator("#reset")).to_be_disabled()
    page.fill("#reset-confirm", "delete 1 song and 1 task")
    page.click("#reset")
    expect(page.locator("#reset-status")).to_contain_text("Reset refused: this operator action needs")
    assert len(http.get_json(cluster.base + "/music")) == 1, "refused: nothing deleted"
    page.fill("#reset-token", "s3cret")
    page.click("#reset")
    expect(page.locator("#reset-status")).to_have_text("Done: everything was deleted.")
    assert http.get_json(cluster.base + "/music") == []
    expect(page.locator("#reset-phrase")).to_have_text("delete 0 songs and 0 tasks")
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "reset.png"), full_page=True)
    assert serious_accessibility_violations(page) == []
