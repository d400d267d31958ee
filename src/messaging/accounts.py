"""Least-privilege RabbitMQ logins of one deployment: who may do what, and `make broker`'s provisioning.

RabbitMQ checks three permissions per user and virtual host, each a regular expression
over resource names: `configure` (declare, delete), `write` (publish to an exchange, bind
a queue), `read` (consume a queue, bind from an exchange), plus optional topic
permissions that restrict the routing keys used on a topic exchange.

Publishing is checked on the exchange, not the queue: a STOMP SEND to `/queue/x` goes
through the default exchange (`amq.default`), so whoever may write it may write every
queue of the virtual host. Workers therefore get no write on `amq.default` at all. They
publish results and presence through `amq.topic`, where topic permissions allow exactly
the routing keys `{p}.results.{login}` and `{p}.presence.{login}` of their own login (so the
server knows which login sent a message, and counts votes and presence slots per login:
destinations.py); the server binds the results queue to `{p}.results.#`. They read the jobs
queue (consumed without declaring it, as `/amq/queue/{p}.jobs.{kind}`) and the control
topic, through a subscription queue named `{p}.sub.{login}.*` (hence configure/write/read
on those names and no others: a worker cannot read the server's presence subscription, nor
another worker's). Measured against RabbitMQ 3.10 (tests/test_trust.py,
tests/test_identity.py): a worker login is refused publishing a job (`/queue/`,
`/amq/queue/`), a control message (`/topic/`, `/exchange/amq.topic/`) or a result or
presence under another login's key, subscribing to results or presence, reading the
server's subscription queue, and writing the dead queue.

Replicas (VERIFY_REPLICAS) defend against as many hosts as hold distinct worker logins:
`make broker WORKER_LOGIN=<host>` provisions one more worker login, `{p}-worker-<host>`,
and prints the BROKER_WORKER_USER/BROKER_WORKER_PASSWORD to set on that host.

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
from src.messaging.destinations import DEAD_QUEUE_BYTES, DEAD_QUEUE_LENGTH, DELIVERY_LIMIT, LOGIN, Destinations

DEFAULT_VHOST = "/"


@dataclass(frozen=True)
class Grant:
    """One user's permissions on the virtual host and on amq.topic."""

    configure: str
    write: str
    read: str
    topic_write: str
    topic_read: str


JOBS = r"jobs\.[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)?"  # a kind's queue, or one of its routes


def subscription_queues(prefix: str, login: str) -> str:
    """The names of `login`'s own /topic/ subscription queues (Destinations.subscription_queue)."""
    return rf"^{re.escape(prefix)}\.sub\.{re.escape(login)}\..+$"


def server_grant(prefix: str, login: str) -> Grant:
    """What the server of deployment `prefix` may do, as `login`."""
    p, own = re.escape(prefix), subscription_queues(prefix, login)
    queues = rf"^{p}\.({JOBS}|results|dead)$"
    return Grant(
        configure=f"{queues}|{own}",
        write=rf"^amq\.(default|topic)$|{queues}|{own}",
        read=rf"^amq\.topic$|{queues}|{own}",
        topic_write=rf"^{p}\.control$",
        topic_read=rf"^{p}\.(presence|results)\.#$",  # the bindings of every login's routes
    )


def worker_grant(prefix: str, login: str) -> Grant:
    """What a worker of deployment `prefix` logged in as `login` may do."""
    p, own = re.escape(prefix), subscription_queues(prefix, login)
    if not LOGIN.fullmatch(login):
        raise ValueError(f"a worker login is letters, digits, '_', '@' and '-', not {login!r}")
    return Grant(
        configure=own,
        write=rf"^amq\.topic$|{own}",
        read=rf"^{p}\.{JOBS}$|^amq\.topic$|{own}",
        topic_write=rf"^{p}\.(results|presence)\.{re.escape(login)}$",
        topic_read=rf"^{p}\.control$",
    )


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
        f"{prefix}-dead-length": (rf"^{p}\.dead$", {"max-length": DEAD_QUEUE_LENGTH,
                                                    "max-length-bytes": DEAD_QUEUE_BYTES, **spread}),
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


