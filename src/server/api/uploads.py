"""Receiving an uploaded file: raw body or multipart field `file`, for /music and /media alike.

Any body that is not multipart is the raw file (`curl --data-binary` sends it as a form).
What a client sends is bounded by MAX_UPLOAD_MB before it is believed, and probed
(orchestrator.upload) before it is kept.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from urllib.parse import unquote

from flask import request
from werkzeug.http import parse_options_header

from src.media.probe import RefusedMedia, UnreadableMedia
from src.server.api.errors import ApiError
from src.server.services import services
from src.server.store import MediaRow


def _raw_filename() -> str | None:
    """The file name of a raw upload: Content-Disposition, or X-Filename (percent-encoded, since
    headers are Latin-1), or ?filename=. Only ever used as a display name."""
    _, options = parse_options_header(request.headers.get("Content-Disposition", ""))
    header = request.headers.get("X-Filename")
    return options.get("filename") or (unquote(header) if header else None) or request.args.get("filename")


def _receive(target: Path) -> str | None:
    """Write the request's file to `target`; returns the client's file name, if any."""
    if request.mimetype == "multipart/form-data":
        if "file" not in request.files:
            raise ApiError(400, "a multipart upload needs the file in a field named 'file'")
        upload_file = request.files["file"]
        upload_file.save(target)
        return upload_file.filename
    with target.open("wb") as out:
        while chunk := request.stream.read(1 << 20):
            out.write(chunk)
    return _raw_filename()


def receive_media() -> MediaRow:
    """The request's file, probed and kept as a medium; 400 unreadable, 422 refused."""
    s = services()
    target = s.files.incoming / f"{uuid.uuid4().hex}.upload"
    try:
        return s.orchestrator.upload(target, _receive(target))
    except UnreadableMedia as exc:
        raise ApiError(400, str(exc)) from None
    except RefusedMedia as exc:
        raise ApiError(422, str(exc)) from None
    finally:  # kept media were moved away; whatever is left here is refused, cut off or too large
        target.unlink(missing_ok=True)
