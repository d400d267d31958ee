"""/music: upload songs, start their processing, follow them, download stems and mixes, delete them.

The shapes are the course's karaoke contract (shared/CONTRACT.md), so clients written
for it work unchanged: any body that is not multipart is the raw audio (`curl
--data-binary` sends it as a form), links are absolute, a track id that is not the
song's answers 405. What a client sends is bounded before it is believed: the upload by
MAX_UPLOAD_MB (and the probe's limits), a selection by size, depth and content.

Beyond the contract, for the page: `/mix` renders any set of stems at any volumes,
tempo and key as a download that changes nothing about the song (`POST /music/{id}`
still re-mixes and saves the choice, as other clients expect); `/original` is the upload
as decoded, to compare against; `/peaks` draws waveforms; `/stream/{stem}` is what the
practice player plays (it shifts the key itself, as it plays); FLAC beside MP3 and WAV;
`DELETE` removes one song.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, jsonify, request, send_file

from src.kinds.base import NotApplicable
from src.media.probe import clean_tag
from src.server import mixdown, pcmstream
from src.server.api.errors import ApiError
from src.server.api.jsonbody import read_json
from src.server.api.uploads import receive_media
from src.server.audio import FORMATS
from src.server.orchestrator import NotFound, NotProcessable
from src.server.services import services
from src.server.store import Task
from src.server.views import SEPARATE, music_status, music_summary, song, tracks

bp = Blueprint("music", __name__)

MAX_SELECTION_BYTES = 64 * 1024
TEMPO_RANGE = (0.5, 1.25)
SEMITONE_RANGE = (-12, 12)
MAX_GAIN = 2.0


@bp.errorhandler(FileNotFoundError)
def _deleted_meanwhile(_error):
    """A song deleted (or reset) while one of its files was being read: gone, not a server fault."""
    return jsonify({"error": "this song was deleted"}), 404


def _music_or_404(music_id: int) -> Task:
    task = services().store.task(music_id)
    if task is None or task.kind != SEPARATE:
        raise ApiError(404, f"no music with id {music_id}")
    return task


def _tracks(task: Task) -> dict[int, str]:
    return dict(tracks(services().store, task))


def _decoded_bytes(media) -> int:
    """What the song's decoding writes at once (float32 at the model's rate and channels): it counts
    against STORAGE_MAX_GB before it is made (a 1.3 MB FLAC of silence decodes to 2.4 GB)."""
    s = services()
    spec = s.pipeline.kind(SEPARATE).spec
    seconds = min(media.duration or 0.0, s.settings.max_duration_s)
    return int(seconds * spec.samplerate + 1) * spec.channels * 4


@bp.post("/music")
def upload():
    """A song: the upload as a medium, and a `separate` task of it that waits for its selection
    (decoding starts now, so processing starts as soon as it is asked for)."""
    s = services()
    media = receive_media(decoded_bytes=_decoded_bytes)
    try:
        task = s.orchestrator.create_task(SEPARATE, media.id, {}, run=False)
    except NotApplicable as exc:
        s.orchestrator.delete_media(media.id)
        raise ApiError(400, f"not a readable audio file ({exc})") from None
    return jsonify(music_summary(s.store, task))


@bp.get("/music")
def list_music():
    store = services().store
    return jsonify([music_summary(store, t) for t in store.tasks(SEPARATE)])


def _selection() -> list[int]:
    """The JSON list of track ids in the body, bounded and checked before it is believed."""
    shape = "the body must be a JSON list of integer track ids, like [1, 3]"
    body = read_json(MAX_SELECTION_BYTES, "the track ids", "a selection", shape)
    if not isinstance(body, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in body):
        raise ApiError(400, shape)
    if len(set(body)) != len(body):
        raise ApiError(400, "each track id may appear once in the list")
    return body


@bp.post("/music/<id:music_id>")
def process(music_id: int):
    """Keep these tracks: the song is processed, or (once done) re-mixed from its stems."""
    s = services()
    task = _music_or_404(music_id)
    track_ids = _selection()
    own = _tracks(task)
    foreign = [t for t in track_ids if t not in own]
    if foreign:
        raise ApiError(405, f"track ids {foreign} do not belong to music {music_id} (its tracks: {sorted(own)})")
    chosen = set(track_ids)
    keep = [name for track_id, name in own.items() if track_id in chosen]
    if task.state == "done":
        mixdown.render_mix(song(s.pipeline, task), keep)
        s.store.set_params(music_id, {"keep": keep})
        s.store.update_facts(music_id, {"stats": {**task.facts.get("stats", {}), "mixed": keep}})
        s.pipeline.changed(music_id)
        return jsonify({})
    try:
        s.orchestrator.run(music_id, {"keep": keep})
    except NotFound as exc:
        raise ApiError(404, str(exc)) from None
    except NotProcessable as exc:
        raise ApiError(409, str(exc)) from None
    return jsonify({})


@bp.get("/music/<id:music_id>")
def status(music_id: int):
    return jsonify(music_status(services().store, _music_or_404(music_id), request.url_root))


@bp.get("/music/<id:music_id>/timeline")
def timeline(music_id: int):
    _music_or_404(music_id)
    return jsonify(services().store.attempts(music_id))


def _finished(music_id: int) -> mixdown.Song:
    task = _music_or_404(music_id)
    if task.state != "done":
        state = music_status(services().store, task)["state"]
        raise ApiError(409, f"music {music_id} is {state}; downloads are ready once it is done")
    return song(services().pipeline, task)


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


def _send(path: Path, music: mixdown.Song, label: str, fmt: str, temporary: bool = False):
    name = f"{clean_tag(music.name) or 'untitled'} - {label}.{fmt}".replace("/", "-").replace("\\", "-")
    if temporary:  # opened, then unlinked: the open handle keeps it readable until sent
        handle = path.open("rb")
        path.unlink()
        return send_file(handle, mimetype=FORMATS[fmt], download_name=name, as_attachment=True, max_age=0)
    return send_file(path, mimetype=FORMATS[fmt], download_name=name,
                     as_attachment=request.args.get("download") == "1", max_age=0)


def _same_origin_only(what: str) -> None:
    """403 unless the request comes from this server's own pages (or a client that is no browser).

    A rendering costs CPU and disk: a page on another site could otherwise have every song
    rendered in every key by an `<audio src>` it never plays. Browsers say where a request
    comes from (`Sec-Fetch-Site`; `Origin` on fetches): anything but our own origin, a
    CORS_ORIGINS page, or a request the user typed ("none") is refused. Scripts and
    command-line clients send neither header and are not affected.
    """
    origin = request.headers.get("Origin")
    own = f"{request.scheme}://{request.host}"
    allowed = {own, *(o.strip() for o in services().settings.cors_origins.split(",") if o.strip())}
    if origin is not None and origin not in allowed:
        raise ApiError(403, f"{what} is rendered only for this server's own pages, not for {origin[:100]!r}")
    if origin is None and request.headers.get("Sec-Fetch-Site") not in (None, "same-origin", "none"):
        raise ApiError(403, f"{what} is rendered only for this server's own pages, not for another site's")


def _download(music_id: int, source: str | None, label: str):
    semitones = _number("semitones", 0, *SEMITONE_RANGE, kind=int)
    if semitones:
        _same_origin_only("a key-shifted download")
    music = _finished(music_id)
    fmt = _format()
    path = mixdown.rendering(music, source, fmt, semitones)
    return _send(path, music, label + (f" {semitones:+d} st" if semitones else ""), fmt)


@bp.get("/music/<id:music_id>/tracks/<id:track_id>")
def track(music_id: int, track_id: int):
    names = _tracks(_music_or_404(music_id))
    if track_id not in names:
        raise ApiError(404, f"music {music_id} has no track {track_id}")
    return _download(music_id, names[track_id], names[track_id])


@bp.get("/music/<id:music_id>/final")
def final(music_id: int):
    return _download(music_id, None, "mix")


@bp.get("/music/<id:music_id>/original")
def original(music_id: int):
    return _download(music_id, mixdown.ORIGINAL, mixdown.ORIGINAL)


@bp.get("/music/<id:music_id>/stream/<name>")
def stream(music_id: int, name: str):
    """A stem (by name) or the original as a WAV made on the fly, with Range: what the page plays
    (the page shifts the key itself, in real time)."""
    _same_origin_only("a stem's stream")
    music = _finished(music_id)
    if name not in set(_tracks(_music_or_404(music_id)).values()) | {mixdown.ORIGINAL}:
        raise ApiError(404, f"music {music_id} has no stem named {name[:40]!r}")
    source = mixdown.practice_source(music, name)
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
    _same_origin_only("a mix")
    music = _finished(music_id)
    fmt = _format()
    names = _tracks(_music_or_404(music_id))
    try:
        ids = [int(part) for part in _id_list("tracks")]
        gains = [float(part) for part in _id_list("gain")] or [1.0] * len(ids)
    except ValueError:
        raise ApiError(400, "tracks and gain are comma lists of numbers, like tracks=1,3&gain=1,0.5") from None
    if not ids:
        raise ApiError(400, "name at least one track: ?tracks=1,3")
    if len(set(ids)) != len(ids) or len(gains) != len(ids):
        raise ApiError(400, "each track once, and one gain per track when gains are given")
    foreign = [t for t in ids if t not in names]
    if foreign:
        raise ApiError(405, f"track ids {foreign} do not belong to music {music_id} (its tracks: {sorted(names)})")
    if not all(0 <= g <= MAX_GAIN for g in gains):
        raise ApiError(400, f"each gain is from 0 to {MAX_GAIN}")
    tempo = _number("tempo", 1.0, *TEMPO_RANGE)
    semitones = _number("semitones", 0, *SEMITONE_RANGE, kind=int)
    parts = [(names[i], g) for i, g in zip(ids, gains, strict=True)]
    path = mixdown.listening_mix(music, parts, fmt, tempo, semitones)
    label = "+".join(name for name, _ in parts)
    if any(g != 1 for g in gains):
        label += " (" + ", ".join(f"{name} {round(100 * g)}%" for name, g in parts if g != 1) + ")"
    if tempo != 1:
        label += f" {tempo:g}x"
    if semitones:
        label += f" {semitones:+d} st"
    return _send(path, music, label, fmt, temporary=True)


@bp.get("/music/<id:music_id>/peaks")
def peaks(music_id: int):
    music = _finished(music_id)
    return jsonify(mixdown.peaks(music, list(_tracks(_music_or_404(music_id)).values())))


@bp.delete("/music/<id:music_id>")
def delete(music_id: int):
    """Delete one song, its files and its jobs. Jobs of it still queued or running on a worker
    run to their end there, and their results are dropped: the song no longer exists."""
    s = services()
    task = _music_or_404(music_id)
    s.orchestrator.delete_task(music_id)
    if not s.store.tasks_of(task.media_id):
        s.orchestrator.delete_media(task.media_id)
    s.events.publish("deleted", {"music_id": music_id, "task_id": music_id})
    return jsonify({})
