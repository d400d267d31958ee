"""Each deployment its own virtual host: what `make broker` provisions, and what its logins see.

`python -m src.messaging.accounts` (what `make broker` runs) provisions a fresh QUEUE_PREFIX
with a logins file of the test's own, on the real RabbitMQ; a server in this process and a real
worker process then run a song in that virtual host. Deleted afterwards (the virtual host with
its queues, the logins). The rest of the suite stays on "/" with guest and a prefix per test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import requests
import stomp
import yaml

from src import config
from src.messaging import accounts
from src.server import create_app
from src.server.queues import QueueMonitor
from tests.conftest import ROOT, Cluster
from tests.helpers import services_of, wait_for

MANAGEMENT = "http://localhost:15672"


def test_make_broker_gives_a_deployment_its_own_virtual_host_and_its_logins_see_only_it(tmp_path: Path, make_song):
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    env = {"CONFIG_FILE": str(tmp_path / "none.yaml"), "QUEUE_PREFIX": prefix,
           "BROKER_LOGINS_FILE": str(tmp_path / "logins.yaml"), "STORAGE_DIR": str(tmp_path / "storage"),
           "MODEL": "demucs_unittest", "MODEL_SEGMENT": "2", "CHUNK_SECONDS": "3", "BROKER_HEARTBEAT_MS": "2000",
           "WORKER_THREADS": "1", "CACHE_MB": "0"}
    provisioned = subprocess.run([sys.executable, "-m", "src.messaging.accounts", "--worker-login", "host-a.lan"],
                                 cwd=ROOT, env={**os.environ, **env},
                                 capture_output=True, text=True, timeout=300)
    settings = config.load(env)
    vhost = f"/{prefix}"
    host_user = f"{prefix}-worker-host-a-lan"
    try:
        assert provisioned.returncode == 0, provisioned.stderr[-2000:]
        assert settings.broker_vhost == vhost and settings.server_login[0] == f"{prefix}-server", settings
        assert f"BROKER_WORKER_USER={host_user}" in provisioned.stdout and f"BROKER_VHOST={vhost}" in provisioned.stdout

        # the server's management login lists this deployment's queues and nothing of any other
        listed = requests.get(f"{MANAGEMENT}/api/queues", auth=settings.server_login, timeout=30).json()
        assert listed and {q["vhost"] for q in listed} == {vhost}, {q["vhost"] for q in listed}
        assert f"{prefix}.results" in {q["name"] for q in listed}
        assert requests.get(f"{MANAGEMENT}/api/queues/%2F", auth=settings.server_login, timeout=30).status_code \
            in (401, 403), "the server's login reads the shared virtual host"
        snapshot = QueueMonitor(settings).poll()
        assert snapshot["error"] is None and {q["role"] for q in snapshot["queues"]} >= {"results", "dead"}

        # no login of the deployment may use "/" any more
        for login in (settings.server_login, settings.worker_login):
            conn = stomp.Connection12([(settings.broker_host, settings.broker_port)], vhost="/")
            try:
                conn.connect(*login, wait=True)
                refused = False
            except stomp.exception.ConnectFailedException:
                refused = True
            finally:
                if conn.is_connected():
                    conn.disconnect()
            assert refused, f"{login[0]} connected to '/'"

        # and the deployment works there: a song through a real worker of the host's own login
        app = create_app(settings)
        services_of(app).start()
        cluster = Cluster(settings, tmp_path)
        try:
            entries = yaml.safe_load((tmp_path / "logins.yaml").read_text())  # the host's password is there
            password = entries[prefix]["workers"]["host-a.lan"]["BROKER_WORKER_PASSWORD"]
            cluster.start_worker(BROKER_WORKER_USER=host_user, BROKER_WORKER_PASSWORD=password,
                                 WORKER_KINDS="separate")
            client = app.test_client()
            wait_for(lambda: client.get("/workers").get_json(), 60, "the worker in the deployment's virtual host")
            music = client.post("/music", data=make_song(4.0, "wav").read_bytes(),
                                content_type="application/octet-stream").get_json()
            client.post(f"/music/{music['music_id']}", json=[])
            wait_for(lambda: client.get(f"/music/{music['music_id']}").get_json()["state"] == "done", 120, "the song")
        finally:
            cluster.stop()
            services_of(app).close()
    finally:
        accounts.remove(accounts.Ctl(), prefix, [f"{prefix}-server", f"{prefix}-worker", host_user], vhost=vhost)
    vhosts = requests.get(f"{MANAGEMENT}/api/vhosts", auth=("guest", "guest"), timeout=30).json()
    assert vhost not in {v["name"] for v in vhosts}, "the test's virtual host is gone"
