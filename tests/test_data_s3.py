"""DATA_STORE=s3://bucket/prefix against moto's S3 server, a real HTTP server in a process of its own.

No real S3 (nor MinIO) installs here, so the S3 path is tested against `moto_server`: the
same HTTP API, presigned URLs included. moto does not check a presigned URL's signature or
expiry, so what these tests prove is the protocol (keys, methods, presigned requests, deletion),
not S3's own refusal of a forged or expired URL.

- The store alone: an input put by the server and read by a presigned GET (ranges too), a
  result written by the worker's client through a presigned PUT (twice: the same object), read
  back by the attempt that wrote it and by no other, deleted with its job, swept when no live job
  owns it.
- A deployment: a real server, worker and broker run a song (`separate`) with DATA_STORE=s3://:
  the stems equal the fault-free result, the worker fetched every input and stored every result
  through presigned URLs straight at the bucket (moto's request log), the server's data endpoint
  served none of it, and the bucket is empty once the task has ended.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from bench import harness
from src import config
from src.config import Settings
from src.data import client
from src.data.s3 import S3Store
from tests import video
from tests.conftest import Cluster
from tests.helpers import get_json, metric, wait_for
from tests.netns import accepts
from tests.test_faults import assert_whole, start_song
from tests.test_transcode import finished, transcode
from tests.test_transcode import upload as upload_media

BUCKET = "karaoke-test"


class Moto:
    """`moto_server` on a free port of loopback, in a process of its own, logging every request."""

    def __init__(self, folder: Path):
        self.port = harness.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = folder / "moto.log"
        moto_server = Path(sys.executable).with_name("moto_server")
        self.process = subprocess.Popen([str(moto_server), "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=self.log_path.open("ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                requests.get(self.url, timeout=2)
                return
            except requests.ConnectionError:
                if self.process.poll() is not None:
                    raise RuntimeError(f"moto_server exited: {self.log()}") from None
                time.sleep(0.2)
        raise RuntimeError("moto_server did not answer in 60 s")

    def env(self) -> dict[str, str]:
        """boto3's usual environment, as a deployment sets it for its S3 endpoint."""
        return {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1"}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def requests(self) -> list[tuple[str, str]]:
        """(method, path with query) of every request moto served, from its log."""
        return re.findall(r'"(GET|PUT|HEAD|POST|DELETE) (\S+) HTTP/1\.1', self.log())

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(10)


@pytest.fixture
def moto(tmp_path: Path, monkeypatch) -> Iterator[Moto]:
    server = Moto(tmp_path)
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)  # this process's boto3 (the store under test, the test's own client)
    try:
        store_client().create_bucket(Bucket=BUCKET)
        yield server
    finally:
        server.stop()


def store_client():
    return S3Store._client()


def s3_settings(folder: Path, prefix: str) -> Settings:
    return config.load({"CONFIG_FILE": str(folder / "no-config.yaml"), "STORAGE_DIR": str(folder / "storage"),
                        "DATA_STORE": f"s3://{BUCKET}/{prefix}"})


def keys(prefix: str) -> list[str]:
    listed = store_client().list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return [item["Key"] for item in listed.get("Contents", [])]


