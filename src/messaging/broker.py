"""One STOMP connection to RabbitMQ that survives broker restarts and the loss of a cluster node.

`Broker` wraps a stomp.py connection with what both the server and the workers need:

- connecting with exponential back-off, and again after any disconnect (a restarted
  broker, a missed heart-beat), re-subscribing everything that was subscribed;
- failing over between the nodes of a cluster (`BROKER_HOSTS`, `settings.broker_nodes`):
  each attempt tries every node once, in the configured order but starting after the
  node that failed last, so a dead node is tried last rather than first every time.
  `node` says which one the connection reached, and the log line
  "Connected to broker host:port" says it too. A node's loss is a lost connection like
  any other: the broker requeues what that connection held, the quorum queues elect a
  leader among the nodes left, and this end reconnects to the next node;
- `send` that waits for the broker's RECEIPT, so a caller knows a message is stored
  before it ACKs what produced it;
- ACK/NACK bound to the connection a message came on: after a reconnect the broker has
  already requeued every message the old connection held, so acking it is skipped;
- `park`: put a message the caller refuses on the dead queue with the reason in an
  `x-refused-reason` header, then ACK it (a NACK would dead-letter it without a reason).

A broker is opened in a role: the server's login declares the deployment's queues (the
dead queue on each connect, the results queue by subscribing to it); a worker's login
(BROKER_WORKER_USER) declares nothing, because least privilege leaves it no `configure`
permission on them (src/messaging/accounts.py).

Handlers run on stomp.py's receiver thread and must return quickly (hand the work to
another thread): a handler that blocks also blocks RECEIPTs and heart-beats.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import stomp
import stomp.exception

from src.config import Settings
from src.messaging.destinations import LOGIN, Destinations

log = logging.getLogger(__name__)

# Seconds one node may take to accept a TCP connection before the next one is tried (a host
# that drops packets would otherwise hold an attempt for the kernel's SYN retries, minutes).
CONNECT_TIMEOUT = 5.0

Role = Literal["server", "worker"]
# What a parked message keeps of the headers it came with: bounded, and renamed so that
# none of them is read as a queue argument, a user-id or a receipt request on the way back.
PARKED_HEADERS, PARKED_HEADER_CHARS = 64, 1000
TRANSPORT_HEADERS = {"destination", "message-id", "subscription", "ack", "content-length", "receipt", "redelivered"}
# A parked body is kept for a person to look at, not to replay: the first MiB of it, so that a
# flood of refused results cannot fill the dead queue's byte cap (DEAD_QUEUE_BYTES) with a few.
PARKED_BODY_BYTES = 1024 * 1024


class BrokerUnavailable(RuntimeError):
    """The broker did not confirm an operation in time."""


@dataclass(frozen=True)
class Delivery:
    """A received MESSAGE frame, remembered with the connection it arrived on."""

    headers: dict[str, str]
    body: bytes
    connection_generation: int

    @property
    def delivery_count(self) -> int:
        """How many times the broker delivered this message before (quorum queues count)."""
        try:
            return max(0, int(self.headers.get("x-delivery-count", "0")))
        except ValueError:
            return 0


@dataclass
class _Subscription:
    destination: str
    handler: Callable[[Delivery], None]
    ack: str
    prefetch: int | None
    sub_id: str


class _Listener(stomp.ConnectionListener):
    def __init__(self, broker: Broker, conn: stomp.Connection12):
        self.broker = broker
        self.conn = conn

    def on_message(self, frame: stomp.utils.Frame) -> None:
        self.broker._dispatch(frame)

    def on_receipt(self, frame: stomp.utils.Frame) -> None:
        self.broker._receipt_arrived(frame.headers.get("receipt-id", ""))

    def on_error(self, frame: stomp.utils.Frame) -> None:
        log.error("Broker ERROR frame: %s %s", frame.headers.get("message"), frame.body[:200])

    def on_heartbeat_timeout(self) -> None:
        log.warning("Broker heart-beat missed; reconnecting")

    def on_disconnected(self) -> None:
        self.broker._connection_lost(self.conn)


class Broker:
    def __init__(self, settings: Settings, client_name: str, role: Role = "server"):
        self.settings = settings
        self.role = role
        self.user, self.password = settings.server_login if role == "server" else settings.worker_login
        if role == "worker" and not LOGIN.fullmatch(self.user):
            # its results and presence go out on routing keys named after its login (destinations.py)
            raise ValueError(f"BROKER_WORKER_USER {self.user!r}: a worker's broker login is letters, digits, '_', "
                             f"'@' and '-' (make broker WORKER_LOGIN=<host> provisions such)")
        self.destinations = Destinations(settings.queue_prefix, self.user)
        self.client_name = client_name
        self._subscriptions: list[_Subscription] = []
        self._receipts: dict[str, threading.Event] = {}
        self._receipt_ok: dict[str, bool] = {}
        self._lock = threading.RLock()
        self._connected = threading.Event()
        self._closing = False
        self._generation = 0
        self._reconnecting = False
        self._conn: stomp.Connection12 | None = None
        self._connected_at = 0.0
        self._retry_delay = 0.5
        self._nodes = settings.broker_nodes
        self._first = 0  # index in _nodes of the node the next attempt tries first
        self._node: tuple[str, int] | None = None  # the node of the current connection

    # -- connection ---------------------------------------------------------------

    def _ordered_nodes(self) -> list[tuple[str, int]]:
        """The nodes in the order the next attempt tries them: the configured order, rotated."""
        first = self._first % len(self._nodes)
        return self._nodes[first:] + self._nodes[:first]

    def _skip(self, node: tuple[str, int] | None) -> None:
        """Start the next attempt after `node` (one that failed), or one further when it is not known."""
        with self._lock:
            if node in self._nodes:
                self._first = (self._nodes.index(node) + 1) % len(self._nodes)
            else:
                self._first = (self._first + 1) % len(self._nodes)

    def _new_connection(self) -> stomp.Connection12:
        s = self.settings
        heartbeat = s.broker_heartbeat_ms
        nodes = self._ordered_nodes()
        conn = stomp.Connection12(
            nodes,  # stomp.py tries each in turn until one accepts (reconnect_attempts_max: one round)
            heartbeats=(heartbeat, heartbeat),
            # Leave room for a late heart-beat before declaring the broker gone.
            heart_beat_receive_scale=2.0,
            auto_decode=False,
            reconnect_attempts_max=1,
            timeout=CONNECT_TIMEOUT,  # bounds the TCP connect and the TLS handshake only
            vhost=s.broker_vhost,  # RabbitMQ reads STOMP 1.2's host header as the virtual host
        )
        if s.broker_tls:
            # stomp.py wraps a socket in TLS only for the hosts named here: every node, or a
            # fail-over would silently speak plain STOMP to the TLS port
            conn.set_ssl(
                for_hosts=nodes,
                ca_certs=s.broker_tls_ca or None,
                ssl_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        return conn

    @staticmethod
    def _endpoint(node: tuple[str, int]) -> str:
        host, port = node
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def node(self) -> str:
        """host:port of the broker node this connection reached ("" while not connected)."""
        node = self._node
        return self._endpoint(node) if node is not None and self._connected.is_set() else ""

    def connect(self, give_up_after: float | None = None) -> None:
        """Connect (with back-off) and subscribe everything registered so far."""
        delay, started = 0.5, time.monotonic()
        refused_on: tuple[str, int] | None = None  # the node that last refused a subscription
        while not self._closing:
            conn = self._new_connection()
            conn.set_listener("broker", _Listener(self, conn))
            try:
                if self.role == "server":
                    self.declare(self.destinations.dead)
                conn.connect(
                    self.user,
                    self.password,
                    wait=True,
                    headers={"client-id": self.client_name},
                )
                # None only when the connection already dropped again: its subscriptions fail below
                node = conn.transport.current_host_and_port or self._ordered_nodes()[0]
            except (stomp.exception.StompException, OSError) as exc:
                # a node that accepted TCP and then failed (still booting, shutting down) is the
                # one to skip; when none accepted, the next attempt starts one node further
                self._skip(conn.transport.current_host_and_port)
                nodes = ", ".join(self._endpoint(n) for n in self._nodes)
                if give_up_after is not None and time.monotonic() - started > give_up_after:
                    raise BrokerUnavailable(
                        f"cannot reach the broker at {nodes}: {str(exc) or type(exc).__name__}"
                    ) from exc
                log.warning("Broker unreachable at %s (%s); retrying in %.1fs", nodes, str(exc) or type(exc).__name__,
                            delay)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            failed = None
            with self._lock:
                self._generation += 1
                try:
                    for sub in self._subscriptions:
                        self._subscribe_on(conn, sub, confirm=True)
                except (stomp.exception.StompException, OSError) as exc:
                    failed = str(exc) or type(exc).__name__
                else:
                    # only now is it the connection: one that drops while subscribing is a
                    # failed attempt, for this loop to retry (not _connection_lost's)
                    self._conn = conn
                    self._node = node
                    self._connected_at = time.monotonic()
                    self._connected.set()
            if failed is not None:
                # the broker closed the connection on a subscription (a quorum queue that another
                # client declares at this very moment answers "noproc", or one whose leader died
                # with its node and is not elected yet): try again, with back-off. The node itself
                # answered, so it gets a second try before the next node (a client would otherwise
                # leave its configured node for a race that lasts milliseconds)
                log.warning("Subscribing failed on %s (%s); reconnecting in %.1fs", self._endpoint(node), failed,
                            delay)
                if refused_on == node:
                    self._skip(node)
                refused_on = node
                try:
                    conn.disconnect()
                except (stomp.exception.StompException, OSError):
                    pass
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            log.info("Connected to broker %s", self._endpoint(node))
            return

    def _connection_lost(self, conn: stomp.Connection12) -> None:
        if conn is not self._conn:
            return  # a failed attempt or an old connection; connect() handles those
        self._connected.clear()
        for event in list(self._receipts.values()):
            event.set()  # wake senders; they see the receipt missing and retry
        if self._closing:
            return
        with self._lock:
            if self._reconnecting:
                return
            self._reconnecting = True
            lost = self._node
        # that node may be gone for good (a cluster node that died): try the others first
        self._skip(lost)
        log.warning("Lost the broker connection to %s; reconnecting", self._endpoint(lost) if lost else "?")

        # A connection the broker closes at once (a subscription it refuses: the jobs queue
        # not declared yet, a permission missing) is retried with back-off, not in a loop.
        if time.monotonic() - self._connected_at < 10:
            delay, self._retry_delay = self._retry_delay, min(self._retry_delay * 2, 10.0)
        else:
            delay, self._retry_delay = 0.0, 0.5

        def reconnect() -> None:
            try:
                time.sleep(delay)
                self.connect()
            finally:
                with self._lock:
                    self._reconnecting = False

        threading.Thread(target=reconnect, name="broker-reconnect", daemon=True).start()

    def close(self) -> None:
        self._closing = True
        conn = self._conn
        if conn is not None and conn.is_connected():
            try:
                conn.disconnect()
            except stomp.exception.StompException:
                pass

    @property
    def local_address(self) -> str:
        """host:port of this end of the connection, as the broker sees it."""
        try:
            host, port = self._conn.transport.socket.getsockname()[:2]
            return f"{host}:{port}"
        except (AttributeError, OSError):
            return ""

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    # -- subscribing and receiving --------------------------------------------------

    def subscribe(
        self,
        destination: str,
        handler: Callable[[Delivery], None],
        ack: str = "client-individual",
        prefetch: int | None = None,
    ) -> None:
        sub = _Subscription(destination, handler, ack, prefetch, sub_id=str(len(self._subscriptions) + 1))
        with self._lock:
            self._subscriptions.append(sub)
            if self._conn is not None and self._connected.is_set():
                self._subscribe_on(self._conn, sub)

    def _subscribe_on(self, conn: stomp.Connection12, sub: _Subscription, confirm: bool = False,
                      timeout: float = 10.0) -> None:
        """SUBSCRIBE; with `confirm`, return only once the broker has taken it (its RECEIPT),
        else raise ConnectionError: a broker that refuses a subscription closes the connection,
        and connect() must see that, not the first job handled after it."""
        headers = dict(self.destinations.declaration(sub.destination))
        if sub.destination.startswith("/topic/") and "x-queue-name" not in headers:
            # a queue of this login's own name, not the plugin's stomp-subscription-*: each login
            # may read only its own (src/messaging/accounts.py); a new one per subscribing
            headers["x-queue-name"] = self.destinations.subscription_queue()
        if sub.prefetch is not None:
            # Always sent, 0 (unbounded) included: the STOMP plugin keeps one channel per
            # connection, and a subscription without the header inherits the last one's.
            headers["prefetch-count"] = str(sub.prefetch)
        if not confirm:
            conn.subscribe(sub.destination, id=sub.sub_id, ack=sub.ack, headers=headers)
            return
        receipt, event = uuid.uuid4().hex, threading.Event()
        self._receipts[receipt] = event
        try:
            conn.subscribe(sub.destination, id=sub.sub_id, ack=sub.ack, headers={**headers, "receipt": receipt})
            deadline = time.monotonic() + timeout
            while not event.wait(0.05):
                if not conn.is_connected() or time.monotonic() > deadline:
                    raise ConnectionError(f"the broker did not take the subscription to {sub.destination}")
        finally:
            self._receipts.pop(receipt, None)
            self._receipt_ok.pop(receipt, None)

    def declare_topology(self, queues: list[tuple[str, str | None]]) -> None:
        """Declare the dead queue, the given (kind, route) jobs queues, the results queue and route (provisioning).

        Only for a moment when the queues are new or empty: a quorum queue counts a message
        that a closing subscription hands back as one more delivery.
        """
        jobs = [self.destinations.jobs(kind, route) for kind, route in queues]
        for destination in (self.destinations.dead, *jobs, self.destinations.results_binding):
            self.declare(destination)

    def declare(self, destination: str) -> None:
        """Make sure a queue exists without consuming from it.

        Dead-lettered messages are dropped unless their queue exists, and RabbitMQ's STOMP
        plugin declares a queue only when a frame names it; a subscription that ends at once
        does that. It runs on a connection of its own: a message the subscription receives
        before it ends goes back to the queue when that connection closes, where on the main
        connection it would stay unacknowledged (or, NACKed after the UNSUBSCRIBE, make the
        broker close the connection with "Subscription not found").
        """
        conn = self._new_connection()  # any node (the same list); no listener: what it receives goes back on disconnect
        conn.connect(self.user, self.password, wait=True)
        headers = {**self.destinations.declaration(destination), "prefetch-count": "1"}
        conn.subscribe(destination, id="declare", ack="client-individual", headers=headers)
        conn.disconnect(receipt=uuid.uuid4().hex)  # waits for the receipt, so the queue exists now

    def _dispatch(self, frame: stomp.utils.Frame) -> None:
        sub_id = frame.headers.get("subscription")
        for sub in self._subscriptions:
            if sub.sub_id == sub_id:
                body = frame.body if isinstance(frame.body, bytes) else frame.body.encode()
                try:
                    sub.handler(Delivery(dict(frame.headers), body, self._generation))
                except Exception:
                    log.exception("Handler for %s failed", sub.destination)
                return
        log.warning("Ignored a MESSAGE for unknown subscription %s; it returns to its queue when this "
                    "connection closes", sub_id)

    def ack(self, delivery: Delivery) -> None:
        self._settle(delivery, positive=True)

    def nack(self, delivery: Delivery, requeue: bool = True) -> None:
        self._settle(delivery, positive=False, requeue=requeue)

    def park(self, delivery: Delivery, reason: str, source: str, acknowledge: bool = True) -> None:
        """Move a refused message to the dead queue with why, then ACK it (server role).

        `acknowledge=False` for messages of an auto-ack subscription (topics), which have no ACK.
        """
        headers = {"x-refused-reason": " ".join(reason.split())[:500], "x-refused-from": source}
        body = delivery.body
        if len(body) > PARKED_BODY_BYTES:
            headers["x-refused-body-bytes"] = str(len(body))  # what it was; the first MiB is kept
            body = body[:PARKED_BODY_BYTES]
        kept = [(k, v) for k, v in delivery.headers.items() if k not in TRANSPORT_HEADERS][:PARKED_HEADERS]
        for name, value in kept:
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))[:100]
            headers[f"original-{safe}"] = str(value)[:PARKED_HEADER_CHARS]
        self.send(self.destinations.dead, body, headers, confirm=acknowledge)
        if acknowledge:
            self.ack(delivery)

    def _settle(self, delivery: Delivery, positive: bool, requeue: bool = True) -> None:
        with self._lock:
            conn = self._conn
            if delivery.connection_generation != self._generation or conn is None:
                log.info("Not settling a message from a lost connection; the broker requeued it")
                return
        ack_id = delivery.headers.get("ack") or delivery.headers["message-id"]
        try:
            if positive:
                conn.ack(ack_id)
            else:
                conn.nack(ack_id, requeue="true" if requeue else "false")
        except (stomp.exception.StompException, OSError):
            log.info("Connection dropped before settling; the broker requeues the message")

    # -- sending ---------------------------------------------------------------------

    def send(
        self,
        destination: str,
        body: bytes | str,
        headers: dict[str, str],
        confirm: bool = True,
        timeout: float = 60.0,
        persistent: bool = True,
    ) -> None:
        """Send a message; with `confirm`, return only once the broker has taken it.

        Retries across reconnects until `timeout`; raises BrokerUnavailable after that.
        """
        all_headers = {**self.destinations.declaration(destination), **headers}
        if persistent:
            all_headers["persistent"] = "true"
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._connected.wait(remaining):
                raise BrokerUnavailable(f"broker did not take a message for {destination} in {timeout:.0f}s")
            conn = self._conn
            if not confirm:
                try:
                    conn.send(destination, body, headers=all_headers)
                    return
                except stomp.exception.NotConnectedException:
                    continue
            receipt = uuid.uuid4().hex
            event = threading.Event()
            self._receipts[receipt] = event
            try:
                conn.send(destination, body, headers={**all_headers, "receipt": receipt})
                event.wait(max(0.1, deadline - time.monotonic()))
            except stomp.exception.NotConnectedException:
                pass
            finally:
                self._receipts.pop(receipt, None)
            if event.is_set() and self._receipt_ok.pop(receipt, False):
                return

    def _receipt_arrived(self, receipt_id: str) -> None:
        event = self._receipts.get(receipt_id)
        if event is not None:
            self._receipt_ok[receipt_id] = True
            event.set()
