"""/music: upload songs, start their processing, follow them, download stems and mixes, delete them.

The shapes are the course's karaoke contract (shared/CONTRACT.md), so clients written
for it work unchanged: any body that is not multipart is the raw audio (`curl
--data-binary` sends it as a form), links are absolute, a track id that is not the
song's answers 405. What a client sends is bounded before it is believed: the upload by
MAX_UPLOAD_MB (and the probe's limits), a selection by size, depth and content.

Beyond the contract, for the page: `/mix` renders any set of stems at any volumes,
tempo and key as a download that changes nothing about the song (`POST /music/{id}`
still re-mixes and saves the choice, as other clients expect); `/original` is the upload
as decoded, to compare against; `/peaks` draws waveforms; `?semitones=` on a stem is the
practice player's key shift; FLAC beside MP3 and WAV; `DELETE` removes one song.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from urllib.parse import unquote

from flask import Blueprint, current_app, jsonify, request, send_file
from werkzeug.http import parse_options_header

from src.server import mixdown, pcmstream
from src.server.api.errors import ApiError
from src.server.audio import FORMATS, RefusedAudio, UnreadableAudio, clean_tag
from src.server.orchestrator import BadSelection, NotFound, NotProcessable
from src.server.views import music_status, music_summary

bp = Blueprint("music", __name__)

MAX_SELECTION_BYTES = 64 * 1024
TEMPO_RANGE = (0.5, 1.25)
SEMITONE_RANGE = (-12, 12)
MAX_GAIN = 2.0


@bp.errorhandler(FileNotFoundError)
def _deleted_meanwhile(_error):
    """A song deleted (or reset) while one of its files was being read: gone, not a server fault."""
    return jsonify({"error": "this song was deleted"}), 404


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


def _finished(music_id: int):
    music = _music_or_404(music_id)
    if music.state != "done":
        raise ApiError(409, f"music {music_id} is {music.state}; downloads are ready once it is done")
    return music


def _format() -> str:
    fmt = request.args.get("format", "mp3")
    if fmt not in FORMATS:
        raise ApiError(400, f"format must be one of {', '.join(FORMATS)}")
    return fmt


def _number(name: str, default: float, low: float, high: float, kind=float):
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ApiError(400, f"{name} must be a number from {low} to {high}") from None
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be from {low} to {high}")
    return value


def _send(path: Path, music, label: str, fmt: str, temporary: bool = False):
    name = f"{clean_tag(music.name) or 'untitled'} - {label}.{fmt}".replace("/", "-").replace("\\", "-")
    if temporary:  # opened, then unlinked: the open handle keeps it readable until sent
        handle = path.open("rb")
        path.unlink()
        return send_file(handle, mimetype=FORMATS[fmt], download_name=name, as_attachment=True, max_age=0)
    return send_file(path, mimetype=FORMATS[fmt], download_name=name,
                     as_attachment=request.args.get("download") == "1", max_age=0)


def _download(music_id: int, source: str | None, label: str):
    services = _services()
    music = _finished(music_id)
    fmt = _format()
    semitones = _number("semitones", 0, *SEMITONE_RANGE, kind=int)
    path = mixdown.rendering(services.store, services.files, music, source, fmt, semitones)
    return _send(path, music, label + (f" {semitones:+d} st" if semitones else ""), fmt)


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


@bp.get("/music/<id:music_id>/original")
def original(music_id: int):
    return _download(music_id, mixdown.ORIGINAL, mixdown.ORIGINAL)


@bp.get("/music/<id:music_id>/stream/<name>")
def stream(music_id: int, name: str):
    """A stem (by name) or the original as a WAV made on the fly, with Range: what the page plays.
    `?semitones=` shifts the key (rendered once, then cached)."""
    services = _services()
    music = _finished(music_id)
    if name not in {t.name for t in services.store.tracks(music_id)} | {mixdown.ORIGINAL}:
        raise ApiError(404, f"music {music_id} has no stem named {name[:40]!r}")
    semitones = _number("semitones", 0, *SEMITONE_RANGE, kind=int)
    source = mixdown.practice_source(services.files, music, name, semitones)
    return pcmstream.wav_response(request, source, music.samplerate, music.channels)


def _id_list(name: str) -> list[str]:
    raw = request.args.get(name, "")
    return [part.strip() for part in raw.split(",") if part.strip()] if raw else []


@bp.get("/music/<id:music_id>/mix")
def listening_mix(music_id: int):
    """`?tracks=1,3&gain=1,0.5&tempo=0.8&semitones=-2&format=wav`: a download of what the page plays.

    The file is named by its instruments ("drums+bass+other") and tagged with them; the
    song's saved selection, mix and times are not touched.
    """
    services = _services()
    music = _finished(music_id)
    fmt = _format()
    tracks = {t.id: t for t in services.store.tracks(music_id)}
    try:
        ids = [int(part) for part in _id_list("tracks")]
        gains = [float(part) for part in _id_list("gain")] or [1.0] * len(ids)
    except ValueError:
        raise ApiError(400, "tracks and gain are comma lists of numbers, like tracks=1,3&gain=1,0.5") from None
    if not ids:
        raise ApiError(400, "name at least one track: ?tracks=1,3")
    if len(set(ids)) != len(ids) or len(gains) != len(ids):
        raise ApiError(400, "each track once, and one gain per track when gains are given")
    foreign = [t for t in ids if t not in tracks]
    if foreign:
        raise ApiError(405, f"track ids {foreign} do not belong to music {music_id} (its tracks: {sorted(tracks)})")
    if not all(0 <= g <= MAX_GAIN for g in gains):
        raise ApiError(400, f"each gain is from 0 to {MAX_GAIN}")
    tempo = _number("tempo", 1.0, *TEMPO_RANGE)
    semitones = _number("semitones", 0, *SEMITONE_RANGE, kind=int)
    parts = [(tracks[i], g) for i, g in zip(ids, gains, strict=True)]
    path = mixdown.listening_mix(services.files, music, parts, fmt, tempo, semitones)
    label = "+".join(t.name for t, _ in parts)
    if any(g != 1 for g in gains):
        label += " (" + ", ".join(f"{t.name} {round(100 * g)}%" for t, g in parts if g != 1) + ")"
    if tempo != 1:
        label += f" {tempo:g}x"
    if semitones:
        label += f" {semitones:+d} st"
    return _send(path, music, label, fmt, temporary=True)


@bp.get("/music/<id:music_id>/peaks")
def peaks(music_id: int):
    services = _services()
    return jsonify(mixdown.peaks(services.store, services.files, _finished(music_id)))


@bp.delete("/music/<id:music_id>")
def delete(music_id: int):
    """Delete one song, its files and its jobs. Jobs of it still queued or running on a worker
    run to their end there, and their results are dropped: the song no longer exists."""
    services = _services()
    _music_or_404(music_id)
    services.store.delete_music(music_id)
    services.files.delete_song(music_id)
    services.events.publish("deleted", {"music_id": music_id})
    return jsonify({})
