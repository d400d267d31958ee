"""A request's JSON body, bounded before it is read or believed (the selection of /music, a new task)."""

from __future__ import annotations

import json
from typing import Any

from flask import request

from src.server.api.errors import ApiError


def read_json(limit: int, sent: str, named: str, invalid: str) -> Any:
    """The parsed body: 415 unless it says application/json ("send {sent} as JSON"), 413 above
    `limit` bytes ("{named} is at most ..."), 400 with `invalid` when it is not JSON."""
    if request.mimetype != "application/json":
        raise ApiError(415, f"send {sent} as JSON with Content-Type: application/json")
    too_large = ApiError(413, f"{named} is at most {limit // 1024} kB")
    if (request.content_length or 0) > limit:
        raise too_large
    raw = request.stream.read(limit + 1)
    if len(raw) > limit:
        raise too_large
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise ApiError(400, invalid) from None
