"""BROKER_TLS=1: the broker connection speaks TLS and verifies the broker's certificate.

This machine's RabbitMQ has no TLS listener, so a TLS-terminating relay (what stunnel
does in front of a broker) forwards to its plain STOMP port; the certificate is a
throwaway one made by openssl for `localhost`.
"""

from __future__ import annotations

import queue
import socket
import ssl
import subprocess
import threading
import uuid

import pytest

from src.messaging.broker import Broker, BrokerUnavailable


@pytest.fixture
def tls_relay(settings, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    handshakes: list[str] = []

    def pump(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, target):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def serve() -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                secure = context.wrap_socket(client, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                handshakes.append(f"refused: {exc}")
                client.close()
                continue
            handshakes.append(secure.version())
            upstream = socket.create_connection((settings.broker_host, settings.broker_port))
            threading.Thread(target=pump, args=(secure, upstream), daemon=True).start()
            threading.Thread(target=pump, args=(upstream, secure), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield listener.getsockname()[1], cert, handshakes
    listener.close()


def test_messages_travel_over_tls_with_a_verified_certificate(settings, tls_relay):
    port, cert, handshakes = tls_relay
    secure = settings.with_overrides(broker_tls=True, broker_host="localhost", broker_port=port,
                                     broker_tls_ca=str(cert))
    broker = Broker(secure, client_name="tls-test")
    received: queue.Queue = queue.Queue()
    destination = f"/queue/{settings.queue_prefix}.tls-{uuid.uuid4().hex[:6]}"
    broker.subscribe(destination, received.put, ack="auto")
    broker.connect(give_up_after=20)
    try:
        broker.send(destination, b"over tls", {"type": "probe", "auto-delete": "true"})
        assert received.get(timeout=20).body == b"over tls"
        assert handshakes and handshakes[0].startswith("TLS")
    finally:
        broker.close()


def test_an_untrusted_certificate_is_refused(settings, tls_relay, tmp_path):
    port, _, handshakes = tls_relay
    other_ca = tmp_path / "other.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(tmp_path / "k.pem"),
                    "-out", str(other_ca), "-days", "1", "-subj", "/CN=someone-else"], check=True,
                   capture_output=True, timeout=60)
    broker = Broker(settings.with_overrides(broker_tls=True, broker_host="localhost", broker_port=port,
                                            broker_tls_ca=str(other_ca)), client_name="tls-untrusted")
    with pytest.raises(BrokerUnavailable):
        broker.connect(give_up_after=3)
    broker.close()
    assert all(h.startswith("refused") for h in handshakes)
