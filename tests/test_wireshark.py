"""tshark with tools/wireshark/stomp.lua over captures of real broker traffic."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DISSECTOR = ROOT / "tools" / "wireshark" / "stomp.lua"


def dissect(capture: Path, *fields: str, display_filter: str = "stomp") -> list[list[str]]:
    command = ["tshark", "-r", str(capture), "-X", f"lua_script:{DISSECTOR}", "-Y", display_filter,
               "-T", "fields", "-E", "separator=|", "-E", "occurrence=a", "-E", "aggregator=;"]
    for field in fields:
        command += ["-e", field]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return [line.split("|") for line in out.stdout.splitlines()]


@pytest.fixture(scope="module")
def run_capture(tmp_path_factory) -> Path:
    storage = tmp_path_factory.mktemp("capture-storage")
    env = {**os.environ, "STORAGE_DIR": str(storage), "CAPTURE_SECONDS": "90", "CAPTURE_IFACE": "lo",
           "CONFIG_FILE": "/nonexistent.yaml"}
    done = subprocess.run([sys.executable, "-m", "tools.capture"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    captures = list((storage / "captures").glob("*.pcapng"))
    assert len(captures) == 1 and captures[0].stat().st_size > 10_000
    return captures[0]


def test_the_conversation_is_decoded(run_capture):
    rows = dissect(run_capture, "stomp.command", "stomp.destination", "stomp.job_id", "stomp.header.login",
                   "_ws.col.Info")
    commands = defaultdict(int)
    for row in rows:
        for command in row[0].split(";"):
            commands[command] += 1
    assert commands["CONNECT"] + commands["STOMP"] > 0, "STOMP 1.2 clients may open with STOMP instead of CONNECT"
    for command in ("CONNECTED", "SUBSCRIBE", "SEND", "MESSAGE", "ACK", "RECEIPT"):
        assert commands[command] > 0, f"no {command} frame decoded: {dict(commands)}"
    assert any("guest" in row[3] for row in rows), "CONNECT's login is shown (clear text without TLS)"

    job_sends = [row for row in rows if row[4].startswith("SEND /queue/") and ".jobs.separate job=" in row[4]]
    assert job_sends, "job SEND frames read like 'SEND /queue/<prefix>.jobs.separate job=N chunk=M'"
    assert all(" chunk=" in row[4] for row in job_sends)
    acked_jobs = {int(j) for row in rows if "ACK" in row[0].split(";") for j in row[2].split(";") if j}
    sent_jobs = {int(j) for row in job_sends for j in row[2].split(";") if j}
    assert sent_jobs and sent_jobs <= acked_jobs | sent_jobs
    assert acked_jobs & sent_jobs, "ACK frames are tied to the job whose MESSAGE they settle"


def test_a_crashed_workers_job_is_delivered_twice(run_capture):
    rows = dissect(run_capture, "stomp.job_id", "stomp.header.redelivered", "stomp.destination",
                   display_filter="stomp.command == \"MESSAGE\" && stomp.destination contains \".jobs\"")
    deliveries = defaultdict(list)
    for row in rows:
        for job, redelivered in zip(row[0].split(";"), row[1].split(";"), strict=False):
            deliveries[int(job)].append(redelivered)
    twice = {job: flags for job, flags in deliveries.items() if len(flags) >= 2}
    assert twice, f"no job was delivered twice: {dict(deliveries)}"
    assert any("true" in flags for flags in twice.values()), "the second delivery says redelivered:true"


def raw_capture(tmp_path: Path, talk: Callable[[socket.socket, str], None]) -> Path:
    """Traffic of one STOMP connection made by hand (`talk(connection, queue)` after CONNECT), captured."""
    capture = tmp_path / "raw.pcapng"
    log = (tmp_path / "tshark.log").open("wb")
    tshark = subprocess.Popen(["tshark", "-q", "-i", "lo", "-f", "tcp port 61613", "-w", str(capture)],
                              stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while b"Capturing on" not in (tmp_path / "tshark.log").read_bytes():
            assert time.monotonic() < deadline and tshark.poll() is None, "tshark did not start"
            time.sleep(0.1)
        time.sleep(1)  # "Capturing on" comes a moment before the first packets are recorded
        with socket.create_connection(("localhost", 61613)) as conn:
            conn.sendall(b"CONNECT\naccept-version:1.2\nhost:/\nlogin:guest\npasscode:guest\nheart-beat:0,0\n\n\0")
            assert b"CONNECTED" in conn.recv(4096)
            talk(conn, f"/queue/dissector-{os.getpid()}")
        time.sleep(1)
    finally:
        tshark.terminate()
        tshark.wait(30)
    return capture


def test_several_frames_in_one_segment_and_heartbeats(tmp_path):
    def talk(conn: socket.socket, queue: str) -> None:
        time.sleep(0.2)
        conn.sendall(b"\n")  # a heart-beat, in a segment of its own
        time.sleep(0.2)
        frames = b"".join(
            f"SEND\ndestination:{queue}\nauto-delete:true\njob-id:{n}\ncontent-length:5\n\nhello\0".encode()
            for n in (101, 102))
        conn.sendall(frames + b"DISCONNECT\nreceipt:bye\n\n\0")  # three frames, one segment
        conn.recv(4096)

    capture = raw_capture(tmp_path, talk)
    rows = dissect(capture, "frame.number", "stomp.command", "stomp.job_id", "_ws.col.Info",
                   display_filter="stomp.command == \"SEND\"")
    assert len(rows) == 1, "both SEND frames travelled in one segment"
    assert rows[0][1] == "SEND;SEND;DISCONNECT" and rows[0][2] == "101;102"
    assert rows[0][3].count("SEND ") == 2
    assert dissect(capture, "frame.number", display_filter="stomp.heartbeat"), "a heart-beat EOL is marked"


def test_a_frame_spanning_segments_is_reassembled(tmp_path):
    """The product's own frames are small now (jobs and results carry references, not media), so a
    bulky frame is made by hand, as another program might send one (the product parks it)."""
    body = b"x" * 200_000  # three loopback segments at least (its MTU is 64 kB)

    def talk(conn: socket.socket, queue: str) -> None:
        conn.sendall(f"SEND\ndestination:{queue}\nauto-delete:true\ncontent-length:{len(body)}\n\n".encode()
                     + body + b"\0DISCONNECT\nreceipt:bye\n\n\0")
        conn.recv(4096)

    rows = dissect(raw_capture(tmp_path, talk), "stomp.command", "stomp.body_length", "tcp.len",
                   display_filter="stomp.command == \"SEND\" && stomp.body_length > 100000")
    assert rows, "the 200 kB SEND spans segments and is reassembled into one frame"
    assert all(int(row[2]) < max(int(x) for x in row[1].split(";")) for row in rows)
