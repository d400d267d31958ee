"""Least-privilege RabbitMQ logins of one deployment: who may do what, and `make broker`'s provisioning.

RabbitMQ checks three permissions per user and virtual host, each a regular expression
over resource names: `configure` (declare, delete), `write` (publish to an exchange, bind
a queue), `read` (consume a queue, bind from an exchange), plus optional topic
permissions that restrict the routing keys used on a topic exchange.

Publishing is checked on the exchange, not the queue: a STOMP SEND to `/queue/x` goes
through the default exchange (`amq.default`), so whoever may write it may write every
queue of the virtual host. Workers therefore get no write on `amq.default` at all. They
publish results and presence through `amq.topic`, where topic permissions allow exactly
the routing keys `{p}.results` and `{p}.presence`; the server binds the results queue to
`{p}.results` (destinations.py). They read the jobs queue (consumed without declaring it,
as `/amq/queue/{p}.jobs.{kind}`) and the control topic, whose subscription queue is their own
`stomp-subscription-*` queue (hence configure/write/read on those names). Measured
against RabbitMQ 3.10 (tests/test_trust.py): a worker login is refused publishing a job
(`/queue/`, `/amq/queue/`) or a control message (`/topic/`, `/exchange/amq.topic/`),
subscribing to results or presence, and writing the dead queue.

`python -m src.messaging.accounts` (run by `make broker`) provisions the configured logins,
the delivery-limit policies, and declares the queues; when the logins are the guest
defaults it creates `{p}-server` and `{p}-worker` with random passwords and writes them to
BROKER_LOGINS_FILE, which `src.config` reads for that prefix. It never changes guest.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from src import config
from src.config import Settings
from src.messaging.destinations import DEAD_QUEUE_LENGTH, DELIVERY_LIMIT, Destinations

VHOST = "/"
SUBSCRIPTION_QUEUES = r"^stomp-subscription-.*$"  # the queues RabbitMQ's STOMP plugin makes for /topic/ subscriptions


@dataclass(frozen=True)
class Grant:
    """One user's permissions on the virtual host and on amq.topic."""

    configure: str
    write: str
    read: str
    topic_write: str
    topic_read: str


def grants(prefix: str) -> dict[str, Grant]:
    """What the server and a worker of deployment `prefix` may do."""
    p = re.escape(prefix)
    jobs = r"jobs\.[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)?"  # a kind's queue, or one of its routes
    queues = rf"^{p}\.({jobs}|results|dead)$"
    return {
        "server": Grant(
            configure=f"{queues}|{SUBSCRIPTION_QUEUES}",
            write=rf"^amq\.(default|topic)$|{queues}|{SUBSCRIPTION_QUEUES}",
            read=rf"^amq\.topic$|{queues}|{SUBSCRIPTION_QUEUES}",
            topic_write=rf"^{p}\.control$",
            topic_read=rf"^{p}\.(presence|results)$",
        ),
        "worker": Grant(
            configure=SUBSCRIPTION_QUEUES,
            write=rf"^amq\.topic$|{SUBSCRIPTION_QUEUES}",
            read=rf"^{p}\.{jobs}$|^amq\.topic$|{SUBSCRIPTION_QUEUES}",
            topic_write=rf"^{p}\.(results|presence)$",
            topic_read=rf"^{p}\.control$",
        ),
    }


def policies(prefix: str) -> dict[str, tuple[str, dict]]:
    """name → (queue pattern, definition): the delivery limit and the bounded dead queue.

    Only one policy applies to a queue, so each also spreads its queues' leaders over a
    cluster's nodes ("balanced"); by default every leader sits on the node where the server
    first connected, which then carries all the traffic.
    """
    p = re.escape(prefix)
    spread = {"queue-leader-locator": "balanced"}
    return {
        f"{prefix}-delivery-limit": (rf"^{p}\.(jobs\..+|results)$", {"delivery-limit": DELIVERY_LIMIT, **spread}),
        f"{prefix}-dead-length": (rf"^{p}\.dead$", {"max-length": DEAD_QUEUE_LENGTH, **spread}),
    }


class Ctl:
    """rabbitmqctl, locally or inside the compose container (`--ctl`)."""

    def __init__(self, command: str = "rabbitmqctl"):
        self.command = shlex.split(command)

    def __call__(self, *args: str, check: bool = True) -> str:
        proc = subprocess.run([*self.command, "-q", *args], capture_output=True, text=True, timeout=120)
        if check and proc.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {args[0]} failed: {(proc.stderr or proc.stdout).strip()[:500]}")
        return proc.stdout


def provision_user(ctl: Ctl, user: str, password: str, grant: Grant, tags: tuple[str, ...] = ()) -> None:
    """Create the user (or set its password) and give it exactly `grant` and `tags`. Never touches guest."""
    if user == "guest":
        raise ValueError("refusing to change the guest account's permissions")
    existing = {line.split("\t")[0] for line in ctl("list_users").splitlines()[1:]}
    # "--": a password may begin with "-" (token_urlsafe makes such), which rabbitmqctl would read as options
    if user in existing:
        ctl("change_password", "--", user, password)
    else:
        ctl("add_user", "--", user, password)
    ctl("set_user_tags", user, *tags)
    ctl("set_permissions", "-p", VHOST, user, grant.configure, grant.write, grant.read)
    ctl("clear_topic_permissions", "-p", VHOST, user, check=False)
    ctl("set_topic_permissions", "-p", VHOST, user, "amq.topic", grant.topic_write, grant.topic_read)


