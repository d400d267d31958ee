"""The images' HEALTHCHECK: `python3 deploy/docker/healthcheck.py [server|worker]`, exit 0 when healthy.

Without an argument it checks the role of the process the container runs (`src.server` or
`src.audio_worker` on its command line), so one HEALTHCHECK serves every image.

- server: its own `GET /health` answers 200 on the port it listens on inside the container.
- worker: the worker holds an established TCP connection to one of the broker's nodes (a
  worker has no port of its own; without its broker connection it can take no job).

Settings come from the environment through src/config.py, as the processes themselves read them.
"""

from __future__ import annotations

import sys
import urllib.request
from pathlib import Path

sys.path.insert(0, "/app")

from src import config  # noqa: E402  (the image's source tree, whatever the working folder)


def server_healthy(settings: config.Settings) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{settings.server_port}/health", timeout=8) as answer:
        return answer.status == 200


def worker_healthy(settings: config.Settings) -> bool:
    import psutil

    ports = {port for _, port in settings.broker_nodes}
    return any(c.status == psutil.CONN_ESTABLISHED and c.raddr and c.raddr.port in ports
               for c in psutil.net_connections(kind="tcp"))


def running_role() -> str:
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            words = cmdline.read_bytes().split(b"\0")
        except OSError:  # a process that ended meanwhile
            continue
        if b"src.server" in words:
            return "server"
        if b"src.audio_worker" in words:
            return "worker"
    return ""


def main() -> int:
    role = sys.argv[1] if len(sys.argv) > 1 else running_role()
    checks = {"server": server_healthy, "worker": worker_healthy}
    if role not in checks:
        print(f"usage: healthcheck.py [{'|'.join(checks)}] (no server or worker process runs here)",
              file=sys.stderr)
        return 2
    try:
        healthy = checks[role](config.load())
    except Exception as exc:  # any failure is "unhealthy", with the reason in `docker inspect`
        print(f"{role} unhealthy: {exc}", file=sys.stderr)
        return 1
    print(f"{role} {'healthy' if healthy else 'unhealthy: no broker connection'}")
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
