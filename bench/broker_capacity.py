"""Section 9 of `make bench`: how many bytes a second one RabbitMQ node carries the way this
product uses it, and at what CPU.

Jobs and results are persistent messages of about a megabyte on quorum queues, each sent
with a RECEIPT and consumed with prefetch 1 and a client ACK (src/messaging/broker.py). This
sends `count` such messages through one queue with the product's own `Broker`, one producer
and one consumer at a time, and reads the broker's CPU seconds (the beam.smp process) before
and after: docs/SCALING.md turns the figure into media hours per hour per broker node.
The bytes are the wire's: the product's payloads travel base64-encoded, a third more.
Run alone on an idle machine: the producer, the consumer and the node share its cores.
"""

from __future__ import annotations

import queue
import statistics
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil

from src import config
from src.messaging.broker import Broker


def broker_process() -> psutil.Process:
    """The local RabbitMQ node's Erlang VM (the one `make broker` runs)."""
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if proc.info["name"] == "beam.smp" and "rabbit@localhost" in cmd:
            return proc
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] == "beam.smp":
            return proc
    raise RuntimeError("no RabbitMQ node (beam.smp) runs here")


def measure(size: int = 1 << 20, count: int = 200) -> dict:
    """Send `count` messages of `size` bytes through a quorum jobs queue and take them back."""
    settings = config.load({"QUEUE_PREFIX": f"bench-{uuid.uuid4().hex[:8]}", "CONFIG_FILE": "/nonexistent.yaml",
                            "BROKER_USER": "guest", "BROKER_PASSWORD": "guest"})
    producer, consumer = Broker(settings, "capacity-producer"), Broker(settings, "capacity-consumer")
    destination = producer.destinations.jobs("separate")
    received: queue.Queue = queue.Queue()
    consumer.subscribe(destination, received.put, prefetch=1)
    producer.connect()
    consumer.connect()
    body = bytes(size)
    beam = broker_process()
    try:
        cpu0, wall0 = sum(beam.cpu_times()[:2]), time.monotonic()

        def produce() -> None:
            for _ in range(count):
                producer.send(destination, body, {"content-type": "application/octet-stream"})

        sender = threading.Thread(target=produce)
        sender.start()
        for _ in range(count):
            consumer.ack(received.get(timeout=120))
        sender.join()
        wall, cpu = time.monotonic() - wall0, sum(beam.cpu_times()[:2]) - cpu0
    finally:
        producer.close()
        consumer.close()
        for name in ("jobs.separate", "dead"):
            subprocess.run(["rabbitmqctl", "-q", "delete_queue", f"{settings.queue_prefix}.{name}"],
                           capture_output=True, timeout=60)
    megabytes = size * count / 1e6
    return {"message_bytes": size, "messages": count, "seconds": round(wall, 2),
            "messages_per_second": round(count / wall, 1),
            "megabytes_per_second": round(megabytes / wall, 1), "broker_cpu_seconds": round(cpu, 2),
            "broker_cpu_seconds_per_megabyte": round(cpu / megabytes, 4)}


@dataclass(frozen=True)
class Profile:
    name: str
    message_bytes: tuple[int, ...]
    messages: int
    runs: int


def profile(name: str) -> Profile:
    if name == "smoke":
        return Profile("smoke", (1 << 20,), 20, 1)
    # a job of audio (1.4 MB), a small video piece or result (~200 kB), and a 1 kB message: what a job
    # would be if it carried a reference to its input in object storage instead of the input
    return Profile(name, (1_000, 200_000, 1 << 20), 200 if name == "full" else 100, 3 if name == "full" else 2)


def run(p: Profile, workdir: Path) -> dict:
    """Per message size, the median (and range) of `p.runs` runs of `measure`."""
    rows = []
    for size in p.message_bytes:
        runs = [measure(size, p.messages) for _ in range(p.runs)]
        rates = [r["megabytes_per_second"] for r in runs]
        per_second = statistics.median(r["messages_per_second"] for r in runs)
        cpu = [r["broker_cpu_seconds_per_megabyte"] for r in runs]
        rows.append({"message_bytes": size, "messages": p.messages, "runs": len(runs),
                     "megabytes_per_second": statistics.median(rates), "min": min(rates), "max": max(rates),
                     "messages_per_second": per_second,
                     "broker_cpu_seconds_per_megabyte": statistics.median(cpu)})
    return {"profile": p.__dict__, "rows": rows}


if __name__ == "__main__":
    print(measure())