def provision(ctl: Ctl, prefix: str, server: tuple[str, str], worker: tuple[str, str]) -> None:
    """Users and policies of one deployment. A login that is guest keeps guest's own permissions."""
    roles = grants(prefix)
    if server[0] != "guest":
        # "management": the HTTP API's queue list (depths, rates) of the virtual hosts it may use, nothing more
        provision_user(ctl, *server, roles["server"], tags=("management",))
    if worker[0] not in ("guest", server[0]):
        provision_user(ctl, *worker, roles["worker"])
    for name, (pattern, definition) in policies(prefix).items():
        ctl("set_policy", "-p", VHOST, "--apply-to", "queues", name, pattern, json.dumps(definition))


def remove(ctl: Ctl, prefix: str, users: list[str]) -> None:
    """Undo `provision` (tests): delete the users and the policies."""
    for user in users:
        if user != "guest":
            ctl("delete_user", user, check=False)
    for name in policies(prefix):
        ctl("clear_policy", "-p", VHOST, name, check=False)


def upgrade_queues(ctl: Ctl, prefix: str) -> list[str]:
    """Delete this deployment's queues that an older version declared differently, when empty.

    RabbitMQ refuses to re-declare a queue with other arguments (the results queue was a
    classic queue before it became a quorum queue), and its STOMP plugin then closes the
    connection. An empty queue is deleted here and declared anew by the server; one that
    still holds messages is left for a person, with the command that deletes it.
    """
    destinations = Destinations(prefix)
    wanted = {name.removeprefix("/queue/"): destinations.declaration(name)["x-queue-type"]
              for name in (destinations.results, destinations.dead)}
    problems = []
    for line in ctl("list_queues", "-p", VHOST, "name", "type", "messages").splitlines()[1:]:
        parts = line.split("\t")
        if len(parts) != 3 or parts[0] not in wanted or parts[1] == wanted[parts[0]]:
            continue
        if parts[2] == "0":
            ctl("delete_queue", "-p", VHOST, parts[0])
        else:
            problems.append(f"queue {parts[0]} is a {parts[1]} queue holding {parts[2]} messages; this version "
                            f"declares it as {wanted[parts[0]]}. Drain it, then: rabbitmqctl delete_queue {parts[0]}")
    return problems


def logins_for(settings: Settings, logins_file: Path) -> tuple[tuple[str, str], tuple[str, str]]:
    """The logins to provision: the configured ones, or `{p}-server`/`{p}-worker` (saved) instead of guest."""
    if (settings.server_login[0], settings.worker_login[0]) != ("guest", "guest"):
        return settings.server_login, settings.worker_login
    prefix = settings.queue_prefix
    known = config.provisioned_logins(logins_file, prefix)
    server = (known.get("BROKER_USER") or f"{prefix}-server", known.get("BROKER_PASSWORD") or secrets.token_urlsafe(24))
    worker = (known.get("BROKER_WORKER_USER") or f"{prefix}-worker",
              known.get("BROKER_WORKER_PASSWORD") or secrets.token_urlsafe(24))
    entries = yaml.safe_load(logins_file.read_text()) if logins_file.is_file() else {}
    entries = entries if isinstance(entries, dict) else {}
    entries[prefix] = {"BROKER_USER": server[0], "BROKER_PASSWORD": server[1],
                       "BROKER_WORKER_USER": worker[0], "BROKER_WORKER_PASSWORD": worker[1]}
    logins_file.touch(mode=0o600)
    logins_file.write_text("# Broker logins provisioned by `make broker`, per QUEUE_PREFIX (secrets: keep private)\n"
                           + yaml.safe_dump(entries, sort_keys=True))
    return server, worker


def main() -> None:
    parser = argparse.ArgumentParser(description="Provision this deployment's broker logins and queues.")
    parser.add_argument("--ctl", default="rabbitmqctl", help="how to run rabbitmqctl (e.g. through docker compose)")
    args = parser.parse_args()
    settings = config.load()
    ctl = Ctl(args.ctl)
    generated = (settings.server_login[0], settings.worker_login[0]) == ("guest", "guest")
    server, worker = logins_for(settings, Path(settings.broker_logins_file))
    provision(ctl, settings.queue_prefix, server, worker)
    for problem in upgrade_queues(ctl, settings.queue_prefix):
        print(f"broker: {problem}", file=sys.stderr)
    from src.kinds import registry
    from src.messaging.broker import Broker

    provisioner = Broker(settings.with_overrides(broker_user=server[0], broker_password=server[1]), "provision")
    provisioner.declare_topology(registry.queues(registry.names()))
    print(f"broker: logins for QUEUE_PREFIX={settings.queue_prefix}: server {server[0]!r}, workers {worker[0]!r}"
          + (f" (passwords in {settings.broker_logins_file})" if generated else ""))


if __name__ == "__main__":
    main()
