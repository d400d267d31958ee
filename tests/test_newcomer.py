"""What a newcomer runs: the README's command in a fresh clone, with the default settings.

Every other test uses absolute temporary folders, which is how a relative STORAGE_DIR
once answered 500 on every download while the suite passed. This one clones the
repository, runs `make run` exactly as the README says (no STORAGE_DIR, no config
file; only a free port and a queue prefix of its own, so it can run beside other
tests), uploads a song, and downloads what the page offers.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import uuid
from pathlib import Path

import pytest

from bench.harness import free_port
from src.messaging import accounts
from tests.conftest import ROOT, delete_queues
from tests.helpers import get, get_json, post_json, upload, wait_for

README_COMMAND = "MODEL=demucs_unittest MODEL_SEGMENT=4 make run"


@pytest.fixture
def fresh_clone(tmp_path: Path) -> Path:
    clone = tmp_path / "karaoke"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True, timeout=120)
    # The clone shares this checkout's virtual environment (installing one is `make install`'s
    # business, which CI's fresh machine runs for real): make it look up to date.
    (clone / ".venv").symlink_to(ROOT / ".venv")
    os.utime(clone / "requirements.txt", (0, 0))
    return clone


def test_make_run_in_a_fresh_clone_serves_the_page_and_every_download(fresh_clone, make_song):
    readme = (fresh_clone / "README.md").read_text()
    assert README_COMMAND in readme, "the README's offline command changed: change this test with it"
    prefix, port = f"test-{uuid.uuid4().hex[:8]}", free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("STORAGE_DIR", "CONFIG_FILE")}
    env.update(dict(re.findall(r"(\w+)=(\S+)", README_COMMAND.removesuffix(" make run"))),
               QUEUE_PREFIX=prefix, SERVER_PORT=str(port))
    log = (fresh_clone.parent / "make-run.log").open("wb")
    run = subprocess.Popen(["make", "run"], cwd=fresh_clone, env=env, stdout=log, stderr=subprocess.STDOUT,
                           start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        def serving():
            assert run.poll() is None, (fresh_clone.parent / "make-run.log").read_text()[-3000:]
            try:
                return get(base + "/health")[0] == 200
            except OSError:
                return False

        wait_for(serving, 180, "make run to serve the page", interval=1)
        assert f"Open http://127.0.0.1:{port}/" in (fresh_clone.parent / "make-run.log").read_text()
        assert get(base + "/")[0] == 200
        wait_for(lambda: len(get_json(base + "/workers")) == 2, 120, "the two default workers")

        music = upload(base, make_song(6.0, "mp3"))
        assert post_json(f"{base}/music/{music['music_id']}", [t["track_id"] for t in music["tracks"]])[0] == 200
        status = wait_for(lambda: (s := get_json(f"{base}/music/{music['music_id']}"))["state"] == "done" and s,
                          180, "the song to be done")
        for url in [status["final"], *(i["track"] for i in status["instruments"])]:
            for fmt in ("mp3", "wav"):
                answer, body = get(f"{url}?format={fmt}&download=1")
                assert answer == 200 and len(body) > 10_000, (url, fmt, body[:200])
        assert (fresh_clone / "storage" / "tasks" / str(music["music_id"]) / "stems" / "mix.f32").is_file(), \
            "STORAGE_DIR's default is storage/ under the folder make run was started in"
        users = subprocess.run(["rabbitmqctl", "-q", "list_stomp_connections", "auth_login"], capture_output=True,
                               text=True, timeout=30).stdout.split()
        assert users.count(f"{prefix}-worker") == 2, "make run's workers use the least-privilege login make broker made"
        assert f"{prefix}-server" in users
    finally:
        os.killpg(run.pid, signal.SIGTERM)
        try:
            run.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait(10)
        delete_queues(prefix)
        # what `make broker` provisioned for this prefix (see broker-logins.yaml in the clone): its
        # logins and its virtual host, the queues in it included
        accounts.remove(accounts.Ctl(), prefix, [f"{prefix}-server", f"{prefix}-worker"], vhost=f"/{prefix}")
