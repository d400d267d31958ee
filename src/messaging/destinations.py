"""Queue and topic names of one deployment, and the headers that declare them.

RabbitMQ's STOMP plugin declares a queue on the first SEND or SUBSCRIBE that names it,
with the `x-*` headers of that frame as queue arguments, and closes the connection of
any later frame whose arguments differ. So every frame that touches a queue takes its
headers from here.

- jobs (`/queue/{p}.jobs.{kind}`, one per job kind, or `/queue/{p}.jobs.{kind}.{route}`, one
  per route of a kind that has routes, such as a codec): quorum queues, because a quorum queue
  counts deliveries (`x-delivery-count`), crashes included. The server publishes and
  declares them; workers consume the kinds they run as `/amq/queue/{p}.jobs.{kind}`,
  which declares nothing, so a worker's login needs no `configure` permission on them.
- results (`/queue/{p}.results`): a quorum queue too, so that a result the server keeps
  failing to handle is not requeued forever. Workers cannot publish to it directly:
  RabbitMQ checks `write` on the exchange a message goes through, and every `/queue/`
  SEND goes through the default exchange, which also reaches the jobs queue. So a worker
  publishes to `/topic/{p}.results.{login}` (amq.topic, routing key `{p}.results.{login}`,
  its own broker login), the one routing key its topic permissions allow, and the server's
  subscription binds the results queue to `{p}.results.#` (`x-queue-name`). See
  src/messaging/accounts.py.
- senders: the routing key is the one thing about a message the broker vouches for. The
  STOMP plugin writes a MESSAGE's own `destination` header (`/topic/{routing key}`) before
  any header the publisher set, and stomp.py keeps the first of a repeated header; a
  `user-id` header, by contrast, can be forged by a publisher on AMQP 0-9-1 (an entry of
  the headers table comes out before the validated property: measured on RabbitMQ 3.10 with
  the management API's publish, which takes the same path). So `sender` reads the login from
  the destination, and votes and presence slots count per login (tests/test_trust.py: a
  worker login is refused another login's routing key; tests/test_identity.py, test_farm.py).
- dead: where refused and exhausted messages are parked for a person to inspect; a quorum
  queue as well, so that on a cluster parking works while any one node is down (a classic
  queue lives on one node, and with that node down every park closed the connection).
- control, presence: topics; every subscriber gets every message, nothing is kept. Workers
  announce themselves on `/topic/{p}.presence.{login}`, the server reads `{p}.presence.#`.
- subscription queues: a `/topic/` subscription gets a queue named
  `{p}.sub.{login}.{random}` (`x-queue-name`), not the plugin's `stomp-subscription-*`, so
  that each login's read permission covers its own subscriptions and no other's.

RabbitMQ 3.10's STOMP plugin drops an `x-delivery-limit` header, so the delivery limit is
a policy (`accounts.policies`), which also applies to queues that already exist.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

# What a login may be called when it sends: one routing-key word of safe characters (it is
# part of routing keys, queue names and permission patterns).
LOGIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_@-]{0,99}")

# Deliveries of one message before the broker dead-letters it (a policy, see above). A
# backstop: workers give up on a job after MAX_ATTEMPTS deliveries, and the collector parks
# a result it could not handle; this bounds what a rogue consumer that requeues can do.
DELIVERY_LIMIT = 10
# The dead queue keeps this many messages (the oldest are dropped): a flood of refused
# messages cannot fill the broker's disk.
DEAD_QUEUE_LENGTH = 10_000
# ...and at most this many bytes (a policy too, `max-length-bytes`, as x-max-length-bytes would
# be: a queue argument cannot change on a queue that exists): one parked 90 MB result must not
# sit there for good. Parked bodies are also cut (broker.PARKED_BODY_BYTES).
DEAD_QUEUE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class Destinations:
    prefix: str
    login: str = ""  # the broker login that sends from here (its own results and presence routes)

    def jobs(self, kind: str, route: str | None = None) -> str:
        """The jobs queue of a kind, or of one of its routes (see src/kinds/registry.py)."""
        return f"/queue/{self.prefix}.jobs.{kind}" + (f".{route}" if route else "")

    def worker_jobs(self, kind: str, route: str | None = None) -> str:
        """A jobs queue as workers consume it: an existing queue, not declared by them."""
        return "/amq" + self.jobs(kind, route)

    def is_jobs(self, destination: str) -> bool:
        return destination.startswith(f"/queue/{self.prefix}.jobs.")

    @property
    def results(self) -> str:
        return f"/queue/{self.prefix}.results"

    @property
    def results_route(self) -> str:
        """Where this login sends results: amq.topic with its own routing key, bound to the results queue."""
        return f"/topic/{self.prefix}.results.{self._sender()}"

    @property
    def results_binding(self) -> str:
        """What the server subscribes to: every login's results route, into the results queue."""
        return f"/topic/{self.prefix}.results.#"

    @property
    def dead(self) -> str:
        return f"/queue/{self.prefix}.dead"

    @property
    def control(self) -> str:
        return f"/topic/{self.prefix}.control"

    @property
    def presence(self) -> str:
        """Where this login announces its workers."""
        return f"/topic/{self.prefix}.presence.{self._sender()}"

    @property
    def presence_binding(self) -> str:
        """What the server subscribes to: every login's presence."""
        return f"/topic/{self.prefix}.presence.#"

    def _sender(self) -> str:
        if not LOGIN.fullmatch(self.login):
            raise ValueError(f"broker login {self.login!r} cannot send results or presence: a login that does "
                             f"is letters, digits, '_', '@' and '-' (make broker makes such)")
        return self.login

    def sender(self, headers: dict[str, str], what: str) -> str | None:
        """The login that published a MESSAGE to `{p}.{what}.{login}`, from the destination the
        broker wrote (see above); None when it came another way (no login the broker vouches for)."""
        stem = f"/topic/{self.prefix}.{what}."
        destination = headers.get("destination", "")
        login = destination[len(stem):] if destination.startswith(stem) else ""
        return login if LOGIN.fullmatch(login) else None

    def subscription_queue(self) -> str:
        """A name for the queue of one /topic/ subscription of this login (see above)."""
        return f"{self.prefix}.sub.{self.login}.{uuid.uuid4().hex[:16]}"

    def declaration(self, destination: str) -> dict[str, str]:
        """Headers every SEND and SUBSCRIBE to `destination` must carry."""
        durable = {"durable": "true", "auto-delete": "false"}
        dead_letter = {
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": f"{self.prefix}.dead",
        }
        if self.is_jobs(destination):
            return {**durable, "x-queue-type": "quorum", **dead_letter}
        if destination == self.results:
            return {**durable, "x-queue-type": "quorum", **dead_letter}
        if destination == self.results_binding:
            # Only a subscription declares here (the results queue, bound to the routes);
            # a SEND to a topic ignores these headers.
            return {**self.declaration(self.results), "x-queue-name": f"{self.prefix}.results"}
        if destination == self.dead:
            return {**durable, "x-queue-type": "quorum"}
        return {}
