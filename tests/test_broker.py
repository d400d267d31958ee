"""The broker connection against the real RabbitMQ: what a worker's WORKER_PREFETCH means there."""

from __future__ import annotations

import queue
import time

import pytest

from src.config import Settings
from src.messaging.broker import Broker
from tests.helpers import wait_for


@pytest.mark.parametrize("prefetch, expected", [(1, 1), (2, 2), (0, 5)], ids=["pull", "two", "unbounded"])
def test_a_worker_holds_as_many_unacknowledged_jobs_as_its_prefetch(settings: Settings, prefetch: int,
                                                                     expected: int) -> None:
    publisher = Broker(settings, client_name="test-publisher")
    publisher.connect()
    consumer = Broker(settings, client_name="test-consumer")
    try:
        for index in range(5):
            publisher.send(publisher.destinations.jobs, f"job {index}", {})
        delivered: queue.Queue = queue.Queue()
        consumer.subscribe(consumer.destinations.jobs, delivered.put, prefetch=prefetch)
        consumer.connect()
        wait_for(lambda: delivered.qsize() >= expected, 10, f"{expected} deliveries")
        time.sleep(1.0)  # anything beyond the prefetch would have arrived by now
        assert delivered.qsize() == expected
    finally:
        consumer.close()
        publisher.close()