def provision_user(ctl: Ctl, user: str, password: str, grant: Grant, tags: tuple[str, ...] = (),
                   vhost: str = DEFAULT_VHOST) -> None:
    """Create the user (or set its password) and give it exactly `grant` and `tags` on `vhost`, and
    nothing on the default virtual host when that is not `vhost` (a login provisioned there by an
    older version). Never touches guest."""
    if user == "guest":
        raise ValueError("refusing to change the guest account's permissions")
    existing = {line.split("\t")[0] for line in ctl("list_users").splitlines()[1:]}
    # "--": a password may begin with "-" (token_urlsafe makes such), which rabbitmqctl would read as options
    if user in existing:
        ctl("change_password", "--", user, password)
    else:
        ctl("add_user", "--", user, password)
    ctl("set_user_tags", user, *tags)
    ctl("set_permissions", "-p", vhost, user, grant.configure, grant.write, grant.read)
    ctl("clear_topic_permissions", "-p", vhost, user, check=False)
    ctl("set_topic_permissions", "-p", vhost, user, "amq.topic", grant.topic_write, grant.topic_read)
    if vhost != DEFAULT_VHOST:
        ctl("clear_permissions", "-p", DEFAULT_VHOST, user, check=False)
        ctl("clear_topic_permissions", "-p", DEFAULT_VHOST, user, check=False)


def ensure_vhost(ctl: Ctl, vhost: str, guest: bool) -> None:
    """The deployment's own virtual host, made if missing; with `guest` (a deployment configured to
    log in as guest), guest may use all of it, as it may use "/"."""
    if vhost not in ctl("list_vhosts", "name").splitlines()[1:]:
        ctl("add_vhost", vhost)
    if guest and vhost != DEFAULT_VHOST:
        ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")


def provision(ctl: Ctl, prefix: str, server: tuple[str, str], *workers: tuple[str, str],
              vhost: str = DEFAULT_VHOST) -> None:
    """Virtual host, users and policies of one deployment. A login that is guest keeps guest's own permissions."""
    ensure_vhost(ctl, vhost, guest="guest" in (server[0], *(w[0] for w in workers)))
    if server[0] != "guest":
        # "management": the HTTP API's queue list (depths, rates) of the virtual hosts it may use (its
        # own), nothing more
        provision_user(ctl, *server, server_grant(prefix, server[0]), tags=("management",), vhost=vhost)
    for worker in workers:
        if worker[0] not in ("guest", server[0]):
            provision_user(ctl, *worker, worker_grant(prefix, worker[0]), vhost=vhost)
    for name, (pattern, definition) in policies(prefix).items():
        ctl("set_policy", "-p", vhost, "--apply-to", "queues", name, pattern, json.dumps(definition))


def remove(ctl: Ctl, prefix: str, users: list[str], vhost: str = DEFAULT_VHOST) -> None:
    """Undo `provision` (tests): delete the users, and the policies or the whole virtual host when
    it is not the default one (its queues with it)."""
    for user in users:
        if user != "guest":
            ctl("delete_user", user, check=False)
    if vhost != DEFAULT_VHOST:
        ctl("delete_vhost", vhost, check=False)
        return
    for name in policies(prefix):
        ctl("clear_policy", "-p", vhost, name, check=False)


def upgrade_queues(ctl: Ctl, prefix: str, vhost: str = DEFAULT_VHOST) -> list[str]:
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
    for line in ctl("list_queues", "-p", vhost, "name", "type", "messages").splitlines()[1:]:
        parts = line.split("\t")
        if len(parts) != 3 or parts[0] not in wanted or parts[1] == wanted[parts[0]]:
            continue
        if parts[2] == "0":
            ctl("delete_queue", "-p", vhost, parts[0])
        else:
            problems.append(f"queue {parts[0]} is a {parts[1]} queue holding {parts[2]} messages; this version "
                            f"declares it as {wanted[parts[0]]}. Drain it, then: rabbitmqctl delete_queue {parts[0]}")
    return problems


