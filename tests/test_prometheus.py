"""Prometheus and Grafana: the shipped alert rules and configs, and a real Prometheus scraping a real server.

- promtool (Debian's `prometheus` package) checks deploy/prometheus/prometheus.yml and alerts.yml
  and runs their unit tests (alerts.test.yml: each alert fires on the series it is about and on
  no look-alike); a rule loosened on purpose makes those unit tests fail, so they can fail.
- Every metric that the alerts and the Grafana dashboard read is one that /metrics exposes, and
  docker-compose.monitoring.yml mounts the files that exist, where the provisioning expects them.
- A real `prometheus` process scrapes the app behind waitress (`live_server`) every second while
  a real worker process separates a 4-second song with the tiny model. Through Prometheus' HTTP
  API the test reads back the worker's series (`karaoke_worker_up`, `karaoke_worker_jobs_total`
  with its worker, host and kind labels), the kind's task series (finished, latency histogram,
  media seconds), a queue's consumers, and every dashboard query; then it kills the worker and
  sees `karaoke_worker_up` drop to 0 and the KaraokeWorkerOffline alert fire on that worker.

Without the prometheus binaries the tests that need them are skipped with that reason
(`tools/system-deps.sh`, which `.ci/run` calls, installs them).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml

from bench import harness
from src.kinds import registry
from src.server.metrics import Metrics
from tests.helpers import get_json, post_json, upload, wait_for

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "karaoke.json"
COMPOSE = ROOT / "docker-compose.monitoring.yml"
NOT_INSTALLED = "Debian's prometheus package is not installed (tools/system-deps.sh installs it, with promtool)"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name}: {NOT_INSTALLED}")
    return path


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([tool("promtool"), *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query of the dashboard, its variables replaced as Grafana would."""
    board = json.loads(DASHBOARD.read_text())
    queries = [(p["title"], t["expr"]) for p in board["panels"] for t in p.get("targets", [])]
    return [(title, expr.replace("$__rate_interval", "1m").replace("$kind", ".*")) for title, expr in queries]


# -- the files, checked by promtool and against /metrics ------------------------------------------------


@pytest.mark.unit
def test_promtool_passes_the_config_the_rules_and_their_unit_tests():
    config = promtool("check", "config", "deploy/prometheus/prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr
    assert "SUCCESS: 1 rule files found" in config.stdout  # the config finds alerts.yml next to it
    rules = promtool("check", "rules", "deploy/prometheus/alerts.yml")
    assert rules.returncode == 0 and "SUCCESS: 5 rules found" in rules.stdout, rules.stdout + rules.stderr
    unit = promtool("test", "rules", "deploy/prometheus/alerts.test.yml")
    assert unit.returncode == 0 and "SUCCESS" in unit.stdout, unit.stdout + unit.stderr


@pytest.mark.unit
def test_the_alert_unit_tests_catch_a_loosened_rule(tmp_path: Path):
    """A queue rule that forgets `role="jobs"` fires on the growing results queue: the unit tests say so."""
    alerts = (PROMETHEUS_DIR / "alerts.yml").read_text()
    loosened = alerts.replace('karaoke_queue_messages{role="jobs"}', "karaoke_queue_messages")
    assert loosened != alerts
    (tmp_path / "alerts.yml").write_text(loosened)
    shutil.copy(PROMETHEUS_DIR / "alerts.test.yml", tmp_path / "alerts.test.yml")
    unit = promtool("test", "rules", str(tmp_path / "alerts.test.yml"))
    assert unit.returncode != 0
    report = unit.stdout + unit.stderr
    assert "KaraokeJobsQueueGrowing" in report and 'role="results"' in report, report


@pytest.mark.unit
def test_the_alerts_and_the_dashboard_read_only_metrics_the_server_exposes():
    worker = {"worker": "a1b2c3d", "host": "node-1", "online": True, "state": "busy", "cpu_percent": 90.0,
              "memory_bytes": 2**28, "host_cpu_percent": 50.0, "host_memory_percent": 40.0, "load": 1.5,
              "cores": 4, "last_heartbeat_age": 0.5, "jobs_by_kind": {"separate": 3, "no-such-kind": 7},
              "gpu_memory_bytes": 0}
    gone = {**worker, "worker": "e4f5a6b", "online": False, "jobs_by_kind": {}}
    queues = {"error": None, "queues": [
        {"name": "p.jobs.separate", "role": "jobs", "kind": "separate", "route": None, "messages": 4, "ready": 3,
         "unacked": 1, "consumers": 2, "publish_rate": 0.5, "deliver_rate": 0.4, "ack_rate": 0.4,
         "redeliver_rate": 0.0},
        {"name": "p.jobs.forged.x", "role": "jobs", "kind": "forged", "route": "x", "messages": 9},
        {"name": "p.results", "role": "results", "kind": None, "route": None, "messages": 1}]}
    text = Metrics().exposition([worker, gone], queues).decode()
    exposed = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}

    read = set()
    for _, expr in dashboard_queries():
        read |= set(re.findall(r"\bkaraoke_[a-z0-9_]+", expr))
    read |= set(re.findall(r"\bkaraoke_[a-z0-9_]+", (PROMETHEUS_DIR / "alerts.yml").read_text()))
    assert read and read <= exposed, f"not in /metrics: {sorted(read - exposed)}"

    # bounded labels: a kind that is not the registry's never becomes a label value
    assert "no-such-kind" not in text and "forged" not in text
    assert 'karaoke_queue_messages{kind="",role="other",route=""} 9.0' in text
    # an offline worker has up 0 and no figures that would draw a flat line after it left
    assert 'karaoke_worker_up{host="node-1",worker="e4f5a6b"} 0.0' in text
    assert 'karaoke_worker_cpu_percent{host="node-1",worker="e4f5a6b"}' not in text
    # every kind's task series exist from the start, at 0
    for kind in registry.names():
        assert f'karaoke_tasks_finished_total{{kind="{kind}",state="failed"}} 0.0' in text


