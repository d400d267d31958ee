"""Fuzzing with a worker's login: hostile messages on every destination a worker may write, while a song runs.

A few hundred malformed and forged results, failures and presence messages go to the
results route and the presence topic (the only destinations a worker login may write,
tests/test_trust.py). The song must still come out exact, no process may die, the
operator endpoints must answer 200 with valid JSON throughout, and every bad message
must be parked on the dead queue with its reason.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import struct
import time
import uuid

import stomp

from src.messaging.destinations import Destinations
from src.messaging.schema import MAX_BODY_BYTES, PresenceMessage
from tests.conftest import Cluster
from tests.helpers import get, get_json, metric, wait_for
from tests.test_faults import SLOW, assert_whole, start_song
from tests.test_trust import stomp_login


def results(rng: random.Random, task_id: int, job_ids: list[int], token: str) -> list[tuple[dict, bytes]]:
    """Hostile results and failures: each one malformed, forged or not fitting its job. A result
    names the bytes it stored (the claim check): size and SHA-256, no body."""
    floats = lambda values: struct.pack(f"<{len(values)}f", *values)  # noqa: E731

    def named(stored: bytes) -> dict:
        return {"result-size": str(len(stored)), "result-sha256": hashlib.sha256(stored).hexdigest()}

    def base(reshape: dict | None = None, stored: bytes = floats([0.0] * 32), **changes) -> dict:
        job = rng.choice(job_ids)
        shape = {"out_start": 0, "sources": ["drums", "bass", "other", "vocals"], "channels": 2, "frames": 4}
        headers = {"type": "result", "kind": "separate", "task-id": str(task_id), "job-id": str(job),
                   "task-token": token, "attempt-token": uuid.uuid4().hex, "worker": "fuzzer", "attempt": "1",
                   "compute-ms": "5", "params": json.dumps({**shape, **(reshape or {})}), "version": "",
                   "cpu-ms": "0", "energy-mj": "0", "energy-source": "estimated", **named(stored)}
        headers.update(changes)
        return {k: v for k, v in headers.items() if v is not None}

    good_body = b""
    messages = [
        ({}, rng.randbytes(64)),
        ({"type": "result"}, b""),
        (base(**{"task-id": "abc"}), good_body),
        (base(**{"task-id": "-1"}), good_body),
        (base(**{"task-id": "99999999999999999999999"}), good_body),
        (base(**{"job-id": "9223372036854775808"}), good_body),
        (base({"channels": -1, "frames": -2}, b"12345678"), good_body),
        (base({"channels": 1000000, "frames": 1000000000}), good_body),
        (base({"frames": 0}, b""), good_body),
        (base({"channels": 1}, floats([0.0] * 16)), good_body),  # one channel instead of two
        (base(stored=floats([math.nan] * 32)), good_body),
        (base(stored=floats([math.inf] * 32)), good_body),
        (base(), floats([0.0] * 32)),  # the bytes in the frame, as before the claim check
        (base(), rng.randbytes(MAX_BODY_BYTES + 1)),  # a bulky body
        (base(**{"result-size": "-1"}), good_body),
        (base(**{"result-sha256": "g" * 64}), good_body),
        (base({"sources": ["drums", "bass"]}, floats([0.0] * 16)), good_body),
        (base({"sources": ["x"] * 100}), good_body),
        (base(params="{not json"), good_body),
        (base(params="[1, 2]"), good_body),
        (base(params="x" * 10_000), good_body),
        (base(kind="transcode"), good_body),
        (base(encoding="base64"), floats([0.0] * 32)),
        (base(**{"compute-ms": "1e9"}), good_body),
        (base(**{"task-token": "0" * 32}), good_body),  # forged task token
        (base(), good_body),  # forged attempt token
        (base(worker="x" * 5000), good_body),
        (base(type="failure", error="attacker's text", final="true", params=None), b""),  # forged
        (base(type="failure", error="x\x01y", final="maybe"), b""),
        (base(type="failure", error="e" * 10_000, final="true"), b""),
        (base(type="job"), good_body),
        (base(type="control", action="reset", **{"task-ids": "999999999"}), b""),
        (base(type="presence"), b"{}"),
        (base(type="?" * 300), rng.randbytes(10)),
    ]
    hostile = [messages[i % len(messages)] for i in range(200)]
    return [(h, b if i < len(messages) else (b + rng.randbytes(rng.randrange(0, 4)) if b else b))
            for i, (h, b) in enumerate(hostile)]


def presences(rng: random.Random, live_worker: str, job_id: int) -> list[bytes]:
    """Hostile presence bodies."""
    valid = json.loads(PresenceMessage(
        worker=live_worker, host="h", address="a", pid=1, state="idle", job_id=None, task_id=None, jobs_done=0,
        mean_job_seconds=None, model="demucs_unittest", sent_at=time.time(), kinds=("separate",),
        session=uuid.uuid4().hex).body())  # another session than the worker's: well formed, but forged
    variants = [
        {**valid, "state": "leaving"},  # forged goodbye of a live worker
        {**valid, "state": "busy", "job_id": job_id, "task_id": 1},  # forged attempt in the timeline
        {**valid, "worker": 12345},
        {**valid, "worker": ["a"]},
        {**valid, "pid": "1"},
        {**valid, "pid": True},
        {**valid, "pid": -5},
        {**valid, "jobs_done": 2**70},
        {**valid, "job_id": 2**63},
        {**valid, "state": "dancing"},
        {**valid, "session": "short"},
        {**valid, "extra": 1},
        {k: v for k, v in valid.items() if k != "host"},
        {**valid, "host": "h" * 10_000},
        {**valid, "cpu_percent": -1.0},
        {**valid, "host_memory_percent": 101},
        {**valid, "memory_bytes": 1.5},
        {**valid, "gpu_percent": 250},
        {**valid, "gpu_memory_bytes": -1},
        {**valid, "precision": "fp8"},
        {**valid, "jobs_by_kind": {"separate": -1}},
        {**valid, "jobs_by_kind": {f"kind{i}": 1 for i in range(1000)}},
    ]
    bodies = [json.dumps(v).encode() for v in variants]
    bodies += [json.dumps(valid).replace('"mean_job_seconds": null', '"mean_job_seconds": NaN').encode(),
               json.dumps(valid).replace('"sent_at": ', '"sent_at": Infinity, "x": ').encode(),
               b"[1, 2, 3]", b"null", b"", b"{" * 5000, rng.randbytes(100)]
    return [bodies[i % len(bodies)] for i in range(100)]


def operator_endpoints_answer(base: str) -> None:
    for path in ("/workers", "/health"):
        status, body = get(base + path)
        assert status == 200, (path, status, body[:300])
        json.loads(body)  # valid JSON: no NaN, no Infinity
    status, _ = get(base + "/metrics")
    assert status == 200


def test_hostile_messages_from_a_worker_login_are_parked_and_the_song_comes_out_exact(
        least_privilege, tmp_path, make_song, capsys):
    settings = least_privilege
    cluster = Cluster(settings, tmp_path)
    try:
        cluster.start_server()
        workers = [cluster.start_worker(**SLOW), cluster.start_worker(**SLOW)]
        live = cluster.wait_workers(2)
        song = make_song(8.0, "wav")
        music_id = start_song(cluster.base, song)
        wait_for(lambda: get_json(f"{cluster.base}/music/{music_id}")["jobs_total"] > 0, 30, "its jobs (once decoded)")
        token_free_jobs = get_json(f"{cluster.base}/job")

        rng = random.Random(16)
        d = Destinations(settings.queue_prefix, settings.worker_login[0])  # its own routes: the broker allows those
        sent = {"results": 0, "presence": 0}
        conn, frames = stomp_login(settings, *settings.worker_login)
        for index, (headers, body) in enumerate(results(rng, music_id, token_free_jobs, uuid.uuid4().hex)):
            conn.send(d.results_route, body, headers=headers)
            sent["results"] += 1
            if index % 25 == 0:
                operator_endpoints_answer(cluster.base)
        for index, body in enumerate(presences(rng, live[0]["worker"], token_free_jobs[0])):
            conn.send(d.presence, body, headers={"type": "presence"})
            sent["presence"] += 1
            if index % 25 == 0:
                operator_endpoints_answer(cluster.base)
        conn.disconnect()
        assert not frames.errors, frames.errors  # the broker took them all: the server had to cope

        assert_whole(cluster.base, music_id, song)
        operator_endpoints_answer(cluster.base)
        assert live[0]["worker"] in [w["worker"] for w in get_json(f"{cluster.base}/workers")], \
            "a forged 'leaving' removed a live worker"
        assert all(p.poll() is None for p in [cluster.server, *workers]), "a process died"

        total = sum(sent.values())
        wait_for(lambda: metric(cluster.base, "karaoke_refused_messages") >= total, 60, "every message refused")
        parked = read_dead_queue(settings, total)
        reasons = [h.get("x-refused-reason") for h in parked]
        assert len(parked) == total and all(reasons), "every bad message parked once, with its reason"
        by_source = {s: sum(f".{s}" in h.get("x-refused-from", "") for h in parked) for s in sent}
        assert by_source == sent
        with capsys.disabled():
            print(f"\n  FUZZ sent {sent} ({total}); parked {by_source} with reasons; "
                  f"{1 + len(workers)} processes alive; song exact; e.g. {reasons[0]!r}")
    finally:
        cluster.stop()


def read_dead_queue(settings, expected: int) -> list[dict]:
    """The headers of the messages parked on the dead queue (consumed with the server's login)."""
    d = Destinations(settings.queue_prefix)
    conn = stomp.Connection12([(settings.broker_host, settings.broker_port)], vhost="/", auto_decode=False)
    parked: list[dict] = []

    class Collect(stomp.ConnectionListener):
        def on_message(self, frame):
            parked.append(dict(frame.headers))

    conn.set_listener("collect", Collect())
    conn.connect(*settings.server_login, wait=True)
    conn.subscribe(d.dead, id="dead", ack="auto", headers=d.declaration(d.dead))
    try:
        wait_for(lambda: len(parked) >= expected, 60, f"{expected} parked messages")
        time.sleep(1)  # anything beyond them would have arrived by now
    finally:
        conn.disconnect()
    return parked
