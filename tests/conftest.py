"""Fixtures: every test gets its own QUEUE_PREFIX and STORAGE_DIR on the real broker.

- `settings`: isolated settings with the tiny `demucs_unittest` model and short
  segments, so a few seconds of audio make several jobs.
- `app` / `client`: the Flask app from the factory, in this process; `live_server`: the
  same app behind the production server on a real port.
- `cluster`: real server and worker processes, for tests that kill them.
- `browser` / `page`: headless Chromium, and a tab of it that fails the test on any JavaScript or CSP error.
- `make_song`: audio files made by ffmpeg.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from playwright.sync_api import sync_playwright

from bench import harness
from src import config
from src.config import Settings
from src.kinds import registry
from src.server import create_app, wsgi
from tests import helpers as http
from tests.helpers import services_of, wait_for

# Every answer the tests get from a server is checked against the OpenAPI document (see that module).
pytest_plugins = ("tests.openapi_check",)


def pytest_configure(config: pytest.Config) -> None:
    # `-m "not containers"` leaves out the test that builds images and starts the compose stack
    config.addinivalue_line("markers", "containers: builds the container images and runs the compose stack")
    # `make check` runs only these: no broker, no browser, no container, seconds each
    config.addinivalue_line("markers", "unit: the fast tier (make check): needs no broker, browser or container")


ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def delete_queues(prefix: str) -> None:
    """Delete a test's queues through the management API (make broker enables it): one HTTP call each,
    where a rabbitmqctl call costs a second and a half of an Erlang VM's start (15 s a test)."""
    jobs = [f"jobs.{kind}" + (f".{route}" if route else "") for kind, route in registry.queues(registry.names())]
    with requests.Session() as session:
        for name in (*jobs, "results", "dead"):
            answer = session.delete(f"http://localhost:15672/api/queues/%2F/{prefix}.{name}", auth=("guest", "guest"),
                                    timeout=30)
            assert answer.status_code in (204, 404), f"deleting queue {prefix}.{name}: {answer.status_code}"


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    values = {
        "CONFIG_FILE": str(tmp_path / "no-config.yaml"),
        "QUEUE_PREFIX": prefix,
        "STORAGE_DIR": str(tmp_path / "storage"),
        "MODEL": "demucs_unittest",
        "MODEL_SEGMENT": "2",
        "CHUNK_SECONDS": "3",
        "BROKER_HEARTBEAT_MS": "2000",
        "SERVER_PORT": str(harness.free_port()),
        "DATA_PORT": str(harness.free_port()),  # the data endpoint (src/data): a port of its own, free too
        "WORKERS_HEALTHY": "2",
        "WORKER_THREADS": "1",
        # Fault tests run the same task twice and compare: the second run must do the work
        # again. The results cache has its own tests (test_cache.py), which turn it on.
        "CACHE_MB": "0",
    }
    yield config.load(values)
    delete_queues(prefix)


@pytest.fixture
def app(settings: Settings):
    """The app with its pipeline started (connected to the broker)."""
    application = create_app(settings)
    services_of(application).start()
    yield application
    services_of(application).close()



@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def live_server(app, settings: Settings) -> Iterator[str]:
    """The app behind the production server (waitress), as `make server` runs it, in a thread."""
    server = wsgi.create_server(app, settings)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    yield f"http://{settings.server_host}:{settings.server_port}"
    server.close()


@pytest.fixture
def browser():
    """Headless Chromium (Debian's), closed after the test."""
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--autoplay-policy=no-user-gesture-required"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    """A tab for our own page: any JavaScript error or Content-Security-Policy violation fails the test."""
    context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 1000})
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda error: errors.append(str(error)))
    # a page that breaks its own Content-Security-Policy only says so on the console
    tab.on("console", lambda message: "Content Security Policy" in message.text and errors.append(message.text))
    yield tab
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


@pytest.fixture
def make_song(tmp_path: Path):
    """make_song(seconds, fmt='mp3', title=None, artist=None) -> path of a stereo song made by ffmpeg."""

    def make(seconds: float = 8.0, fmt: str = "mp3", title: str | None = None, artist: str | None = None,
             name: str | None = None) -> Path:
        path = tmp_path / (name or f"song-{uuid.uuid4().hex[:6]}.{fmt}")
        return harness.make_song(path, seconds, title, artist)

    return make


class Cluster:
    """Real server and worker processes for one test, stopped at the end."""

    def __init__(self, settings: Settings, log_dir: Path):
        self.settings = settings
        self.log_dir = log_dir
        self.server: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self.base = f"http://{settings.server_host}:{settings.server_port}"

    def env(self, **overrides: str) -> dict[str, str]:
        return {**os.environ, **self.settings.as_env(), "PYTHONUNBUFFERED": "1",
                "CONFIG_FILE": "/nonexistent/config.yaml", **overrides}

    def _spawn(self, module: str, name: str, *args: str, **overrides: str) -> subprocess.Popen:
        log = (self.log_dir / f"{name}.log").open("ab")
        return subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=self.env(**overrides),
                                stdout=log, stderr=subprocess.STDOUT)

    def start_server(self) -> subprocess.Popen:
        self.server = self._spawn("src.server", "server")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if http.get(self.base + "/health")[0] == 200:
                    return self.server
            except OSError:
                pass
            if self.server.poll() is not None:
                raise RuntimeError(f"server exited: {self.log('server')[-2000:]}")
            time.sleep(0.2)
        raise RuntimeError("server did not answer /health in 60s")

    def start_worker(self, *args: str, **overrides: str) -> subprocess.Popen:
        worker = self._spawn("src.audio_worker", f"worker{len(self.workers)}", *args, **overrides)
        self.workers.append(worker)
        return worker

    def wait_workers(self, count: int, timeout: float = 60) -> list[dict]:
        def enough():
            workers = http.get_json(self.base + "/workers")
            return workers if len(workers) >= count else None

        return wait_for(enough, timeout, f"{count} workers on the panel")

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        for proc in [*self.workers, self.server]:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.wait(10)


@pytest.fixture
def cluster(settings: Settings, tmp_path: Path) -> Iterator[Cluster]:
    running = Cluster(settings, tmp_path)
    yield running
    running.stop()


@pytest.fixture
def least_privilege(settings: Settings) -> Iterator[Settings]:
    """`settings` with a server and a worker login of their own, provisioned as `make broker` does.

    Random user names and passwords, deleted (with the policies) afterwards; the queues are
    declared by the server login, so workers (which may not declare) can start first.
    """
    from src.messaging import accounts
    from src.messaging.broker import Broker

    tag = uuid.uuid4().hex[:8]
    # passwords that begin with "-", as make broker's random ones sometimes do
    server, worker = (f"test-server-{tag}", f"-{uuid.uuid4().hex}"), (f"test-worker-{tag}", f"-{uuid.uuid4().hex}")
    ctl = accounts.Ctl()
    accounts.provision(ctl, settings.queue_prefix, server, worker)
    try:
        provisioned = settings.with_overrides(broker_user=server[0], broker_password=server[1],
                                              broker_worker_user=worker[0], broker_worker_password=worker[1])
        Broker(provisioned, "provision").declare_topology(registry.queues(registry.names()))
        yield provisioned
    finally:
        accounts.remove(ctl, settings.queue_prefix, [server[0], worker[0]])
