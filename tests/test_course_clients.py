"""The course contract as other people's clients use it, over a real socket.

The calls are the ones their clients make, with their exact headers: `curl
--data-binary` (a form content type), `requests` with multipart and trailing slashes
(as the Postman collection writes the paths), links followed as they are, a page on
another local port asking first (CORS preflight). Plus the edge's own rules: security
headers, the host allow-list, proxies, the operator token.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import requests

from src.server import create_app
from tests.helpers import services_of, wait_for


def no_nulls_in_links(status: dict) -> None:
    assert status.get("final", "absent") is not None
    assert all(i.get("track", "absent") is not None for i in status["instruments"])


def test_a_whole_song_through_curl_and_requests(live_server, cluster, make_song):
    song = make_song(4.0, "mp3", title="Course Song", artist="Clients")
    curl = subprocess.run(["curl", "-sS", "--data-binary", f"@{song}", f"{live_server}/music"],
                          capture_output=True, text=True, timeout=60, check=True)
    music = json.loads(curl.stdout)
    assert (music["name"], music["band"]) == ("Course Song", "Clients")
    assert [t["name"] for t in music["tracks"]] == ["drums", "bass", "other", "vocals"]

    with song.open("rb") as f:  # multipart, and the collection's trailing slash
        second = requests.post(f"{live_server}/music/", files={"file": ("x.mp3", f)}, timeout=60)
    assert second.status_code == 200 and second.json()["music_id"] == music["music_id"] + 1
    assert [m["music_id"] for m in requests.get(f"{live_server}/music/", timeout=10).json()] == \
        [music["music_id"], music["music_id"] + 1]

    status = requests.get(f"{live_server}/music/{music['music_id']}/", timeout=10).json()
    assert "final" not in status and all("track" not in i for i in status["instruments"])
    no_nulls_in_links(status)

    other = second.json()["tracks"][0]["track_id"]
    foreign = requests.post(f"{live_server}/music/{music['music_id']}", json=[other], timeout=10)
    assert foreign.status_code == 405 and str(other) in foreign.json()["error"]

    cluster.start_worker()
    keep = [t["track_id"] for t in music["tracks"] if t["name"] != "vocals"]
    assert requests.post(f"{live_server}/music/{music['music_id']}/", json=keep, timeout=10).json() == {}
    status = wait_for(lambda: (s := requests.get(f"{live_server}/music/{music['music_id']}", timeout=10).json())
                      ["state"] == "done" and s, 120, "the song to be done")
    no_nulls_in_links(status)
    assert status["final"] == f"{live_server}/music/{music['music_id']}/final"
    for url in [status["final"], *(i["track"] for i in status["instruments"])]:
        answer = requests.get(url, timeout=60)  # followed exactly as given
        assert answer.status_code == 200 and answer.headers["Content-Type"] == "audio/mpeg"

    job_ids = requests.get(f"{live_server}/job/", timeout=10).json()
    assert job_ids
    for job_id in job_ids:
        job = requests.get(f"{live_server}/job/{job_id}", timeout=10).json()
        assert isinstance(job["time"], float) and 0 < job["time"] < 600, "seconds, not milliseconds"


def test_a_page_on_another_local_port_may_ask_and_others_may_not(live_server):
    asked = requests.options(f"{live_server}/music", timeout=10, headers={
        "Origin": "http://localhost:8080", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,x-filename"})
    assert asked.status_code == 200
    assert asked.headers["Access-Control-Allow-Origin"] == "http://localhost:8080"
    assert "POST" in asked.headers["Access-Control-Allow-Methods"]
    listed = requests.get(f"{live_server}/music", headers={"Origin": "http://127.0.0.1:3000"}, timeout=10)
    assert listed.headers["Access-Control-Allow-Origin"] == "http://127.0.0.1:3000"

    stranger = requests.get(f"{live_server}/music", headers={"Origin": "https://evil.example"}, timeout=10)
    assert "Access-Control-Allow-Origin" not in stranger.headers
    refused = requests.post(f"{live_server}/reset", headers={"Origin": "https://evil.example"}, timeout=10)
    assert refused.status_code == 403 and "evil.example" in refused.json()["error"]
    forged = requests.post(f"{live_server}/reset", headers={"Sec-Fetch-Site": "cross-site"}, timeout=10)
    assert forged.status_code == 403


def test_configured_origins_are_allowed(settings):
    app = create_app(settings.with_overrides(cors_origins="https://karaoke.example"))
    try:
        answer = app.test_client().get("/music", headers={"Origin": "https://karaoke.example"})
        assert answer.headers["Access-Control-Allow-Origin"] == "https://karaoke.example"
    finally:
        services_of(app).close()


def test_every_answer_carries_the_security_headers(client):
    for path in ("/", "/music", "/music/424242", "/web/app.js"):
        headers = client.get(path).headers
        assert "script-src 'self'" in headers["Content-Security-Policy"]
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["X-Frame-Options"] == "DENY"


def test_an_unknown_host_is_refused(client):
    """DNS rebinding: a page on evil.example resolved to 127.0.0.1 sends Host: evil.example."""
    answer = client.get("/music", headers={"Host": "evil.example"})
    assert answer.status_code == 400
    assert client.get("/music", headers={"Host": "127.0.0.1:5000"}).status_code == 200


def test_links_follow_the_proxy_only_when_told_to_trust_it(settings):
    forwarded = {"X-Forwarded-Host": "karaoke.example", "X-Forwarded-Proto": "https"}
    for proxies, expected in ((0, "http://localhost/music/1/final"), (1, "https://karaoke.example/music/1/final")):
        app = create_app(settings.with_overrides(trusted_proxies=proxies, allowed_hosts="karaoke.example"))
        try:
            store = services_of(app).store
            media = store.create_media("song", 10, 1.0, {"video": None, "audio": None, "tags": {}})
            task = store.create_task("separate", media.id, {"keep": []}, "0" * 32, "queued", ["drums", "mix"])
            store.mark_done(task.id)  # links appear once a song is done
            status = app.test_client().get("/music/1", headers=forwarded).get_json()
            assert status["final"] == expected
            assert status["instruments"][0]["track"].startswith(expected.removesuffix("final"))
        finally:
            services_of(app).close()


@pytest.mark.parametrize("host, token, sent, status", [
    ("127.0.0.1", "", None, 200),
    ("0.0.0.0", "", None, 403),
    ("0.0.0.0", "s3cret", None, 403),
    ("0.0.0.0", "s3cret", "wrong", 403),
    ("0.0.0.0", "s3cret", "s3cret", 200),
])
def test_reset_is_an_operator_action_beyond_loopback(settings, host, token, sent, status):
    app = create_app(settings.with_overrides(server_host=host, operator_token=token))
    services_of(app).start()  # a reset reaches the workers through the broker
    try:
        headers = {"Authorization": f"Bearer {sent}"} if sent else {}
        answer = app.test_client().post("/reset", headers=headers)
        assert answer.status_code == status, answer.get_json()
    finally:
        services_of(app).close()
