"""Receiving an uploaded file: raw body or multipart field `file`, for /music and /media alike.

Any body that is not multipart is the raw file (`curl --data-binary` sends it as a form).
What a client sends is bounded by MAX_UPLOAD_MB before it is believed, and probed
(orchestrator.upload) before it is kept. The storage quota (STORAGE_MAX_GB, src.server.quota)
is asked before the body is read (by its declared length), once it is on disk, and, for a
caller that decodes the medium at once (a song), with the decoded size: 507 when over.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote

from flask import request
from werkzeug.http import parse_options_header

from src.media.probe import RefusedMedia, UnreadableMedia
from src.server import quota
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


def receive_media(decoded_bytes: Callable[[MediaRow], int] | None = None) -> MediaRow:
    """The request's file, probed and kept as a medium; 400 unreadable, 422 refused, 507 over the
    storage quota (with `decoded_bytes(medium)` more, what the caller will decode it to)."""
    s = services()
    root, max_gb = s.settings.storage_dir, s.settings.storage_max_gb
    target = s.files.incoming / f"{uuid.uuid4().hex}.upload"
    try:
        quota.check(root, max_gb, request.content_length or 0)
        name = _receive(target)
        quota.check(root, max_gb)  # the body is on disk now, whatever its declared length
        media = s.orchestrator.upload(target, name)
    except quota.StorageFull as exc:
        raise ApiError(507, str(exc)) from None
    except UnreadableMedia as exc:
        raise ApiError(400, str(exc)) from None
    except RefusedMedia as exc:
        raise ApiError(422, str(exc)) from None
    finally:  # kept media were moved away; whatever is left here is refused, cut off or too large
        target.unlink(missing_ok=True)
    if decoded_bytes is not None:
        try:
            quota.check(root, max_gb, decoded_bytes(media))
        except quota.StorageFull as exc:
            s.orchestrator.delete_media(media.id)
            raise ApiError(507, str(exc)) from None
    return media
