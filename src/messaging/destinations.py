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
  SEND goes through the default exchange, which also reaches the jobs queue. So workers
  publish to `/topic/{p}.results` (amq.topic, routing key `{p}.results`), whose routing
  key their topic permissions allow, and the server's subscription binds the results
  queue to it (`x-queue-name`). See src/messaging/accounts.py.
- dead: where refused and exhausted messages are parked for a person to inspect; a quorum
  queue as well, so that on a cluster parking works while any one node is down (a classic
  queue lives on one node, and with that node down every park closed the connection).
- control, presence: topics; every subscriber gets every message, nothing is kept.

RabbitMQ 3.10's STOMP plugin drops an `x-delivery-limit` header, so the delivery limit is
a policy (`accounts.policies`), which also applies to queues that already exist.
"""

from __future__ import annotations

from dataclasses import dataclass

# Deliveries of one message before the broker dead-letters it (a policy, see above). A
# backstop: workers give up on a job after MAX_ATTEMPTS deliveries, and the collector parks
# a result it could not handle; this bounds what a rogue consumer that requeues can do.
DELIVERY_LIMIT = 10
# The dead queue keeps this many messages (the oldest are dropped): a flood of refused
# messages cannot fill the broker's disk.
DEAD_QUEUE_LENGTH = 10_000


@dataclass(frozen=True)
class Destinations:
    prefix: str

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
        """Where workers send results: amq.topic, bound to the results queue."""
        return f"/topic/{self.prefix}.results"

    @property
    def dead(self) -> str:
        return f"/queue/{self.prefix}.dead"

    @property
    def control(self) -> str:
        return f"/topic/{self.prefix}.control"

    @property
    def presence(self) -> str:
        return f"/topic/{self.prefix}.presence"

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
        if destination == self.results_route:
            # Only a subscription declares here (the results queue, bound to the route);
            # a SEND to a topic ignores these headers.
            return {**self.declaration(self.results), "x-queue-name": f"{self.prefix}.results"}
        if destination == self.dead:
            return {**durable, "x-queue-type": "quorum"}
        return {}
