"""/music: upload songs, start their processing, follow them, download stems and mixes.

The shapes are the course's karaoke contract (shared/CONTRACT.md), so clients written
for it work unchanged: any body that is not multipart is the raw audio (`curl
--data-binary` sends it as a form), links are absolute, a track id that is not the
song's answers 405. What a client sends is bounded before it is believed: the upload by
MAX_UPLOAD_MB (and the probe's limits), a selection by size, depth and content.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from urllib.parse import unquote

from flask import Blueprint, current_app, jsonify, request, send_file
from werkzeug.http import parse_options_header

from src.server import mixdown
from src.server.api.errors import ApiError
from src.server.audio import RefusedAudio, UnreadableAudio, clean_tag
from src.server.orchestrator import BadSelection, NotFound, NotProcessable
from src.server.views import music_status, music_summary

bp = Blueprint("music", __name__)

MAX_SELECTION_BYTES = 64 * 1024


def _services():
    return current_app.extensions["karaoke"]


def _music_or_404(music_id: int):
    music = _services().store.music(music_id)
    if music is None:
        raise ApiError(404, f"no music with id {music_id}")
    return music


def _raw_filename() -> str | None:
    """The file name of a raw upload: Content-Disposition, or X-Filename (percent-encoded, since
    headers are Latin-1), or ?filename=. Only ever used as a display name."""
    _, options = parse_options_header(request.headers.get("Content-Disposition", ""))
    header = request.headers.get("X-Filename")
    return options.get("filename") or (unquote(header) if header else None) or request.args.get("filename")


def _receive(target: Path) -> str | None:
    """Write the request's audio to `target`; returns the client's file name, if any."""
    if request.mimetype == "multipart/form-data":
        if "file" not in request.files:
            raise ApiError(400, "a multipart upload needs the audio in a field named 'file'")
        upload_file = request.files["file"]
        upload_file.save(target)
        return upload_file.filename
    with target.open("wb") as out:
        while chunk := request.stream.read(1 << 20):
            out.write(chunk)
    return _raw_filename()


@bp.post("/music")
def upload():
    services = _services()
    target = services.files.incoming / f"{uuid.uuid4().hex}.upload"
    try:
        filename = _receive(target)
        music = services.orchestrator.upload(target, filename)
    except UnreadableAudio as exc:
        raise ApiError(400, str(exc)) from None
    except RefusedAudio as exc:
        raise ApiError(422, str(exc)) from None
    finally:  # kept songs were moved away; whatever is left here is refused, cut off or too large
        target.unlink(missing_ok=True)
    return jsonify(music_summary(services.store, music))


@bp.get("/music")
def list_music():
    store = _services().store
    return jsonify([music_summary(store, m) for m in store.all_music()])


def _selection() -> list[int]:
    """The JSON list of track ids in the body, bounded and checked before it is believed."""
    if request.mimetype != "application/json":
        raise ApiError(415, "send the track ids as JSON with Content-Type: application/json")
    if (request.content_length or 0) > MAX_SELECTION_BYTES:
        raise ApiError(413, f"a selection is at most {MAX_SELECTION_BYTES // 1024} kB")
    raw = request.stream.read(MAX_SELECTION_BYTES + 1)
    if len(raw) > MAX_SELECTION_BYTES:
        raise ApiError(413, f"a selection is at most {MAX_SELECTION_BYTES // 1024} kB")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        body = None
    if not isinstance(body, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in body):
        raise ApiError(400, "the body must be a JSON list of integer track ids, like [1, 3]")
    if len(set(body)) != len(body):
        raise ApiError(400, "each track id may appear once in the list")
    return body


@bp.post("/music/<id:music_id>")
def process(music_id: int):
    _music_or_404(music_id)
    track_ids = _selection()
    try:
        _services().orchestrator.process(music_id, track_ids)
    except NotFound as exc:
        raise ApiError(404, str(exc)) from None
    except BadSelection as exc:
        raise ApiError(405, str(exc)) from None
    except NotProcessable as exc:
        raise ApiError(409, str(exc)) from None
    return jsonify({})


@bp.get("/music/<id:music_id>")
def status(music_id: int):
    return jsonify(music_status(_services().store, _music_or_404(music_id), request.url_root))


@bp.get("/music/<id:music_id>/timeline")
def timeline(music_id: int):
    _music_or_404(music_id)
    return jsonify(_services().store.attempts(music_id))


def _download(music_id: int, source: str | None, label: str):
    services = _services()
    music = _music_or_404(music_id)
    if music.state != "done":
        raise ApiError(409, f"music {music_id} is {music.state}; downloads are ready once it is done")
    fmt = request.args.get("format", "mp3")
    if fmt not in ("mp3", "wav"):
        raise ApiError(400, "format must be mp3 or wav")
    path = mixdown.rendering(services.files, music_id, music.samplerate, music.channels, source, fmt)
    name = f"{clean_tag(music.name) or 'untitled'} - {label}.{fmt}".replace("/", "-").replace("\\", "-")
    return send_file(path, mimetype="audio/mpeg" if fmt == "mp3" else "audio/wav", download_name=name,
                     as_attachment=request.args.get("download") == "1", max_age=0)


@bp.get("/music/<id:music_id>/tracks/<id:track_id>")
def track(music_id: int, track_id: int):
    tracks = {t.id: t for t in _services().store.tracks(music_id)}
    if track_id not in tracks:
        _music_or_404(music_id)
        raise ApiError(404, f"music {music_id} has no track {track_id}")
    return _download(music_id, tracks[track_id].name, tracks[track_id].name)


@bp.get("/music/<id:music_id>/final")
def final(music_id: int):
    return _download(music_id, None, "mix")
