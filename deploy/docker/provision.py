"""The compose stack's broker provisioning, as `make broker` does it (src/messaging/accounts.py).

`make broker` runs `python -m src.messaging.accounts` with rabbitmqctl beside the broker. In
the stack the broker is another container (the official RabbitMQ image, or the Debian one),
so the same provisioning reaches it in two steps, both run from the server image:

- `provision.py definitions` (before the broker starts): the logins, as `make broker` picks
  them (`accounts.logins_for`: the configured ones, or `{p}-server` and `{p}-worker` with
  random passwords kept from one run to the next, in a virtual host of the deployment's own),
  and `accounts.provision`'s rabbitmqctl
  calls recorded into a RabbitMQ definitions file that the broker loads at boot (users,
  permissions, topic permissions, policies). The server's logins file goes to
  /run/karaoke/server and one with the worker's login only to /run/karaoke/worker, each on
  a volume that only that role mounts.
- `provision.py topology` (once the broker is up): declares the queues with the server's
  login, as `accounts.main` does, so that workers can start before the server.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import sys
from pathlib import Path

import yaml

sys.path.insert(0, "/app")

from src import config  # noqa: E402
from src.messaging import accounts  # noqa: E402

SERVER_LOGINS = Path("/run/karaoke/server/broker-logins.yaml")
WORKER_LOGINS = Path("/run/karaoke/worker/broker-logins.yaml")
DEFINITIONS = Path("/run/karaoke/broker/definitions.json")


def password_hash(password: str) -> str:
    """RabbitMQ's rabbit_password_hashing_sha256: base64(salt + sha256(salt + password)), 4-byte salt."""
    salt = secrets.token_bytes(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


class Recorder(accounts.Ctl):
    """A rabbitmqctl that writes RabbitMQ definitions instead of changing a running broker."""

    def __init__(self) -> None:
        self.users: dict[str, dict] = {}
        self.vhosts: set[str] = {accounts.DEFAULT_VHOST}
        self.permissions: list[dict] = []
        self.topic_permissions: list[dict] = []
        self.policies: list[dict] = []

    def __call__(self, *args: str, check: bool = True) -> str:
        command, rest = args[0], list(args[1:])
        options: dict[str, str] = {}
        positional: list[str] = []
        while rest:
            word = rest.pop(0)
            if word == "--":
                positional.extend(rest)
                break
            if word in ("-p", "--vhost", "--apply-to", "--priority"):
                options[word] = rest.pop(0)
            else:
                positional.append(word)
        vhost = options.get("-p", options.get("--vhost", accounts.DEFAULT_VHOST))
        self.vhosts.add(vhost)
        if command in ("list_users", "list_queues", "list_vhosts"):
            return ""  # a new broker: nothing there yet
        if command in ("add_user", "change_password"):
            user, password = positional
            self.users.setdefault(user, {"tags": ""})["password_hash"] = password_hash(password)
        elif command == "set_user_tags":
            self.users.setdefault(positional[0], {})["tags"] = ",".join(positional[1:])
        elif command == "add_vhost":
            self.vhosts.add(positional[0])
        elif command == "set_permissions":
            user, configure, write, read = positional
            self.permissions.append({"user": user, "vhost": vhost, "configure": configure, "write": write,
                                     "read": read})
        elif command == "set_topic_permissions":
            user, exchange, write, read = positional
            self.topic_permissions.append({"user": user, "vhost": vhost, "exchange": exchange, "write": write,
                                           "read": read})
        elif command == "set_policy":
            name, pattern, definition = positional
            self.policies.append({"vhost": vhost, "name": name, "pattern": pattern,
                                  "apply-to": options.get("--apply-to", "all"),
                                  "definition": json.loads(definition),
                                  "priority": int(options.get("--priority", 0))})
        elif not command.startswith("clear_") and not command.startswith("delete_"):
            raise RuntimeError(f"provision.py cannot record `rabbitmqctl {command}`: add it to Recorder")
        return ""

    def definitions(self) -> dict:
        users = [{"name": name, "password_hash": user["password_hash"],
                  "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": user.get("tags", "")}
                 for name, user in self.users.items()]
        return {"users": users, "vhosts": [{"name": v} for v in sorted(self.vhosts)],
                "permissions": self.permissions, "topic_permissions": self.topic_permissions,
                "policies": self.policies}


def write(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.touch(mode=mode)
    temporary.chmod(mode)
    temporary.write_text(text)
    os.replace(temporary, path)


def definitions() -> None:
    settings = config.load(dict(os.environ, BROKER_LOGINS_FILE=str(SERVER_LOGINS)))
    server, worker, vhost = accounts.logins_for(settings, SERVER_LOGINS)
    recorder = Recorder()
    accounts.provision(recorder, settings.queue_prefix, server, worker, vhost=vhost)
    # the broker's own user reads this file: it holds salted hashes, never a password
    write(DEFINITIONS, json.dumps(recorder.definitions(), indent=1), 0o644)
    if SERVER_LOGINS.is_file():  # generated logins: the workers get theirs, not the server's
        entries = {settings.queue_prefix: {"BROKER_WORKER_USER": worker[0], "BROKER_WORKER_PASSWORD": worker[1],
                                           "BROKER_VHOST": vhost}}
        write(WORKER_LOGINS, "# The worker's broker login (provision.py)\n" + yaml.safe_dump(entries), 0o600)
    print(f"provision: definitions for QUEUE_PREFIX={settings.queue_prefix} in virtual host {vhost!r}: "
          f"server {server[0]!r}, workers {worker[0]!r}, {len(recorder.policies)} policies")


def topology() -> None:
    from src.kinds import registry
    from src.messaging.broker import Broker

    settings = config.load(dict(os.environ, BROKER_LOGINS_FILE=str(SERVER_LOGINS)))
    Broker(settings, "provision").declare_topology(registry.queues(registry.names()))
    print(f"provision: queues of QUEUE_PREFIX={settings.queue_prefix} declared")


if __name__ == "__main__":
    steps = {"definitions": definitions, "topology": topology}
    if len(sys.argv) != 2 or sys.argv[1] not in steps:
        sys.exit(f"usage: provision.py {'|'.join(steps)}")
    steps[sys.argv[1]]()
