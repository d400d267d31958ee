"""The production server under the loads that held the development server's threads.

Fifty stalled uploads and every SSE slot taken: the API still answers, one more page is
told to come back later, and a page that never reads costs at most its backlog.
"""

from __future__ import annotations

import http.client
import socket
from contextlib import ExitStack

from src.server.events import EventHub
from tests.helpers import get, services_of, wait_for


def test_stalled_uploads_hold_no_thread(live_server, settings):
    with ExitStack() as stack:
        for _ in range(50):  # more than SERVER_THREADS: each would hold a thread on Werkzeug's server
            sock = stack.enter_context(socket.create_connection((settings.server_host, settings.server_port)))
            sock.sendall(b"POST /music HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/octet-stream\r\n"
                         b"Content-Length: 10000000\r\n\r\n" + b"\0" * 1000)
        status, body = get(live_server + "/music")
        assert status == 200 and body.strip() == b"[]"
        assert get(live_server + "/health")[0] in (200, 503)


def test_event_streams_are_capped_and_the_api_still_answers(app, live_server, settings):
    with ExitStack() as stack:
        for _ in range(settings.sse_max_clients):
            conn = http.client.HTTPConnection(settings.server_host, settings.server_port, timeout=30)
            stack.callback(conn.close)
            conn.request("GET", "/events")
            answer = conn.getresponse()
            stack.callback(answer.close)  # the response holds the socket too
            assert answer.status == 200
            assert answer.readline() == b"retry: 2000\n"
        status, body = get(live_server + "/events")
        assert status == 503 and b"SSE_MAX_CLIENTS" in body
        assert get(live_server + "/music")[0] == 200
    # pages that went away free their slots (noticed at the next keep-alive at the latest)
    events = services_of(app).events
    wait_for(lambda: events.listeners() == 0, 40, "closed streams to free their slots")
    assert get(live_server + "/health")[0] in (200, 503)


def test_a_page_that_never_reads_costs_at_most_its_backlog():
    hub = EventHub(max_clients=2, backlog_bytes=64 * 1024)
    stream = hub.stream()
    assert next(stream) == "retry: 2000\n\n"
    for index in range(5000):  # about 5 MB of events nobody reads
        hub.publish("music", {"index": index, "padding": "x" * 1000})
    listener = next(iter(hub._clients))
    assert listener.size <= 64 * 1024
    assert '"index": 4999' in listener.pending[-1], "the newest event is kept, the oldest dropped"
    stream.close()
    assert hub.listeners() == 0