def logins_for(settings: Settings, logins_file: Path) -> tuple[tuple[str, str], tuple[str, str], str]:
    """The logins and virtual host to provision: the configured ones, or `{p}-server`/`{p}-worker` in a
    virtual host `/{p}` of their own (saved) instead of guest on "/"."""
    if (settings.server_login[0], settings.worker_login[0]) != ("guest", "guest"):
        return settings.server_login, settings.worker_login, settings.broker_vhost
    prefix = settings.queue_prefix
    known = config.provisioned_logins(logins_file, prefix)
    server = (known.get("BROKER_USER") or f"{prefix}-server", known.get("BROKER_PASSWORD") or secrets.token_urlsafe(24))
    worker = (known.get("BROKER_WORKER_USER") or f"{prefix}-worker",
              known.get("BROKER_WORKER_PASSWORD") or secrets.token_urlsafe(24))
    # the deployment's own virtual host: its management login sees no other deployment's queues
    vhost = settings.broker_vhost if settings.broker_vhost != DEFAULT_VHOST else f"/{prefix}"
    entries = yaml.safe_load(logins_file.read_text()) if logins_file.is_file() else {}
    entries = entries if isinstance(entries, dict) else {}
    entry = entries[prefix] if isinstance(entries.get(prefix), dict) else {}  # keeps the hosts' logins
    entries[prefix] = {**entry, "BROKER_USER": server[0], "BROKER_PASSWORD": server[1],
                       "BROKER_WORKER_USER": worker[0], "BROKER_WORKER_PASSWORD": worker[1], "BROKER_VHOST": vhost}
    logins_file.touch(mode=0o600)
    logins_file.write_text("# Broker logins provisioned by `make broker`, per QUEUE_PREFIX (secrets: keep private)\n"
                           + yaml.safe_dump(entries, sort_keys=True))
    return server, worker, vhost


def host_login(settings: Settings, logins_file: Path, host: str) -> tuple[str, str]:
    """`{p}-worker-<host>`: one more worker login, for one host (saved beside the others, under `workers`)."""
    prefix = settings.queue_prefix
    user = f"{prefix}-worker-" + re.sub(r"[^A-Za-z0-9_-]", "-", host)
    if not host or not LOGIN.fullmatch(user):
        raise SystemExit(f"WORKER_LOGIN={host!r}: a host name of letters, digits, '.', '_' and '-', please")
    entries = yaml.safe_load(logins_file.read_text()) if logins_file.is_file() else {}
    entries = entries if isinstance(entries, dict) else {}
    if not isinstance(entries.get(prefix), dict):
        entries[prefix] = {}
    if not isinstance(entries[prefix].get("workers"), dict):
        entries[prefix]["workers"] = {}
    hosts = entries[prefix]["workers"]
    known = hosts.get(host) if isinstance(hosts.get(host), dict) else {}
    login = (user, str(known.get("BROKER_WORKER_PASSWORD") or secrets.token_urlsafe(24)))
    hosts[host] = {"BROKER_WORKER_USER": login[0], "BROKER_WORKER_PASSWORD": login[1]}
    logins_file.touch(mode=0o600)
    logins_file.write_text("# Broker logins provisioned by `make broker`, per QUEUE_PREFIX (secrets: keep private)\n"
                           + yaml.safe_dump(entries, sort_keys=True))
    return login


def main() -> None:
    parser = argparse.ArgumentParser(description="Provision this deployment's broker logins and queues.")
    parser.add_argument("--ctl", default="rabbitmqctl", help="how to run rabbitmqctl (e.g. through docker compose)")
    parser.add_argument("--worker-login", default="", metavar="HOST",
                        help="also provision a worker login of its own for this host (make broker WORKER_LOGIN=host)")
    args = parser.parse_args()
    settings = config.load()
    ctl = Ctl(args.ctl)
    generated = (settings.server_login[0], settings.worker_login[0]) == ("guest", "guest")
    server, worker, vhost = logins_for(settings, Path(settings.broker_logins_file))
    provision(ctl, settings.queue_prefix, server, worker, vhost=vhost)
    if args.worker_login:
        host = host_login(settings, Path(settings.broker_logins_file), args.worker_login)
        provision(ctl, settings.queue_prefix, server, host, vhost=vhost)
        print(f"broker: worker login for host {args.worker_login!r}; on that host set\n"
              f"  BROKER_WORKER_USER={host[0]}\n  BROKER_WORKER_PASSWORD={host[1]}\n  BROKER_VHOST={vhost}\n"
              f"(also in {settings.broker_logins_file}). Replicas (VERIFY_REPLICAS) count one vote per login.")
    for problem in upgrade_queues(ctl, settings.queue_prefix, vhost):
        print(f"broker: {problem}", file=sys.stderr)
    from src.kinds import registry
    from src.messaging.broker import Broker

    provisioner = Broker(settings.with_overrides(broker_user=server[0], broker_password=server[1],
                                                 broker_vhost=vhost), "provision")
    provisioner.declare_topology(registry.queues(registry.names()))
    print(f"broker: logins for QUEUE_PREFIX={settings.queue_prefix} in virtual host {vhost!r}: server {server[0]!r}, "
          f"workers {worker[0]!r}"
          + (f" (passwords in {settings.broker_logins_file})" if generated else ""))


if __name__ == "__main__":
    main()