@pytest.mark.unit
def test_s3_store_moves_inputs_and_results_through_presigned_urls(moto, tmp_path):
    prefix = f"run-{uuid.uuid4().hex[:6]}"
    store = S3Store(s3_settings(tmp_path, prefix))
    store.check()
    body = os.urandom(300_000)
    store.put_input(7, body)
    token, other = uuid.uuid4().hex, uuid.uuid4().hex

    # the worker's side: plain HTTP with the presigned URLs, through the worker's own client
    read = store.input_ref(7, token)
    assert "X-Amz-Signature=" in read and read.startswith(moto.url)
    assert client.fetch(read, len(body), hashlib.sha256(body).hexdigest()) == body
    piece = requests.get(read, headers={"Range": "bytes=1000-1999"}, timeout=30)
    assert piece.status_code == 206 and piece.content == body[1000:2000]

    result = os.urandom(200_000)
    write = store.result_ref(7, token)
    assert not client.takes_pieces(write), "a presigned PUT takes the whole body"
    assert client.upload(write, result)["complete"]
    assert client.upload(write, result)["complete"], "uploading the same result again is harmless"
    assert store.get_result(7, token) == result
    assert store.get_result(7, other) is None, "another attempt's result is its own object"
    assert sorted(keys(prefix)) == [f"{prefix}/jobs/7/input", f"{prefix}/jobs/7/result-{token}"]

    # the methods the server uses: presigned GET of an input and PUT of a result, nothing else
    presigned = [(method, path) for method, path in moto.requests() if "X-Amz-Signature=" in path]
    assert {method for method, _ in presigned} == {"GET", "PUT"}

    # a task's end deletes its jobs; a sweep after a restart deletes what no live job owns
    store.put_input(8, b"eight")
    store.put_input(9, b"nine")
    store.delete_jobs([7])
    assert sorted(keys(prefix)) == [f"{prefix}/jobs/8/input", f"{prefix}/jobs/9/input"]
    assert store.sweep({9}) == 1
    assert keys(prefix) == [f"{prefix}/jobs/9/input"]
    store.delete_jobs([9])
    assert keys(prefix) == []


LOSSLESS = {"codec": "h264", "crf": 0, "preset": "ultrafast"}  # every frame checkable against the source


def test_a_song_and_a_video_go_through_the_bucket_not_the_server(moto, settings, tmp_path, make_song):
    prefix = f"deploy-{uuid.uuid4().hex[:6]}"
    deployed = settings.with_overrides(data_store=f"s3://{BUCKET}/{prefix}")
    cluster = Cluster(deployed, tmp_path)
    try:
        cluster.start_server()  # with boto3's environment (moto's endpoint and keys): it writes the inputs
        # The worker holds no S3 credentials nor endpoint: the presigned URLs in its jobs are all it uses.
        cluster.start_worker(**{name: "" for name in moto.env()})
        cluster.wait_workers(1)
        song = make_song(6.0, "wav")
        clip = video.make_clip(tmp_path / "clip.mp4", 2.2)

        # The outputs are right, each result applied once (the song first: assert_whole counts every job).
        music_id = start_song(cluster.base, song)
        assert_whole(cluster.base, music_id, song)
        media = upload_media(cluster.base, clip)
        task_id = transcode(cluster.base, media["media_id"], LOSSLESS)
        out = tmp_path / "out.mp4"
        out.write_bytes(finished(cluster.base, task_id))
        assert video.frame_hashes(out) == video.frame_hashes(clip), "every input frame, decoded, once"
        jobs = [get_json(f"{cluster.base}/job/{j}") for j in get_json(f"{cluster.base}/job")]
        assert metric(cluster.base, "karaoke_jobs_done") == len(jobs) == \
            get_json(f"{cluster.base}/music/{music_id}")["jobs_total"] + \
            get_json(f"{cluster.base}/tasks/{task_id}")["jobs_total"]

        # Every input was fetched, and every result stored, through presigned URLs at the bucket;
        # the server serves no data endpoint at all.
        presigned = {(method, path.split("?", 1)[0]) for method, path in moto.requests() if "X-Amz-Signature=" in path}
        for job in jobs:
            folder = f"/{BUCKET}/{prefix}/jobs/{job['job_id']}/"
            assert ("GET", folder + "input") in presigned, f"job {job['job_id']}'s input was not fetched from S3"
            assert any(method == "PUT" and path.startswith(folder + "result-") for method, path in presigned), \
                f"job {job['job_id']}'s result was not stored in S3"
        assert not accepts("127.0.0.1", deployed.data_port), "the server serves a data endpoint"

        # Both tasks ended: their objects are deleted.
        wait_for(lambda: keys(prefix) == [], 30, "the tasks' objects to be deleted")
    finally:
        cluster.stop()
