"""The claim check (issue 24): jobs and results carry references, the bytes travel over the data endpoint.

The pure parts (capabilities, the schema's body rules, the server store with its
endpoint on a real socket) are `unit`. The rest runs the real server process and the real
broker: a rogue consumer with a worker's login takes a job off the queue (it carries no
media, only references) and uses its references against the server's data endpoint, the
way a worker would and the ways a hostile one might; a real worker then runs a song end
to end, and its task's inputs and results are gone from the store once it is done.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
import requests

from bench import harness
from src import config
from src.data import capability, client
from src.data.capability import Refused
from src.data.endpoint import DataEndpoint, create_server
from src.data.local import ServerStore
from src.messaging.destinations import Destinations
from src.messaging.schema import MAX_BODY_BYTES, JobMessage, MalformedMessage, ResultMessage, decode
from tests.conftest import Cluster
from tests.helpers import get_json, request, wait_for
from tests.test_faults import assert_whole, start_song
from tests.test_fuzz import read_dead_queue
from tests.test_trust import announce, stomp_login

SECRET = b"k" * 32
TOKEN = uuid.uuid4().hex

# -- capabilities ------------------------------------------------------------------------------


@pytest.mark.unit
def test_a_reference_is_valid_only_for_its_job_attempt_direction_and_time():
    expires = capability.expiry()
    signature = capability.sign(SECRET, 7, TOKEN, "read", expires)
    capability.verify(SECRET, 7, TOKEN, "read", expires, signature)  # the genuine one passes
    refusals = {
        "another job": lambda: capability.verify(SECRET, 8, TOKEN, "read", expires, signature),
        "another attempt": lambda: capability.verify(SECRET, 7, uuid.uuid4().hex, "read", expires, signature),
        "the other direction": lambda: capability.verify(SECRET, 7, TOKEN, "write", expires, signature),
        "a later expiry": lambda: capability.verify(SECRET, 7, TOKEN, "read", expires + 3600, signature),
        "a tampered signature": lambda: capability.verify(SECRET, 7, TOKEN, "read", expires,
                                                          signature[:-1] + ("0" if signature[-1] != "0" else "1")),
        "another secret": lambda: capability.verify(b"x" * 32, 7, TOKEN, "read", expires, signature),
        "expired": lambda: capability.verify(SECRET, 7, TOKEN, "read", 1000,
                                             capability.sign(SECRET, 7, TOKEN, "read", 1000)),
    }
    for what, attempt in refusals.items():
        with pytest.raises(Refused) as refused:
            attempt()
        assert refused.value.status == 403, what


@pytest.mark.unit
def test_the_secret_is_made_once_kept_private_and_never_read_through_a_link(tmp_path):
    first = capability.load_secret("", tmp_path / "data")
    assert capability.load_secret("", tmp_path / "data") == first, "references survive a restart"
    assert (tmp_path / "data" / "secret").stat().st_mode & 0o777 == 0o600
    assert capability.load_secret("s" * 20, tmp_path / "elsewhere") == b"s" * 20
    with pytest.raises(ValueError):
        capability.load_secret("short", tmp_path / "elsewhere")
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "secret").symlink_to(tmp_path / "data" / "secret")
    with pytest.raises(ValueError, match="symbolic link"):
        capability.load_secret("", linked)


@pytest.mark.unit
def test_settings_keep_the_secret_from_child_processes_and_find_the_data_endpoint(tmp_path):
    settings = config.load({"CONFIG_FILE": str(tmp_path / "none.yaml"), "SERVER_PORT": "6000",
                            "DATA_SECRET": "s" * 20})
    assert settings.data_port == 6001 and settings.data_address == "http://127.0.0.1:6001"
    assert "DATA_SECRET" not in settings.as_env(), "a worker started by a supervisor never holds the secret"
    # the data endpoint may listen where workers reach it while the page's API stays on loopback
    public = config.load({"CONFIG_FILE": "/none", "SERVER_PORT": "6000", "DATA_HOST": "0.0.0.0"})
    assert public.server_host == "127.0.0.1" and public.data_host == "0.0.0.0"
    assert public.data_address == f"http://{socket.getfqdn()}:6001"
    assert settings.data_host == settings.server_host == "127.0.0.1"
    assert config.load({"CONFIG_FILE": "/none", "DATA_URL": "https://data.example/x/"}).data_address == \
        "https://data.example/x"
    for bad in ({"DATA_STORE": "ftp://x"}, {"DATA_URL": "data.example"}):
        with pytest.raises(ValueError):
            config.load({"CONFIG_FILE": "/none", **bad})


# -- the schema: control only ----------------------------------------------------------------------


def _job() -> JobMessage:
    return JobMessage("separate", 1, 2, 0, uuid.uuid4().hex, TOKEN, {"a": 1}, payload=b"\0" * 100_000,
                      input_ref="http://127.0.0.1:1/inputs/2?t=x", input_size=100_000, input_sha256="a" * 64,
                      result_ref="http://127.0.0.1:1/results/2?t=x")


@pytest.mark.unit
def test_jobs_and_results_carry_no_media_and_a_bulky_body_is_refused():
    job = _job()
    assert job.body() == b"" and "encoding" not in job.headers(), "no bytes, no base64"
    assert sum(len(k) + len(v) for k, v in job.headers().items()) < 1500, "a job message is a few hundred bytes"
    decoded = decode(job.headers(), job.body())
    assert (decoded.input_ref, decoded.input_size, decoded.result_ref) == (job.input_ref, 100_000, job.result_ref)
    assert decoded.payload == b"", "the input is fetched, not decoded from the frame"
    result = ResultMessage("separate", 1, 2, job.task_token, TOKEN, "w1", 1, 5, {}, b"x" * 10, result_size=10,
                           result_sha256="b" * 64)
    assert result.body() == b"" and decode(result.headers(), b"").result_size == 10
    refused = {
        "a job with its bytes in the frame": (job.headers(), b"abc"),
        "a bulky body": (job.headers(), b"x" * (MAX_BODY_BYTES + 1)),
        "a bulky presence": ({"type": "presence"}, b"{" * (MAX_BODY_BYTES + 1)),
        "a reference that is no URL": ({**job.headers(), "input": "file:///etc/passwd"}, b""),
        "a reference too long": ({**job.headers(), "result": "http://x/" + "a" * 3000}, b""),
        "a size out of range": ({**job.headers(), "input-size": "-1"}, b""),
        "a digest that is no digest": ({**job.headers(), "input-sha256": "z" * 64}, b""),
        "a result without its digest": ({k: v for k, v in result.headers().items() if k != "result-sha256"}, b""),
        "a result with a body": (result.headers(), b"x" * 10),
    }
    for what, (headers, body) in refused.items():
        with pytest.raises(MalformedMessage):
            decode(headers, body)
            pytest.fail(what)
    with pytest.raises(MalformedMessage, match="data store"):
        decode(job.headers(), b"x" * (MAX_BODY_BYTES + 1))


# -- the server store behind its endpoint, on a real socket ------------------------------------------


class Endpoint:
    """A ServerStore served by the data endpoint (waitress) on a free port, with an `admit` that
    answers from a dict of outstanding attempts: job -> tokens (the server's store does it for real
    in the tests further down)."""

    def __init__(self, root: Path, limit: int = 1 << 20):
        self.outstanding: dict[int, set[str]] = {}
        port = harness.free_port()
        settings = config.load({"CONFIG_FILE": "/none", "STORAGE_DIR": str(root), "DATA_PORT": str(port)})
        self.store = ServerStore(root / "data", settings.data_address, SECRET)
        self.server = create_server(DataEndpoint(self.store, self.admit, lambda job: limit), settings)
        threading.Thread(target=self.server.run, daemon=True).start()

    def admit(self, job_id: int, token: str, direction: str) -> None:
        if token not in self.outstanding.get(job_id, set()):
            raise Refused(410, f"that attempt of job {job_id} is not outstanding")


@pytest.fixture
def endpoint(tmp_path):
    served = Endpoint(tmp_path)
    yield served
    served.server.close()


@pytest.mark.unit
def test_an_input_is_read_whole_or_by_range_and_a_result_uploads_in_resumable_idempotent_pieces(endpoint):
    store, body = endpoint.store, os.urandom(300_000)
    store.put_input(5, body)
    endpoint.outstanding[5] = {TOKEN}
    ref = store.input_ref(5, TOKEN)
    assert client.fetch(ref, len(body), hashlib.sha256(body).hexdigest()) == body
    ranged = requests.get(ref, headers={"Range": "bytes=1000-1999"}, timeout=10)
    assert ranged.status_code == 206 and ranged.content == body[1000:2000]
    assert ranged.headers["Content-Range"] == f"bytes 1000-1999/{len(body)}"
    tail = requests.get(ref, headers={"Range": "bytes=-10"}, timeout=10)
    assert tail.status_code == 206 and tail.content == body[-10:]
    beyond = requests.get(ref, headers={"Range": f"bytes={len(body)}-"}, timeout=10)
    assert beyond.status_code == 416 and "error" in beyond.json()
    with pytest.raises(client.DataRefused):
        client.fetch(ref, len(body), "0" * 64)  # the bytes are not the ones the job names

    result, put = os.urandom(250_000), store.result_ref(5, TOKEN)
    first = requests.put(put, data=result[:100_000], headers={"Content-Range": f"bytes 0-99999/{len(result)}"},
                         timeout=10)
    assert first.status_code == 202 and first.json()["received"] == 100_000
    assert requests.head(put, timeout=10).headers["X-Received"] == "100000", "how much arrived, to resume"
    assert store.get_result(5, TOKEN) is None, "half a result is never read"
    gap = requests.put(put, data=result[200_000:], headers={"Content-Range": f"bytes 200000-249999/{len(result)}"},
                       timeout=10)
    assert gap.status_code == 416 and gap.json()["error"]
    # the client resumes where the store says, and finishes it
    assert client.upload(put, result, piece=100_000)["complete"]
    assert store.get_result(5, TOKEN) == result
    again = client.upload(put, result, piece=1 << 20)
    assert again["unchanged"], "the same result again changes nothing"
    assert requests.put(put, data=result, timeout=10).status_code == 200
    assert store.get_result(5, TOKEN) == result
    assert sorted(p.name for p in (store.root / "results").iterdir()) == [f"5.{TOKEN}"], "one object"
    assert not list((store.root / "partial").iterdir())


@pytest.mark.unit
def test_the_endpoint_refuses_every_request_without_its_capability(endpoint):
    store = endpoint.store
    store.put_input(5, b"five" * 100)
    store.put_input(6, b"six" * 100)
    endpoint.outstanding.update({5: {TOKEN}, 6: {TOKEN}})
    read, write = store.input_ref(5, TOKEN), store.result_ref(5, TOKEN)
    query = urlsplit(read).query
    base = store.base_url

    def sig(ref: str, direction: str, expires: int) -> str:
        return urlencode({"t": TOKEN, "e": expires, "s": capability.sign(SECRET, 5, TOKEN, direction, expires)})

    refused = {
        "another job's input with this job's reference": ("GET", f"{base}/inputs/6?{query}", 403),
        "a tampered signature": ("GET", read[:-1] + ("0" if read[-1] != "0" else "1"), 403),
        "no reference": ("GET", f"{base}/inputs/5", 403),
        "an expired reference": ("GET", f"{base}/inputs/5?{sig(read, 'read', int(time.time()) - 1)}", 403),
        "a write with a read reference": ("PUT", f"{base}/results/5?{query}", 403),
        "a write to the input": ("PUT", read, 403),
        "a read of the input with a write reference": ("GET", f"{base}/inputs/5?{urlsplit(write).query}", 403),
        "a delete": ("DELETE", write, 403),
        "a traversal": ("GET", f"{base}/inputs/../secret?{query}", 404),
        "an encoded traversal": ("GET", f"{base}/inputs/5%2F..%2F..%2Fsecret?{query}", 404),
        "an odd name": ("GET", f"{base}/results/5.{TOKEN}?{query}", 404),
        "the secret": ("GET", f"{base}/secret", 404),
    }
    for what, (method, url, status) in refused.items():
        answer = requests.request(method, url, data=b"x" if method == "PUT" else None, timeout=10)
        assert answer.status_code == status, (what, answer.status_code, answer.text)
        assert answer.json()["error"], what
    endpoint.outstanding[5] = set()  # the attempt closed (failed, or its job done elsewhere)
    for method, url in (("GET", read), ("PUT", write)):
        answer = requests.request(method, url, data=b"late", timeout=10)
        assert answer.status_code == 410 and "not outstanding" in answer.json()["error"]
    with pytest.raises(client.DataRefused) as late:
        client.upload(write, b"late")
    assert late.value.status == 410
    assert not list((store.root / "results").iterdir()) and not list((store.root / "partial").iterdir())


@pytest.mark.unit
def test_a_result_over_its_kinds_limit_is_refused(tmp_path):
    served = Endpoint(tmp_path, limit=1000)
    try:
        served.outstanding[1] = {TOKEN}
        answer = requests.put(served.store.result_ref(1, TOKEN), data=b"x" * 1001, timeout=10)
        assert answer.status_code == 413 and "1000" in answer.json()["error"]
        piece = requests.put(served.store.result_ref(1, TOKEN), data=b"x" * 10,
                             headers={"Content-Range": "bytes 0-9/5000"}, timeout=10)
        assert piece.status_code == 413, "the whole's size counts, not the piece's"
    finally:
        served.server.close()


@pytest.mark.unit
def test_a_sweep_keeps_only_live_jobs_and_deleting_a_job_takes_its_input_and_results(tmp_path):
    store = ServerStore(tmp_path / "data", "http://127.0.0.1:1", SECRET)
    for job in (1, 2, 3):
        store.put_input(job, b"in")
        store.receive(job, TOKEN, 0, 3, _Reader(b"out"), 3)
    (store.inputs / ".4.leftover.tmp").write_bytes(b"")
    assert store.sweep({1, 2}) == 3, "job 3's input and result, and the leftover"
    store.delete_jobs([2])
    assert sorted(p.name for p in store.inputs.iterdir()) == ["1"]
    assert [p.name for p in store.results.iterdir()] == [f"1.{TOKEN}"]


class _Reader:
    def __init__(self, data: bytes):
        self.data = data

    def read(self, n: int) -> bytes:
        block, self.data = self.data[:n], self.data[n:]
        return block


# -- with the real server and broker ---------------------------------------------------------------


def holds_nothing(data_dir: Path) -> bool:
    return not any(entry for folder in ("inputs", "results", "partial") for entry in (data_dir / folder).iterdir())


def _taken_job(settings, cluster, make_song):
    """A song whose first job a rogue consumer (a worker's login) took off the queue: (frame, music id, conn)."""
    hole, frames = stomp_login(settings, *settings.worker_login)
    announce(hole, settings)
    hole.subscribe(Destinations(settings.queue_prefix).worker_jobs("separate"), id="1", ack="client-individual",
                   headers={"prefetch-count": "2"})
    music_id = start_song(cluster.base, make_song(6.0, "wav"))
    wait_for(lambda: len(frames.messages) >= 2, 60, "the rogue consumer to take two jobs")
    return frames.messages[0], frames.messages[1], music_id, hole


def test_a_job_on_the_broker_names_its_input_and_its_references_are_capabilities(least_privilege, tmp_path,
                                                                                   make_song):
    settings = least_privilege
    cluster = Cluster(settings, tmp_path)
    try:
        cluster.start_server()
        frame, other, music_id, hole = _taken_job(settings, cluster, make_song)
        h = frame.headers
        assert not frame.body, "a job message carries no media"
        job_id, size, digest = int(h["job-id"]), int(h["input-size"]), h["input-sha256"]
        assert size > 100_000, "the input (seconds of float32 audio) travels apart"
        assert urlsplit(h["input"]).port == settings.data_port, "the data endpoint, not the page's API"

        # the round trip: the input as the job names it; a range of it
        body = client.fetch(h["input"], size, digest)
        ranged = requests.get(h["input"], headers={"Range": "bytes=100-4099"}, timeout=10)
        assert ranged.status_code == 206 and ranged.content == body[100:4100]

        # each refusal, by the server's own store of attempts
        other_job = int(other.headers["job-id"])
        query = urlsplit(h["input"]).query
        secret = capability.load_secret("", settings.storage_dir / "data")  # the test reads the server's key
        token = parse_qs(query)["t"][0]
        expired = capability.sign(secret, job_id, token, "read", 1000)
        data = settings.data_address
        refused = {
            "another job's input with a valid reference of this job": ("GET", f"{data}/inputs/{other_job}?{query}",
                                                                       403),
            "an expired reference": ("GET", f"{data}/inputs/{job_id}?t={token}&e=1000&s={expired}", 403),
            "a tampered signature": ("GET", h["input"][:-2] + ("00" if not h["input"].endswith("00") else "11"), 403),
            "a write with a read reference": ("PUT", f"{data}/results/{job_id}?{query}", 403),
            "a traversal": ("GET", f"{data}/inputs/..%2Fsecret?{query}", 404),
            "an attempt the server never issued": (
                "GET", f"{data}/inputs/{job_id}?" + urlencode({"t": "0" * 32, "e": 2**40, "s": capability.sign(
                    secret, job_id, "0" * 32, "read", 2**40)}), 410),
        }
        for what, (method, url, status) in refused.items():
            answer = requests.request(method, url, data=b"x" if method == "PUT" else None, timeout=10)
            assert answer.status_code == status, (what, answer.status_code, answer.text)
            assert json.loads(answer.text)["error"], what

        # a resumed upload, and the same upload again, applied once
        result = os.urandom(64_000)
        half = requests.put(h["result"], data=result[:20_000],
                            headers={"Content-Range": f"bytes 0-19999/{len(result)}"}, timeout=10)
        assert half.status_code == 202
        assert client.upload(h["result"], result, piece=20_000)["complete"]
        assert client.upload(h["result"], result)["unchanged"]

        # a bulky STOMP body is refused and parked with the reason
        d = Destinations(settings.queue_prefix, settings.worker_login[0])
        hole.send(d.results_route, b"x" * (MAX_BODY_BYTES + 100), headers={"type": "result"})
        parked = read_dead_queue(settings, 1)
        assert any("more than" in p.get("x-refused-reason", "") for p in parked), parked

        # once the task is over, nothing more is written nor read, and its data is gone
        status, _ = request("DELETE", f"{cluster.base}/tasks/{music_id}")
        assert status in (200, 202, 204)
        late = requests.put(h["result"], data=result, timeout=10)
        assert late.status_code in (404, 410), late.text
        assert requests.get(h["input"], timeout=10).status_code in (404, 410)
        data_dir = settings.storage_dir / "data"
        wait_for(lambda: holds_nothing(data_dir), 30, "the task's inputs and results deleted")
        hole.disconnect()
    finally:
        cluster.stop()


def test_a_song_goes_through_the_data_plane_and_leaves_nothing_behind(cluster, make_song):
    cluster.start_server()
    cluster.start_worker()
    cluster.wait_workers(1)
    song = make_song(5.0, "wav")
    music_id = start_song(cluster.base, song)
    assert_whole(cluster.base, music_id, song)
    jobs = get_json(f"{cluster.base}/job")
    assert jobs, "the song ran in jobs"
    log = cluster.log("worker0")
    assert "could not be fetched" not in log and "could not be stored" not in log
    data_dir = cluster.settings.storage_dir / "data"
    wait_for(lambda: holds_nothing(data_dir), 30, "the done task's inputs and results deleted")
    # a restart sweeps what a previous run left, and keeps its secret
    secret = (data_dir / "secret").read_bytes()
    (data_dir / "inputs" / "999999").write_bytes(b"left over")
    cluster.server.kill()
    cluster.server.wait(10)
    cluster.start_server()
    wait_for(lambda: not (data_dir / "inputs" / "999999").exists(), 30, "the sweep at start")
    assert (data_dir / "secret").read_bytes() == secret