@pytest.mark.unit
def test_compose_mounts_the_provisioned_files_where_prometheus_and_grafana_read_them():
    compose = yaml.safe_load(COMPOSE.read_text())
    mounts = {}
    for service in ("prometheus", "grafana"):
        for volume in compose["services"][service]["volumes"]:
            source, target = volume.split(":")[:2]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{service} mounts {source}, which does not exist"
                mounts[target] = ROOT / source
    prometheus_args = compose["services"]["prometheus"]["command"]
    config_path = next(a.split("=", 1)[1] for a in prometheus_args if a.startswith("--config.file="))
    assert mounts[config_path] == PROMETHEUS_DIR / "prometheus.yml"
    assert mounts["/etc/prometheus/alerts.yml"] == PROMETHEUS_DIR / "alerts.yml"  # rule_files is relative

    provisioning = mounts["/etc/grafana/provisioning"]
    source = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    provider = yaml.safe_load((provisioning / "dashboards" / "karaoke.yml").read_text())["providers"][0]
    assert mounts[provider["options"]["path"]] == DASHBOARD.parent
    board = json.loads(DASHBOARD.read_text())
    datasource = next(v for v in board["templating"]["list"] if v["name"] == "datasource")
    assert datasource["current"]["value"] == source["uid"] and source["type"] == "prometheus"
    assert source["url"].endswith(":9090") and "--web.listen-address=:9090" in prometheus_args
    assert all(p["datasource"]["uid"] == "${datasource}" for p in board["panels"] if p["type"] != "row")


# -- a real Prometheus against a real server ----------------------------------------------------------


