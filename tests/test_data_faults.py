"""Faults on the data plane (issue 24, section 4): at-least-once delivery, each result applied once.

Real server and worker processes on the real broker; the server's DATA_URL names a proxy
(tests/dataproxy.py) in front of its data endpoint, so every reference a worker gets leads
through it, and the faults are made there, from outside the worker and the server: a cut
connection, an answer that never comes, a slow download, a repeated upload. Each test ends
with the song equal to the fault-free result (whole-file demucs, SDR >= 60 dB) and, where the
server kept running, with `karaoke_jobs_done` equal to the song's jobs: no result applied twice.

1. A worker dies between its upload and its result message: the proxy passes the worker's
   last result PUT to the endpoint (the result is stored) but never passes the answer back;
   the worker is SIGKILLed while it waits, so no result message is ever sent. The broker
   hands the job to the next worker, which uploads the same result again (the store keeps
   one copy) and sends the message.
2. An upload cut off mid-way and resumed: the first job of a 64-second song (a quarter of it:
   16 seconds, 22.6 MB of float32 stems) goes up in 16 MiB pieces; the proxy cuts the second
   piece's connection after 2 MB. The
   worker asks the endpoint how much arrived (HEAD) and sends the rest from there: no piece
   before the cut is sent again. (The endpoint is served by waitress, which hands a request
   to the app only once its body is whole, so a resumed upload restarts at the last whole
   piece, not at the cut byte.)
3. The server restarts while a worker downloads: the proxy relays the first job's input of a
   two-minute song (30 seconds, 10.6 MB) at about 1 MB/s through a small receive buffer; the
   server is SIGKILLed 300 kB into the download and started again. What it had not yet handed
   to the kernel never arrives (the sockets' buffers held about 7 MB here), the worker's
   download ends short, and it resumes with a Range request from the byte it had once the
   server is back.
4. A result uploaded twice: the proxy sends every result PUT to the endpoint a second time,
   before the worker gets its answer (and so before its result message). The second upload
   changes nothing ("unchanged"); once the song is done, the same upload again is refused
   (410, the task is over) and the served stems do not change.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from src.config import Settings
from src.data.client import PIECE
from tests.conftest import Cluster
from tests.dataproxy import DataProxy, Exchange
from tests.helpers import get_json, served_stems, wait_for
from tests.test_faults import assert_whole, report, start_song

pytestmark = pytest.mark.chaos


class Once:
    """A proxy plan: `fault` for the first request `matches` accepts, nothing for every other."""

    def __init__(self, matches: Callable[[Exchange], bool], fault: str):
        self.matches, self.fault = matches, fault
        self.exchange: Exchange | None = None

    def __call__(self, exchange: Exchange) -> str | None:
        if self.exchange is None and self.matches(exchange):
            self.exchange = exchange
            return self.fault
        return None


def last_piece(exchange: Exchange) -> bool:
    """A result PUT that completes its result: the whole in one, or the last piece."""
    if exchange.method != "PUT" or not exchange.path.startswith("/results/"):
        return False
    ranged = exchange.headers.get("content-range")
    if not ranged:
        return True
    span, total = ranged.removeprefix("bytes ").split("/")
    return int(span.split("-")[1]) + 1 == int(total)


def range_start(exchange: Exchange, header: str) -> int:
    """Where a Content-Range ("bytes a-b/n") or Range ("bytes=a-") header starts; 0 without one."""
    value = exchange.headers.get(header)
    if not value:
        return 0
    return int(value.removeprefix("bytes").lstrip(" =").split("-")[0])


@pytest.fixture
def proxied(settings: Settings, tmp_path: Path) -> Iterator[tuple[Cluster, DataProxy]]:
    """A cluster (not started) whose data references lead through a proxy to its data endpoint."""
    proxy = DataProxy(settings.data_port)
    cluster = Cluster(settings.with_overrides(data_url=proxy.url), tmp_path)
    try:
        yield cluster, proxy
    finally:
        cluster.stop()
        proxy.close()


def long_jobs(cluster: Cluster) -> Cluster:
    """The same deployment with jobs of up to 30 seconds: a song's first job is a quarter of it
    (src/kinds/separation/plan.py), 353 kB of input and 1.4 MB of result per second."""
    return Cluster(cluster.settings.with_overrides(chunk_seconds=30.0), cluster.log_dir)


def job_of(exchange: Exchange) -> int:
    return int(exchange.path.rsplit("/", 1)[1])


def test_worker_killed_between_its_upload_and_its_result_message(proxied, make_song, capsys):
    cluster, proxy = proxied
    held = Once(last_piece, "hold")
    proxy.plan = held
    cluster.start_server()
    victim = cluster.start_worker()
    cluster.wait_workers(1)
    song = make_song(6.0, "wav")
    music_id = start_song(cluster.base, song)

    wait_for(proxy.held.is_set, 120, "a result stored whose answer the worker never got")
    job_id = job_of(held.exchange)
    stored = list((cluster.settings.storage_dir / "data" / "results").glob(f"{job_id}.*"))
    assert held.exchange.status == 201 and len(stored) == 1, "the endpoint has the whole result"
    victim.kill()
    victim.wait(10)
    killed_at = time.time()
    assert get_json(f"{cluster.base}/job/{job_id}")["state"] != "done", "no result message was sent"

    cluster.start_worker()  # the broker hands it the job the dead worker never ACKed
    assert_whole(cluster.base, music_id, song)
    again = [e for e in proxy.seen("PUT", "results") if e.path == held.exchange.path and e is not held.exchange]
    assert again and again[-1].status in (200, 201), [(e.status, e.notes) for e in again]
    done_at = get_json(f"{cluster.base}/music/{music_id}/timeline")
    retried = [a for a in done_at if a["job_id"] == job_id and a["outcome"] == "done"]
    assert len(retried) == 1, done_at
    report(capsys, "worker SIGKILL after its upload, before its result message", retried[0]["started_at"] - killed_at,
           f"job {job_id} uploaded again ({again[-1].status}), applied once, song whole")


def test_upload_cut_off_mid_way_resumes_where_the_store_has_it(proxied, make_song, capsys):
    cluster, proxy = proxied
    cluster = long_jobs(cluster)
    cut = Once(lambda e: e.method == "PUT" and range_start(e, "content-range") == PIECE
               and int(e.headers.get("content-length", 0)) > 2_000_000, f"cut:{2_000_000}")
    proxy.plan = cut
    try:
        cluster.start_server()
        cluster.start_worker()
        cluster.wait_workers(1)
        song = make_song(64.0, "wav")
        music_id = start_song(cluster.base, song)
        assert_whole(cluster.base, music_id, song)
    finally:
        cluster.stop()

    assert cut.exchange is not None, "no result went up in pieces"
    assert cut.exchange.sent == 2_000_000 and cut.exchange.status is None, "the piece was cut, unanswered"
    path = cut.exchange.path
    after = proxy.exchanges[proxy.exchanges.index(cut.exchange) + 1:]
    after = [e for e in after if e.path == path]
    asked = [e for e in after if e.method == "HEAD"]
    resumed = [e for e in after if e.method == "PUT"]
    assert asked and asked[0].status == 200, "the worker asked how much had arrived"
    assert resumed and range_start(resumed[0], "content-range") == PIECE, "it resumed at the piece that was cut"
    assert resumed[0].status in (201, 202)
    starts = [range_start(e, "content-range") for e in proxy.seen("PUT", "results") if e.path == path]
    assert starts.count(0) == 1, f"the first piece was sent once: {starts}"
    report(capsys, "result upload cut after 2 MB of its second piece", 0.0,
           f"resumed at byte {PIECE} (pieces sent at {starts}), song whole")


def test_server_restarted_while_a_worker_downloads(proxied, make_song, capsys):
    cluster, proxy = proxied
    cluster = long_jobs(cluster)
    slow = Once(lambda e: e.method == "GET" and e.path.startswith("/inputs/"), "slow")
    proxy.plan = slow
    try:
        cluster.start_server()
        cluster.start_worker()
        cluster.wait_workers(1)
        song = make_song(120.0, "wav")
        music_id = start_song(cluster.base, song)
        wait_for(lambda: proxy.downloading.is_set() and slow.exchange.relayed > 300_000, 120,
                 "a worker 300 kB into downloading its input", interval=0.05)
        cluster.server.kill()
        cluster.server.wait(10)
        killed_at, relayed = time.time(), slow.exchange.relayed
        time.sleep(2)
        cluster.start_server()
        back_at = time.time()
        assert_whole(cluster.base, music_id, song, check_counter=False)  # the counter is per server process
    finally:
        cluster.stop()

    path = slow.exchange.path
    gets = [e for e in proxy.seen("GET", "inputs") if e.path == path]
    assert gets[0] is slow.exchange and range_start(slow.exchange, "range") == 0
    resumed = [e for e in gets[1:] if e.status == 206]
    assert resumed, [(e.status, e.headers.get("range"), e.notes) for e in gets]
    start = range_start(resumed[0], "range")
    assert start > 0, "resumed from the bytes it had, not from the start"
    report(capsys, "server SIGKILL and restart while a worker downloads", back_at - killed_at,
           f"killed {relayed} bytes into the download, which resumed at byte {start} (Range), song whole")


def test_result_uploaded_twice_is_applied_once(proxied, make_song, capsys):
    cluster, proxy = proxied
    proxy.plan = lambda e: "twice" if e.method == "PUT" and e.path.startswith("/results/") else None
    cluster.start_server()
    cluster.start_worker()
    cluster.wait_workers(1)
    song = make_song(6.0, "wav")
    music_id = start_song(cluster.base, song)
    assert_whole(cluster.base, music_id, song)  # karaoke_jobs_done == the song's jobs

    uploads = proxy.seen("PUT", "results")
    jobs = get_json(f"{cluster.base}/music/{music_id}")["jobs_total"]
    assert len({e.path for e in uploads}) == jobs
    assert all(e.status == 201 and e.repeat_status == 200 for e in uploads), \
        [(e.path, e.status, e.repeat_status) for e in uploads]  # 200: {"unchanged": true}

    # Once the task is over, the same upload is refused, and nothing served changes.
    before = served_stems(cluster.base, music_id)
    late = requests.put(proxy.url + uploads[0].target, data=uploads[0].body, timeout=30,
                        headers={"Content-Type": "application/octet-stream"})
    assert late.status_code == 410, late.text
    after = served_stems(cluster.base, music_id)
    assert all((before[name] == after[name]).all() for name in before)
    report(capsys, "every result uploaded twice", 0.0, f"{jobs} jobs, each applied once; a late upload refused (410)")
