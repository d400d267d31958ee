"""The one place configuration is read.

Defaults live in `DEFAULTS`; a YAML file (`CONFIG_FILE`, default `config.yaml` when it
exists) overrides them; environment variables override both. The broker logins are the one
exception to "defaults are constants": where `make broker` provisioned least-privilege
logins for this QUEUE_PREFIX, it wrote them to BROKER_LOGINS_FILE, and those replace the
guest/guest defaults of the four login settings (set any of them explicitly to override), and
the virtual host it made for the deployment (`/{QUEUE_PREFIX}`) replaces BROKER_VHOST's "/". `load()` is called once
by each entry point (server, worker, supervisor, tools) and the resulting `Settings`
object is passed down, so no module below reads the environment itself.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

DEFAULTS: dict[str, Any] = {
    "BROKER_HOST": "localhost",
    "BROKER_PORT": 61613,
    "BROKER_HOSTS": "",  # host:port,host:port,... of a cluster's nodes; replaces BROKER_HOST/PORT when set
    # RabbitMQ's management HTTP API (queue depths and rates for the dashboard), read with the
    # server's login; comma list, tried in order; empty: http://<first broker node's host>:15672
    "BROKER_MANAGEMENT_URL": "",
    "BROKER_USER": "guest",
    "BROKER_PASSWORD": "guest",  # RabbitMQ's documented local-only default account
    "BROKER_WORKER_USER": "",  # empty: the same login as the server
    "BROKER_WORKER_PASSWORD": "",
    "BROKER_LOGINS_FILE": "broker-logins.yaml",
    # RabbitMQ virtual host; empty: the one `make broker` made for this QUEUE_PREFIX with its
    # logins (`/{QUEUE_PREFIX}`, named in BROKER_LOGINS_FILE), else "/"
    "BROKER_VHOST": "",
    "BROKER_HEARTBEAT_MS": 15000,
    "BROKER_TLS": False,
    "BROKER_TLS_CA": "",
    "QUEUE_PREFIX": "karaoke",
    "SERVER_HOST": "127.0.0.1",
    "SERVER_PORT": 5000,
    "STORAGE_DIR": "storage",
    "MODEL": "htdemucs",
    "MODEL_REPO": "",
    "MODEL_SEGMENT": 0.0,
    "CHUNK_SECONDS": 30.0,
    "MAX_ATTEMPTS": 3,
    "JOB_DEADLINE_SECONDS": 60.0,
    "JOB_DEADLINE_FACTOR": 10.0,
    "WORKERS_HEALTHY": 2,
    "WORKERS_UNHEALTHY": 0,
    "WORKER_SIMULATE_CRASH_AFTER": 20.0,
    "WORKER_SIMULATE": "crash",
    "WORKER_KINDS": "",  # empty: every kind this host can run
    "WORKER_THREADS": 0,
    "WORKER_PREFETCH": 1,
    "WORKER_SLOWDOWN": 1.0,
    "DEVICE": "auto",  # auto | cpu | cuda | cuda:N,cuda:M (see workers_layout)
    # separation: model segments fed to demucs at once; auto: from free device memory (1 on a CPU)
    "SEGMENT_BATCH": "auto",
    "PRECISION": "fp32",  # separation on a GPU: fp32 (TF32 off) | tf32 | bf16 (autocast)
    "WORKERS_PER_GPU": 1,
    "MAX_UPLOAD_MB": 200,
    "MAX_DURATION_S": 7200.0,
    "MAX_CHANNELS": 8,
    "MAX_PIXELS": 8_294_400,  # a picture's pixels at most: 3840x2160 (4K UHD)
    "MAX_FPS": 240.0,  # frames a second at most: the fastest cameras people upload (slow-motion phones)
    "MAX_FRAMES": 432_000,  # a video's frames at most: MAX_DURATION_S's 2 hours at 60 fps
    "STORAGE_MAX_GB": 50.0,  # STORAGE_DIR's disk use at most; an upload over it answers 507
    "CORS_ORIGINS": "",
    "ALLOWED_HOSTS": "",
    "TRUSTED_PROXIES": 0,
    "OPERATOR_TOKEN": "",
    "SERVER_THREADS": 32,
    "SSE_MAX_CLIENTS": 24,
    "CACHE_MB": 2048,  # results cache (whole tasks and single jobs), least recently used evicted
    "WATCH_DIR": "",  # empty: STORAGE_DIR/watch
    "WATCH_TASK": '{"kind": "transcode", "params": {"codec": "h264", "crf": 23}}',
    "VERIFY": "off",  # off | psnr: also measure each transcoded chunk against its source
    "VERIFY_MIN_PSNR": 30.0,
    # 0-1: the fraction of video chunks the server fully checks (a clean decode; transcode: also
    # VERIFY_MIN_PSNR against the source); the rest are judged by their packets alone
    "VERIFY_SAMPLE": 0.0,
    "VERIFY_REPLICAS": 1,  # k > 1: each job runs on k workers and the majority checksum wins
    "POWERCAP_ROOT": "/sys/class/powercap",
    # Cloud Carbon Footprint's average for a fully busy vCPU (AWS, max watts 3.5): the
    # estimate used where RAPL cannot be read
    "WATTS_PER_CORE": 3.5,
    "CAPTURE_SECONDS": 30,
    "CAPTURE_IFACE": "lo",
    # the data plane (src/data): where job inputs and results travel, apart from the broker
    "DATA_STORE": "",  # empty: the server's own data endpoint; s3://bucket/prefix: an S3 bucket
    "DATA_URL": "",  # the data endpoint's address as workers reach it; empty: http://SERVER_HOST:DATA_PORT
    "DATA_PORT": 0,  # the data endpoint's port; 0: SERVER_PORT + 1
    # the data endpoint's listening address; empty: SERVER_HOST's. Workers on other hosts need
    # it (DATA_HOST=0.0.0.0) while the page's API may stay on loopback
    "DATA_HOST": "",
    "DATA_SECRET": "",  # the references' HMAC key; empty: made once, kept in STORAGE_DIR/data/secret
}


@dataclass(frozen=True)
class Settings:
    broker_host: str
    broker_port: int
    broker_hosts: str
    broker_management_url: str
    broker_user: str
    broker_password: str
    broker_worker_user: str
    broker_worker_password: str
    broker_logins_file: str
    broker_vhost: str
    broker_heartbeat_ms: int
    broker_tls: bool
    broker_tls_ca: str
    queue_prefix: str
    server_host: str
    server_port: int
    storage_dir: Path
    model: str
    model_repo: str
    model_segment: float
    chunk_seconds: float
    max_attempts: int
    job_deadline_seconds: float
    job_deadline_factor: float
    workers_healthy: int
    workers_unhealthy: int
    worker_simulate_crash_after: float
    worker_simulate: str
    worker_kinds: str
    worker_threads: int
    worker_prefetch: int
    worker_slowdown: float
    device: str
    segment_batch: str
    precision: str
    workers_per_gpu: int
    max_upload_mb: int
    max_duration_s: float
    max_channels: int
    max_pixels: int
    max_fps: float
    max_frames: int
    storage_max_gb: float
    cors_origins: str
    allowed_hosts: str
    trusted_proxies: int
    operator_token: str
    server_threads: int
    sse_max_clients: int
    cache_mb: int
    watch_dir: Path
    watch_task: str
    verify: str
    verify_min_psnr: float
    verify_sample: float
    verify_replicas: int
    powercap_root: Path
    watts_per_core: float
    capture_seconds: int
    capture_iface: str
    data_store: str
    data_url: str
    data_port: int
    data_host: str
    data_secret: str

    @property
    def broker_nodes(self) -> list[tuple[str, int]]:
        """The broker's STOMP endpoints, in the order they are tried: BROKER_HOSTS, else BROKER_HOST:PORT."""
        if not self.broker_hosts:
            return [(self.broker_host, self.broker_port)]
        return [parse_endpoint(entry) for entry in self.broker_hosts.split(",") if entry.strip()]

    @property
    def management_urls(self) -> list[str]:
        """Where the management HTTP API answers, in the order to try."""
        if self.broker_management_url:
            return [url.strip().rstrip("/") for url in self.broker_management_url.split(",") if url.strip()]
        host = self.broker_nodes[0][0]
        return [f"http://{'[' + host + ']' if ':' in host else host}:15672"]

    @property
    def threads_per_worker(self) -> int:
        """Torch threads per worker: cores ÷ workers unless set, so N workers don't oversubscribe."""
        if self.worker_threads > 0:
            return self.worker_threads
        workers = max(1, self.workers_healthy + self.workers_unhealthy)
        return max(1, (os.cpu_count() or 1) // workers)

    @property
    def data_address(self) -> str:
        """Where workers reach the data endpoint: DATA_URL, else DATA_HOST on DATA_PORT (the
        host's name where it listens on every address)."""
        if self.data_url:
            return self.data_url.rstrip("/")
        host = self.data_host
        if host in ("0.0.0.0", "::", ""):
            host = socket.getfqdn()
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.data_port}"

    @property
    def listens_beyond_loopback(self) -> bool:
        return not is_loopback(self.server_host)

    @property
    def server_login(self) -> tuple[str, str]:
        return self.broker_user, self.broker_password

    @property
    def worker_login(self) -> tuple[str, str]:
        """BROKER_WORKER_USER/PASSWORD, or the server's login when they are not set (the contract's default)."""
        if self.broker_worker_user:
            return self.broker_worker_user, self.broker_worker_password
        return self.server_login

    @property
    def workers_configured(self) -> int:
        return self.workers_healthy + self.workers_unhealthy

    def with_overrides(self, **changes: Any) -> Settings:
        return replace(self, **changes)

    def as_env(self) -> dict[str, str]:
        """The settings as environment variables, for child processes started by a supervisor."""
        env = {}
        for field in fields(self):
            if field.name == "data_secret":
                continue  # the server's alone: a worker holding it could sign references to any job's data
            value = getattr(self, field.name)
            if isinstance(value, bool):
                value = int(value)
            env[field.name.upper()] = str(value)
        return env