class Prometheus:
    """A `prometheus` process on a free port, and its HTTP API."""

    def __init__(self, folder: Path, target: str):
        shipped = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
        shipped["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        shipped["rule_files"] = [str(PROMETHEUS_DIR / "alerts.yml")]
        shipped["scrape_configs"][0]["static_configs"][0]["targets"] = [target]  # its labels kept
        (folder / "prometheus.yml").write_text(yaml.safe_dump(shipped))
        self.url = f"http://127.0.0.1:{harness.free_port()}"
        self.log = folder / "prometheus.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [tool("prometheus"), f"--config.file={folder / 'prometheus.yml'}",
                 f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address={self.url[len('http://'):]}"],
                stdout=log, stderr=subprocess.STDOUT)

    def ready(self) -> None:
        def answers() -> bool:
            assert self.proc.poll() is None, f"prometheus exited: {self.log.read_text()[-2000:]}"
            try:
                return requests.get(self.url + "/-/ready", timeout=2).status_code == 200
            except requests.ConnectionError:
                return False

        wait_for(answers, 30, "prometheus to be ready")

    def api(self, path: str, **params: str) -> dict:
        answer = requests.get(f"{self.url}/api/v1/{path}", params=params, timeout=10).json()
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, expr: str) -> list[dict]:
        """The instant vector of `expr`: [{"metric": labels, "value": float}]."""
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        return [{"metric": r["metric"], "value": float(r["value"][1])} for r in data["result"]]

    def value(self, expr: str, at_least: float | None = None, timeout: float = 30) -> dict:
        """The one series `expr` selects, once it exists (with a value >= `at_least`, if given)."""

        def found():
            result = self.query(expr)
            assert len(result) <= 1, f"{expr} selects {len(result)} series: {result}"
            return result and (at_least is None or result[0]["value"] >= at_least) and result[0]

        return wait_for(found, timeout, f"{expr} in prometheus", interval=0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def prometheus(live_server: str, tmp_path: Path) -> Iterator[Prometheus]:
    folder = tmp_path / "prometheus"
    folder.mkdir()
    running = Prometheus(folder, live_server[len("http://"):])
    try:
        running.ready()
        yield running
    finally:
        running.stop()


def test_a_real_prometheus_reads_worker_and_kind_series_from_a_running_server(
        prometheus: Prometheus, live_server: str, cluster, make_song):
    worker_proc = cluster.start_worker()
    song = make_song(4.0)
    scrape = prometheus.value('up{job="karaoke"}', at_least=1)  # the shipped job name, scraped
    assert scrape["metric"]["instance"] == live_server[len("http://"):]

    worker = cluster.wait_workers(1)[0]
    name, host = worker["worker"], worker["host"]
    music = upload(live_server, song)
    assert post_json(f"{live_server}/music/{music['music_id']}", [t["track_id"] for t in music["tracks"]])[0] == 200
    wait_for(lambda: get_json(f"{live_server}/music/{music['music_id']}")["state"] == "done", 90, "the song")
    jobs = len(get_json(f"{live_server}/job"))
    assert jobs >= 2

    # worker-labelled: the worker by its name and host, and the results it sent of the kind
    up = prometheus.value(f'karaoke_worker_up{{worker="{name}"}}', at_least=1)
    assert up["metric"] == {"__name__": "karaoke_worker_up", "job": "karaoke", "deployment": "local",
                            "instance": live_server[len("http://"):], "worker": name, "host": host}
    sent = prometheus.value(f'karaoke_worker_jobs_total{{worker="{name}"}}', at_least=jobs)
    assert (sent["metric"]["kind"], sent["metric"]["host"], sent["value"]) == ("separate", host, jobs)
    assert prometheus.value(f'karaoke_worker_memory_bytes{{worker="{name}"}}')["value"] > 10 * 2**20

    # kind-labelled: the task, its latency and its media seconds; the other kinds' series are there at 0
    done = prometheus.value('karaoke_tasks_finished_total{kind="separate",state="done"}', at_least=1)
    assert done["value"] == 1
    assert prometheus.value('karaoke_jobs_accepted_total{kind="separate"}')["value"] == jobs
    assert prometheus.value('karaoke_task_seconds_count{kind="separate"}')["value"] == 1
    latency = prometheus.value('karaoke_task_seconds_sum{kind="separate"}')["value"]
    assert 0 < latency < 90
    assert prometheus.value('karaoke_media_seconds_done_total{kind="separate"}')["value"] == pytest.approx(4.0,
                                                                                                         abs=0.2)
    assert prometheus.value('karaoke_tasks_finished_total{kind="transcode",state="failed"}')["value"] == 0

    # a queue, as RabbitMQ's management API says: the separate jobs queue has its one consumer
    assert prometheus.value('karaoke_queues_readable', at_least=1)["value"] == 1
    consumers = prometheus.value('karaoke_queue_consumers{role="jobs",kind="separate"}', at_least=1)
    assert consumers["value"] == 1 and "route" not in consumers["metric"]  # Prometheus drops an empty label

    # every dashboard query is valid PromQL on real data; throughput and latency have the kind's series
    for title, expr in dashboard_queries():
        result = prometheus.query(expr)
        if title.startswith(("Throughput: jobs", "Latency")):
            assert any(r["metric"].get("kind") == "separate" for r in result), (title, expr, result)
    # and the alert rules load and evaluate without error against these series
    rules = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
    assert {r["name"] for r in rules} == {"KaraokeServerDown", "KaraokeWorkerOffline", "KaraokeWorkersMissing",
                                          "KaraokeJobsQueueGrowing", "KaraokeTaskFailed"}
    assert all(r["health"] == "ok" for r in rules), rules

    # the worker dies: offline after two missed heart-beats, up 0, and the alert fires on it
    worker_proc.kill()
    worker_proc.wait(10)
    offline = wait_for(lambda: (r := prometheus.query(f'karaoke_worker_up{{worker="{name}"}} == 0')) and r[0],
                       30, "the worker to be offline in prometheus", interval=0.5)
    assert offline["metric"]["host"] == host

    def firing():
        alerts = prometheus.api("alerts")["alerts"]
        return next((a for a in alerts if a["labels"]["alertname"] == "KaraokeWorkerOffline"
                     and a["state"] == "firing"), None)

    alert = wait_for(firing, 15, "KaraokeWorkerOffline to fire", interval=0.5)
    assert (alert["labels"]["worker"], alert["labels"]["host"]) == (name, host)
    assert alert["annotations"]["summary"] == f"Worker {name} on {host} is offline"
