"""The broker connection against the real RabbitMQ: what a worker's WORKER_PREFETCH means there."""

from __future__ import annotations

import queue
import time

import pytest

from src.config import Settings
from src.messaging.broker import Broker
from tests.helpers import queue_counts, wait_for


@pytest.mark.parametrize("prefetch, expected", [(1, 1), (2, 2), (0, 5)], ids=["pull", "two", "unbounded"])
def test_a_worker_holds_as_many_unacknowledged_jobs_as_its_prefetch(settings: Settings, prefetch: int,
                                                                     expected: int) -> None:
    publisher = Broker(settings, client_name="test-publisher")
    publisher.connect()
    consumer = Broker(settings, client_name="test-consumer")
    try:
        for index in range(5):
            publisher.send(publisher.destinations.jobs("separate"), f"job {index}", {})
        delivered: queue.Queue = queue.Queue()
        consumer.subscribe(consumer.destinations.jobs("separate"), delivered.put, prefetch=prefetch)
        consumer.connect()
        wait_for(lambda: delivered.qsize() >= expected, 10, f"{expected} deliveries")
        time.sleep(1.0)  # anything beyond the prefetch would have arrived by now
        assert delivered.qsize() == expected
    finally:
        consumer.close()
        publisher.close()


def test_connecting_while_the_dead_queue_holds_messages_takes_none_of_them(settings: Settings) -> None:
    parker = Broker(settings, client_name="test-parker")
    parker.connect()
    try:
        for index in range(20):
            parker.send(parker.destinations.dead, f"parked for a human {index}", {})
        for attempt in range(3):  # every connect declares the dead queue again
            worker = Broker(settings, client_name=f"test-worker-{attempt}")
            delivered: queue.Queue = queue.Queue()
            worker.subscribe(worker.destinations.jobs("separate"), delivered.put, prefetch=1)
            worker.connect()
            parker.send(parker.destinations.jobs("separate"), "a job", {})
            worker.ack(delivered.get(timeout=10))
            # a quorum queue's counts reach rabbitmqctl a few seconds late
            wait_for(lambda: queue_counts(settings.queue_prefix, "dead") == (20, 0), 30,
                     "every parked message ready for a human, none taken by a connect")
            assert worker.connected, "the worker's connection should survive its connect"
            worker.close()
    finally:
        parker.close()