def cpu_layout(cores: int) -> tuple[int, int]:
    """(workers, threads each) for separation workers on a CPU host of `cores` cores.

    Measured (docs/BENCHMARKS.md, "GPU workers and layout"): on 2 cores two 1-thread workers
    beat one 2-thread worker; on 16 cores 4 workers x 4 threads took 0.63x the time of one
    16-thread process, 8 x 2 0.69x and 16 x 1 0.95x. So: threads grow with the host, a
    quarter of its cores, from 1 up to 4, and workers fill the cores.
    """
    threads = min(4, max(1, cores // 4))
    return max(1, cores // threads), threads


def is_loopback(host: str) -> bool:
    """True for names and addresses that only this machine can reach."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_endpoint(entry: str) -> tuple[str, int]:
    """'host:port' or '[v6 address]:port' → (host, port); ValueError naming the entry otherwise."""
    match = re.fullmatch(r"\s*(\[[0-9A-Fa-f:.]+\]|[^\s:\[\]]+):([0-9]{1,5})\s*", entry)
    if not match or not 0 < int(match.group(2)) < 65536:
        raise ValueError(f"BROKER_HOSTS entry {entry.strip()!r} is not host:port")
    return match.group(1).strip("[]"), int(match.group(2))


def _coerce(name: str, raw: Any) -> Any:
    kind = type(DEFAULTS[name])
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        return str(raw).strip().lower() in {"1", "true", "yes", "on"}
    try:
        return kind(raw)
    except (TypeError, ValueError):
        raise ValueError(f"configuration {name}={raw!r} is not a valid {kind.__name__}") from None


LOGIN_SETTINGS = ("BROKER_USER", "BROKER_PASSWORD", "BROKER_WORKER_USER", "BROKER_WORKER_PASSWORD")


def provisioned_logins(path: Path, prefix: str) -> dict[str, str]:
    """The logins `make broker` provisioned for `prefix` (see src/messaging/accounts.py), or none."""
    if not path.is_file():
        return {}
    entries = yaml.safe_load(path.read_text()) or {}
    entry = entries.get(prefix) if isinstance(entries, dict) else None
    if not isinstance(entry, dict):
        return {}
    return {name: str(entry[name]) for name in LOGIN_SETTINGS if name in entry}


def provisioned_vhost(path: Path, prefix: str) -> str:
    """The virtual host `make broker` made for `prefix` with its logins, or "/" (an older entry)."""
    entries = yaml.safe_load(path.read_text()) if path.is_file() else {}
    entry = entries.get(prefix) if isinstance(entries, dict) else None
    vhost = entry.get("BROKER_VHOST") if isinstance(entry, dict) else None
    return vhost if isinstance(vhost, str) and vhost else "/"


def load(environ: dict[str, str] | None = None) -> Settings:
    """Defaults, overridden by the YAML file, overridden by the environment."""
    environ = dict(os.environ if environ is None else environ)
    values = dict(DEFAULTS)

    config_file = Path(environ.get("CONFIG_FILE", "config.yaml"))
    if config_file.is_file():
        loaded = yaml.safe_load(config_file.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{config_file} must hold a mapping of setting names to values")
        for name, raw in loaded.items():
            if name not in DEFAULTS:
                raise ValueError(f"{config_file}: unknown setting {name!r}")
            values[name] = _coerce(name, raw)

    explicit = set(loaded) if config_file.is_file() else set()
    for name in DEFAULTS:
        if name in environ and environ[name] != "":
            values[name] = _coerce(name, environ[name])
            explicit.add(name)

    provisioned = {}
    if not explicit & set(LOGIN_SETTINGS):
        provisioned = provisioned_logins(Path(values["BROKER_LOGINS_FILE"]), values["QUEUE_PREFIX"])
        values.update(provisioned)
    if not values["BROKER_VHOST"]:
        values["BROKER_VHOST"] = provisioned_vhost(Path(values["BROKER_LOGINS_FILE"]), values["QUEUE_PREFIX"]) \
            if provisioned else "/"

    if not re.fullmatch(r"auto|cpu|cuda|cuda:[0-9]{1,3}(,cuda:[0-9]{1,3})*", values["DEVICE"]):
        raise ValueError("DEVICE must be 'auto', 'cpu', 'cuda' or a list like 'cuda:0,cuda:1'")
    if not re.fullmatch(r"auto|[1-9][0-9]{0,3}", values["SEGMENT_BATCH"]):
        raise ValueError("SEGMENT_BATCH must be 'auto' or a number of segments from 1 to 9999")
    if values["PRECISION"] not in {"fp32", "tf32", "bf16"}:
        raise ValueError("PRECISION must be 'fp32', 'tf32' or 'bf16'")
    if values["WORKERS_PER_GPU"] < 1:
        raise ValueError("WORKERS_PER_GPU must be at least 1")
    if "WORKERS_HEALTHY" not in explicit:
        # the contract's 2 on a 2-core host; more cores, more workers of more threads (cpu_layout)
        values["WORKERS_HEALTHY"] = cpu_layout(os.cpu_count() or 1)[0]
    if values["WORKER_SIMULATE"] not in {"crash", "hang", "corrupt", "tamper"}:
        raise ValueError("WORKER_SIMULATE must be 'crash', 'hang', 'corrupt' or 'tamper'")
    if values["SSE_MAX_CLIENTS"] >= values["SERVER_THREADS"]:
        raise ValueError("SSE_MAX_CLIENTS must be below SERVER_THREADS: each live page holds a server thread")
    # Relative paths mean "from where the command was started", resolved once here: a path
    # left relative is later read against whatever folder a library prefers (Flask's
    # send_file used the app's package folder, and every download answered 500).
    values["STORAGE_DIR"] = Path(values["STORAGE_DIR"]).expanduser().resolve()
    values["WATCH_DIR"] = (Path(values["WATCH_DIR"]).expanduser().resolve() if values["WATCH_DIR"]
                           else values["STORAGE_DIR"] / "watch")
    values["POWERCAP_ROOT"] = Path(values["POWERCAP_ROOT"])
    if values["VERIFY"] not in {"off", "psnr"}:
        raise ValueError("VERIFY must be 'off' or 'psnr'")
    if values["DATA_PORT"] == 0:
        values["DATA_PORT"] = values["SERVER_PORT"] + 1
    values["DATA_HOST"] = values["DATA_HOST"] or values["SERVER_HOST"]
    if values["DATA_STORE"] not in ("", "server") and not re.fullmatch(r"s3://[a-z0-9][a-z0-9.-]{1,62}(/.*)?",
                                                                        values["DATA_STORE"]):
        raise ValueError("DATA_STORE must be empty (the server's data endpoint) or s3://bucket/prefix")
    if values["DATA_URL"] and not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", values["DATA_URL"]):
        raise ValueError("DATA_URL must be an http:// or https:// address")
    if values["VERIFY_REPLICAS"] < 1:
        raise ValueError("VERIFY_REPLICAS must be at least 1")
    if not 0 <= values["VERIFY_SAMPLE"] <= 1:
        raise ValueError("VERIFY_SAMPLE must be a fraction from 0 to 1")
    for name in ("MAX_PIXELS", "MAX_FPS", "MAX_FRAMES", "STORAGE_MAX_GB"):
        if values[name] <= 0:
            raise ValueError(f"{name} must be positive")
    if values["CACHE_MB"] < 0 or values["WATTS_PER_CORE"] < 0:
        raise ValueError("CACHE_MB and WATTS_PER_CORE must not be negative")
    for name in ("MODEL_REPO", "BROKER_TLS_CA"):
        if values[name]:
            values[name] = str(Path(values[name]).expanduser().resolve())
    for name in ("MAX_ATTEMPTS", "JOB_DEADLINE_SECONDS", "JOB_DEADLINE_FACTOR"):
        if values[name] <= 0:
            raise ValueError(f"{name} must be positive")
    settings = Settings(**{name.lower(): value for name, value in values.items()})
    if not settings.broker_nodes:  # parsing them also refuses an entry that is not host:port
        raise ValueError("BROKER_HOSTS must list host:port entries")
    return settings


LOG_FORMAT = "%(asctime)s.%(msecs)03d %(levelname)-7s %(message)s"


def configure_logging() -> None:
    """One log format for the server, the workers and their supervisor."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, datefmt="%Y-%m-%d %H:%M:%S")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    logging.getLogger("stomp").setLevel(logging.WARNING)
