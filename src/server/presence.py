"""The live list of workers, built from the presence messages they publish.

Workers announce themselves on the presence topic every heart-beat interval and at
every job start and end, so a worker on another host appears with no configuration.
One not heard from for two heart-beat intervals (its own as its presence says, or the
server's when longer) goes offline: it leaves the live list,
its running attempts are closed as 'lost' on the task timelines, and the dashboard
still shows it, offline, for OFFLINE_SECONDS (a worker that comes back, a frozen process
resumed, is live again). One that says it is leaving is simply removed.

Presence is data from the network, not code: the schema has already checked every field
(types, ranges, finite numbers) before a message gets here, and the registry is bounded
per broker login first (the login the broker vouches for, from the routing key a message
came with: src/messaging/destinations.py), names second. A login's first worker always
gets a slot (up to MAX_LOGINS logins); its further workers only while the registry holds
fewer than MAX_WORKERS and the login fewer than MAX_NAMES_PER_LOGIN. So one login that
floods forged names fills at most its own share and cannot keep another login's workers
out; what is dropped for room is counted, and `full()` names the logins turned away lately
(/health says so). Per worker, a token bucket of PRESENCE_BURST messages refilled at
PRESENCE_RATE per second (a worker sends one per heart-beat and two per job). A worker name
is bound to the login and the random `session` of its first message; only the server's
login may read the presence topic and its own subscription queue, so no worker can learn
another's session, and a message naming the worker from another login or session (a forged
"leaving" or "busy") is refused.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from src.messaging.schema import PresenceMessage

MAX_WORKERS = 256
MAX_NAMES_PER_LOGIN = 128  # workers of one login (one host's, or all hosts' sharing the default login)
MAX_LOGINS = 256
PRESENCE_RATE = 5.0  # messages per second, sustained
PRESENCE_BURST = 20.0
OFFLINE_SECONDS = 600.0  # how long an offline worker stays on the dashboard
HISTORY_POINTS = 60  # per worker (sent_at, CPU %, memory bytes): the dashboard's sparklines


@dataclass
class _Entry:
    login: str
    presence: PresenceMessage
    seen: float
    tokens: float
    refilled: float
    history: deque = field(default_factory=lambda: deque(maxlen=HISTORY_POINTS))


class WorkerRegistry:
    def __init__(self, heartbeat_ms: int, on_job_started: Callable[[str, int, float], None],
                 on_worker_gone: Callable[[str], None], on_dropped: Callable[[], None] = lambda: None):
        self.expiry_seconds = 2 * heartbeat_ms / 1000  # at least; a worker with a longer interval gets two of its own
        self._workers: dict[str, _Entry] = {}
        self._offline: dict[str, tuple[_Entry, float]] = {}  # name -> (last entry, gone at)
        self._lock = threading.Lock()
        self._on_job_started = on_job_started
        self._on_worker_gone = on_worker_gone
        self._on_dropped = on_dropped
        self._turned_away: dict[str, float] = {}  # login -> when a worker of it last found no room

    def _room(self, login: str, now: float) -> bool:
        """Whether a new worker of `login` gets a slot (lock held); remembers the login if not."""
        names = sum(1 for e in self._workers.values() if e.login == login)
        if names == 0:
            logins = len({e.login for e in self._workers.values()})
            room = logins < MAX_LOGINS
        else:
            room = names < MAX_NAMES_PER_LOGIN and len(self._workers) < MAX_WORKERS
        if not room:
            self._turned_away[login] = now
        return room

    def full(self) -> list[str]:
        """The logins whose new workers found no room in the last two heart-beat intervals."""
        since = time.time() - 2 * self.expiry_seconds
        with self._lock:
            for login in [name for name, at in self._turned_away.items() if at < since]:
                del self._turned_away[login]
            return sorted(self._turned_away)

    def login_of(self, worker: str) -> str | None:
        """The login a live worker's name is bound to."""
        with self._lock:
            entry = self._workers.get(worker)
            return entry.login if entry is not None else None

    def update(self, presence: PresenceMessage, login: str = "") -> str | None:
        """Apply a valid presence message that `login` sent; the reason if it is refused (None when
        applied or dropped). The collector always names the login; "" is one login like any other."""
        now = time.time()
        with self._lock:
            offline = self._offline.get(presence.worker)
            if offline is not None and (offline[0].login, offline[0].presence.session) == (login, presence.session):
                del self._offline[presence.worker]  # a frozen process resumed
                self._workers[presence.worker] = offline[0]
            entry = self._workers.get(presence.worker)
            if entry is not None and entry.login != login:
                return f"presence for Worker[{presence.worker}] from another broker login than the worker's"
            if entry is not None and entry.presence.session != presence.session:
                return f"presence for Worker[{presence.worker}] from another session than the worker's"
            if entry is None and (presence.state == "leaving" or not self._room(login, now)):
                if presence.state != "leaving":
                    self._on_dropped()
                return None
            if entry is not None:
                entry.tokens = min(PRESENCE_BURST, entry.tokens + (now - entry.refilled) * PRESENCE_RATE)
                entry.refilled = now
                if entry.tokens < 1:
                    self._on_dropped()
                    return None
            previous = entry.presence if entry is not None else None
            if presence.state == "leaving":
                del self._workers[presence.worker]
            else:
                if entry is None:
                    entry = self._workers[presence.worker] = _Entry(login, presence, now, PRESENCE_BURST, now)
                entry.presence, entry.seen, entry.tokens = presence, now, entry.tokens - 1
                entry.history.append((presence.sent_at, presence.cpu_percent, presence.memory_bytes))
        new_job = presence.job_id is not None and (previous is None or previous.job_id != presence.job_id)
        if new_job and presence.state == "busy":
            self._on_job_started(presence.worker, presence.job_id, presence.sent_at)
        return None

    def expire(self) -> list[str]:
        """Drop workers not heard from in two heart-beat intervals; returns their names."""
        now = time.time()
        with self._lock:
            gone = [name for name, entry in self._workers.items() if now - entry.seen > self._expiry(entry.presence)]
            for name in gone:
                self._offline[name] = (self._workers.pop(name), now)
            for name, (_, gone_at) in list(self._offline.items()):
                if now - gone_at > OFFLINE_SECONDS or len(self._offline) > MAX_WORKERS:
                    del self._offline[name]
        for name in gone:
            self._on_worker_gone(name)
        return gone

    def _expiry(self, presence: PresenceMessage) -> float:
        return max(self.expiry_seconds, 2 * presence.heartbeat_ms / 1000)

    def count(self) -> int:
        with self._lock:
            return len(self._workers)

    def offering(self, kind: str, route: str | None) -> dict[str, str]:
        """The live workers that take `kind` jobs of `route`: worker name -> software version."""
        offer = f"{kind}/{route}" if route else kind
        with self._lock:
            return {name: e.presence.offers[offer] for name, e in self._workers.items() if offer in e.presence.offers}

    def offers(self) -> list[str]:
        """Every kind/route some live worker takes."""
        with self._lock:
            return sorted({offer for e in self._workers.values() for offer in e.presence.offers})

    def snapshot(self, offline: bool = False) -> list[dict]:
        """The live workers, by name; with `offline`, also those offline (`online` false, `offline_since`)."""
        return [view for view, _ in self._views(offline)]

    def history(self) -> list[dict]:
        """Every worker, offline ones included, with its recent figures: `history` [[sent_at, CPU %, memory]]."""
        return [{**view, "history": [list(point) for point in points]} for view, points in self._views(True)]

    def _views(self, offline: bool) -> list[tuple[dict, list]]:
        now = time.time()
        with self._lock:
            entries = [(e.presence, e.seen, None, list(e.history)) for e in self._workers.values()]
            if offline:
                entries += [(e.presence, e.seen, gone_at, list(e.history)) for e, gone_at in self._offline.values()]
        return [(
            {
                "worker": p.worker, "host": p.host, "address": p.address, "pid": p.pid, "state": p.state,
                "job_id": p.job_id, "task_id": p.task_id, "kinds": list(p.kinds), "jobs_done": p.jobs_done,
                "mean_job_seconds": p.mean_job_seconds, "model": p.model, "device": p.device,
                "offers": dict(p.offers), "cores": p.cores, "load": p.load,
                "cpu_percent": p.cpu_percent, "memory_bytes": p.memory_bytes, "host_cpu_percent": p.host_cpu_percent,
                "host_memory_percent": p.host_memory_percent, "jobs_by_kind": dict(p.jobs_by_kind),
                "broker": p.broker, "precision": p.precision, "gpu_memory_bytes": p.gpu_memory_bytes,
                "gpu_memory_total_bytes": p.gpu_memory_total_bytes, "gpu_percent": p.gpu_percent,
                "last_heartbeat_age": round(now - seen, 2),
                "heartbeat_seconds": self._expiry(p) / 2,  # the page marks a worker stale past this
                "online": gone_at is None, "offline_since": gone_at,
            }, points)
            for p, seen, gone_at, points in sorted(entries, key=lambda e: e[0].worker)
        ]
