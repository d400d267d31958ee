"""Kind name → the kind's package, imported lazily.

Each package has a `kind` module with `server(settings) -> Kind` and a `runner` module
with `worker(settings) -> Runner` and `available() -> str | None` (why this host cannot
run the kind, or None). Adding a kind is one package and one line here.

A package may name `ROUTES`: the capabilities a job of the kind can need (transcode: one
per codec, since not every ffmpeg has every encoder). Each route has a jobs queue of its
own, `{p}.jobs.{kind}.{route}`, and a worker consumes only the routes it can serve; a
kind without routes has one queue, `{p}.jobs.{kind}`.
"""

from __future__ import annotations

import importlib

from src.config import Settings
from src.kinds.base import Kind, Runner

PACKAGES = {
    "separate": "src.kinds.separation",
    "transcode": "src.kinds.transcode",
    "faceblur": "src.kinds.faceblur",
}


def names() -> list[str]:
    return list(PACKAGES)


def _module(name: str, part: str):
    if name not in PACKAGES:
        raise KeyError(f"unknown job kind {name!r}; this deployment runs {', '.join(PACKAGES)}")
    return importlib.import_module(f"{PACKAGES[name]}.{part}")


def routes(name: str) -> tuple[str, ...]:
    """The routes of kind `name` (empty: one queue for all its jobs)."""
    if name not in PACKAGES:
        raise KeyError(f"unknown job kind {name!r}; this deployment runs {', '.join(PACKAGES)}")
    return tuple(getattr(importlib.import_module(PACKAGES[name]), "ROUTES", ()))


def queues(kinds: list[str]) -> list[tuple[str, str | None]]:
    """Every (kind, route) jobs queue of `kinds`; route None for a kind without routes."""
    return [(kind, route) for kind in kinds for route in (routes(kind) or (None,))]


def server(name: str, settings: Settings) -> Kind:
    return _module(name, "kind").server(settings)


def worker(name: str, settings: Settings) -> Runner:
    return _module(name, "runner").worker(settings)


def unavailable(name: str) -> str | None:
    """Why this host cannot run `name` (a missing library or encoder), or None."""
    return _module(name, "runner").available()


def runnable(wanted: list[str] | None = None) -> list[str]:
    """The kinds this host can run, among `wanted` (default: every kind)."""
    return [name for name in (wanted or names()) if unavailable(name) is None]
