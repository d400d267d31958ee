"""Queue and topic names of one deployment, and the headers that declare them.

RabbitMQ's STOMP plugin declares a queue on the first SEND or SUBSCRIBE that names it,
with the `x-*` headers of that frame as queue arguments, and closes the connection of
any later frame whose arguments differ. So every frame that touches a queue takes its
headers from here.

- jobs: a quorum queue, because a quorum queue counts deliveries (`x-delivery-count`),
  crashes included, which is what bounds the attempts at a poison job. Jobs that are
  given up on are dead-lettered to the dead queue.
- results: a durable classic queue (results are large; they need no delivery count);
  results the server cannot use are dead-lettered too.
- dead: where refused and exhausted messages are parked for a person to inspect.
- control, presence: topics; every subscriber gets every message, nothing is kept.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Destinations:
    prefix: str

    @property
    def jobs(self) -> str:
        return f"/queue/{self.prefix}.jobs"

    @property
    def results(self) -> str:
        return f"/queue/{self.prefix}.results"

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
        if destination == self.jobs:
            return {**durable, "x-queue-type": "quorum", **dead_letter}
        if destination == self.results:
            return {**durable, "x-queue-type": "classic", **dead_letter}
        if destination == self.dead:
            return {**durable, "x-queue-type": "classic"}
        return {}

    def queue_names(self) -> list[str]:
        """Broker-side names (for rabbitmqctl), without the /queue/ prefix."""
        return [d.removeprefix("/queue/") for d in (self.jobs, self.results, self.dead)]
