"""The server's stitch: join the accepted chunks by stream copy and add the audio, once.

The concat demuxer reads the chunks in order and shifts each by the exact length of the
ones before it (given as `duration` lines: frames ÷ fps, so no container guesswork about a
chunk's last frame); the chunks are NUT with a 1/fps time base, so the joined video has one
frame every 1/fps with no seam.

The audio is the source's first audio stream, whole, never per chunk (encoding it per chunk
would add an encoder delay and padding at every chunk edge: audible gaps and drift). Where
its codec fits the container (AAC in MP4; Opus or Vorbis in WebM; those and MP3 or FLAC in
Matroska) and it needs no trim, it is copied: no CPU, no generation loss, and a small
source stays small. Otherwise it is encoded (AAC, Opus for WebM) at the source's bitrate or
128 kb/s, whichever is lower, into a track file of its own (`AUDIO_TRACK`), started on a
background thread when the task's first result is kept, so it runs while the video jobs do;
the stitch then copies that track. The encode is measured (`guard.accounted`) and its CPU
seconds kept beside the track: it is the server's work, part of the serial share.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from fractions import Fraction
from pathlib import Path

from src.kinds.base import JobView, TaskView
from src.kinds.transcode import tools
from src.kinds.transcode.encode import CHUNK_FORMAT
from src.kinds.transcode.split import PIECES
from src.media import guard
from src.media.atomic import atomic

MIMETYPES = {"mp4": "video/mp4", "mkv": "video/x-matroska", "webm": "video/webm"}
FORMATS = {"mp4": "mp4", "mkv": "matroska", "webm": "webm"}
AUDIO_BITRATE = "128k"  # the most an encoded track gets; a source below it keeps its own bitrate
AUDIO_BPS, MIN_AUDIO_BPS = 128_000, 16_000
AUDIO_ENCODERS = {"mp4": "aac", "mkv": "aac", "webm": "libopus"}
# The source codecs each container takes as they are (and browsers play from it).
AUDIO_COPIES = {"mp4": {"aac"}, "mkv": {"aac", "opus", "vorbis", "mp3", "flac"}, "webm": {"opus", "vorbis"}}
AUDIO = "audio"  # the task's folder for an encoded audio track
TRACK_FORMATS = {"mp4": ("m4a", "mp4"), "mkv": ("mka", "matroska"), "webm": ("mka", "matroska")}

log = logging.getLogger("server")
_encoding: dict[Path, threading.Thread] = {}  # track being encoded -> its thread
_encoding_lock = threading.Lock()


def audio_args(source_codec: str | None, container: str, source_bps: int | None = None,
               lead: float = 0.0) -> list[str]:
    """ffmpeg's audio codec options for the source's audio in `container`: a copy where the
    codec fits and no lead must be trimmed, else the container's encoder at the source's
    bitrate, at most 128 kb/s (the benchmarks' whole-file runs use the same)."""
    if lead <= 0 and source_codec in AUDIO_COPIES[container]:
        return ["-c:a", "copy"]
    bps = AUDIO_BPS if not source_bps or source_bps <= 0 else max(MIN_AUDIO_BPS, min(AUDIO_BPS, int(source_bps)))
    return ["-c:a", AUDIO_ENCODERS[container], "-b:a", f"{bps // 1000}k"]


def audio_copied(task: TaskView, container: str) -> bool:
    """Whether the task's output takes the source's audio as it is (or has none): no track to encode."""
    codec = (task.media.audio or {}).get("codec")
    return not task.facts.get("audio") or audio_args(codec, container, None, task.facts.get("audio_lead", 0.0)) \
        == ["-c:a", "copy"]


def track_path(task: TaskView, container: str) -> Path:
    return task.folder / AUDIO / f"track.{TRACK_FORMATS[container][0]}"


def source_audio_bps(source: Path) -> int | None:
    """The bitrate of the source's first audio stream as its container states it, or None."""
    found = json.loads(tools.run(
        [*tools.FFPROBE, "-v", "error", "-select_streams", "a:0", "-show_entries", "stream=bit_rate:stream_tags=BPS",
         "-of", "json", *guard.probe_input(source, guard.UPLOAD, source.parent)],
        timeout=120, what="ffprobe of the source's audio", memory=guard.PROBE_MEMORY_BYTES).stdout or b"{}")
    stream = (found.get("streams") or [{}])[0]
    for value in (stream.get("bit_rate"), (stream.get("tags") or {}).get("BPS")):
        if str(value or "").isdigit():
            return int(value)
    return None


def encode_track(task: TaskView, container: str, timeout: float = 3600, ahead: bool = False) -> Path:
    """Encode the source's audio into the task's track file (trimmed by the audio's lead over
    the video), unless it is there; written whole or not at all. Returns its path. `ahead`:
    on the background thread, outside any measured phase of the server (see `audio_done`)."""
    track = track_path(task, container)
    if track.is_file():
        return track
    source, lead = task.media.path, task.facts.get("audio_lead", 0.0)
    # not parents=True: a task deleted meanwhile (its folder gone) fails here instead of coming back
    track.parent.mkdir(exist_ok=True)
    with guard.accounted() as work:
        made = audio_args((task.media.audio or {}).get("codec"), container, source_audio_bps(source), lead)
        # the source's tags travel in the track (ffmpeg copies the first input's): the stitch takes them from it
        args = [*tools.FFMPEG, "-v", "error", *guard.ffmpeg_input(source, guard.UPLOAD, source.parent),
                "-map", "0:a:0", "-vn", "-sn", "-dn", *made]
        if lead > 0:
            # ffmpeg starts the source at its earliest stream; where the audio starts before
            # the video, drop that lead so the sound stays on the picture.
            args += ["-af", f"atrim=start={lead:.6f},asetpts=PTS-STARTPTS"]
        with atomic(track) as partial:
            tools.run([*args, "-f", TRACK_FORMATS[container][1], "-y", str(partial)], timeout=timeout,
                      what="encoding the audio", quiet=True)
    with atomic(track.with_suffix(".json")) as partial:
        partial.write_text(json.dumps({"cpu_seconds": round(work.cpu_seconds, 3),
                                       "wall_seconds": round(work.wall_seconds, 3), "ahead": ahead, "codec": made[1],
                                       "bitrate": made[3] if len(made) > 3 else None}))
    return track


def start_audio(task: TaskView, container: str) -> None:
    """Start encoding the task's audio track on a background thread, unless the audio is copied,
    the track is there or already on its way. Called when a result is kept: the audio then
    runs beside the video jobs, and the stitch finds it done. A failure here is left to the
    stitch, which encodes the track itself (and reports the error there)."""
    if audio_copied(task, container):
        return
    track = track_path(task, container)
    with _encoding_lock:
        if track.is_file() or (track in _encoding and _encoding[track].is_alive()):
            return
        thread = threading.Thread(target=_encode_quietly, args=(task, container), name=f"audio-{task.id}",
                                  daemon=True)
        _encoding[track] = thread
        thread.start()


def _encode_quietly(task: TaskView, container: str) -> None:
    try:
        encode_track(task, container, ahead=True)
    except Exception as exc:  # the stitch tries again, and fails the task with the reason if it fails too
        log.warning("Task[%d] - encoding the audio ahead failed (the stitch will try again): %s", task.id, exc)
    finally:
        with _encoding_lock:
            _encoding.pop(track_path(task, container), None)


def audio_track(task: TaskView, container: str) -> Path:
    """The task's encoded audio track: waited for when the background encode is running,
    encoded here when it never started or did not finish (a restarted server)."""
    track = track_path(task, container)
    with _encoding_lock:
        thread = _encoding.get(track)
    if thread is not None:
        thread.join()
    return encode_track(task, container)


def stitch(chunks: list[tuple[Path, int]], fps: str, source: Path, audio: bool, container: str, codec: str,
           output: Path, audio_lead: float = 0.0, timeout: float = 3600, folder: Path | None = None,
           track: Path | None = None, audio_codec: str | None = None) -> None:
    """Write `output` from the chunks (path, frames) in order, plus the audio: `track` (an
    encoded track, copied) when given, else the source's first audio stream as `audio_args`
    makes it from `audio_codec` (the source's).

    Written to a temporary name and renamed, so a half-written file is never an output. The
    chunks must lie in `folder` (the task's; default: the output's folder) and are read as
    NUT only (src.media.guard): a stored "chunk" that is a playlist or a list is refused.
    """
    folder = folder or output.parent
    if container not in FORMATS:
        raise ValueError(f"unknown container {container!r}")
    rate = Fraction(fps)
    output.parent.mkdir(parents=True, exist_ok=True)
    listing = output.with_name(output.name + ".concat.txt")
    try:
        args = [*tools.FFMPEG, "-v", "error", *guard.concat_input(
            [(path, tools.seconds(Fraction(frames) / rate)) for path, frames in chunks], listing, folder)]
        if audio:
            args += (guard.ffmpeg_input(track, guard.UPLOAD, folder) if track is not None
                     else guard.ffmpeg_input(source, guard.UPLOAD, source.parent))
    except guard.OutsideFolder as exc:
        listing.unlink(missing_ok=True)
        raise ValueError(f"stitching the chunks: {exc}") from None
    args += ["-map", "0:v:0", "-c:v", "copy"]
    if audio and track is not None:
        args += ["-map", "1:a:0", "-c:a", "copy"]
    elif audio:
        args += ["-map", "1:a:0", *audio_args(audio_codec, container, None, audio_lead)]
        if audio_lead > 0:
            args += ["-af", f"atrim=start={audio_lead:.6f},asetpts=PTS-STARTPTS"]
    if container == "mp4":
        args += ["-movflags", "+faststart"]
        if codec == "hevc":
            args += ["-tag:v", "hvc1"]  # Safari/QuickTime play HEVC in MP4 only as hvc1, not hev1
    else:
        # Matroska's segment and track UIDs are random otherwise: the same task, merged again
        # (a restarted server), would give another file
        args += ["-fflags", "+bitexact"]
    partial = output.with_name(output.name + ".part")
    # Keep the source's title and tags where it (or the track, which holds them) is an input
    # (with audio); never the chunks'.
    args += ["-map_metadata", "1" if audio else "-1", "-f", FORMATS[container], "-y", str(partial)]
    try:
        tools.run(args, timeout=timeout, what="stitching the chunks", quiet=True)
        partial.replace(output)
    finally:
        listing.unlink(missing_ok=True)
        partial.unlink(missing_ok=True)


def join_jobs(task: TaskView, jobs: list[JobView], codec: str, container: str, output: Path) -> list[JobView]:
    """Stitch the chunks of a video task's jobs (runs of frames that must tile the video
    exactly) into `output` with the source's audio, then delete the source pieces, which
    served their jobs, and the audio track. Returns the jobs in frame order."""
    ordered = sorted(jobs, key=lambda job: job.facts["start"])
    expected = 0
    for job in ordered:
        if job.facts["start"] != expected:
            raise ValueError(f"the jobs leave frames {expected}-{job.facts['start']} uncovered or doubled")
        expected = job.facts["end"]
    if expected != task.facts["frames"]:
        raise ValueError(f"the jobs end at frame {expected}, the video has {task.facts['frames']}")
    chunks = [(task.result_path(job.id, CHUNK_FORMAT), job.facts["frames"]) for job in ordered]
    missing = [path.name for path, _ in chunks if not path.is_file()]
    if missing:
        raise ValueError(f"chunks missing: {', '.join(missing)}")
    audio = bool(task.facts["audio"])
    track = audio_track(task, container) if audio and not audio_copied(task, container) else None
    stitch(chunks, task.facts["fps"], task.media.path, audio, container, codec, output,
           audio_lead=task.facts.get("audio_lead", 0.0), folder=task.folder, track=track,
           audio_codec=(task.media.audio or {}).get("codec"))
    shutil.rmtree(task.folder / PIECES, ignore_errors=True)
    return ordered


def audio_done(task: TaskView, container: str) -> dict:
    """How the stitched output's audio was made, for the task's stats: `copy`, or `encode` with
    the server's CPU and wall seconds for it (measured where it ran, on the background thread
    or in the stitch; `ahead`: on the thread); {} without audio. The track, now in the output,
    is deleted."""
    if not task.facts.get("audio"):
        return {}
    if audio_copied(task, container):
        return {"mode": "copy"}
    meta = track_path(task, container).with_suffix(".json")
    figures = json.loads(meta.read_text()) if meta.is_file() else {}
    if figures.get("ahead") and isinstance(figures.get("cpu_seconds"), int | float):
        # made on its own thread, outside the block that measures the merge (guard.accounted):
        # carried into it here, so the server's CPU for the audio counts in the serial share
        with guard.accounted() as carried:
            carried.children_cpu_seconds += figures["cpu_seconds"]
    shutil.rmtree(task.folder / AUDIO, ignore_errors=True)
    return {"mode": "encode", **{name: figures.get(name) for name in ("codec", "bitrate", "cpu_seconds",
                                                                      "wall_seconds", "ahead")}}


def stats(path: Path) -> dict:
    """What the page shows of an output: size, bitrate, frames, duration, codec, width, height."""
    found = json.loads(tools.run(
        [*tools.FFPROBE, "-v", "error", "-select_streams", "v:0", "-count_packets", "-show_entries",
         "stream=codec_name,width,height,nb_read_packets:format=duration,size,bit_rate", "-of", "json",
         *guard.probe_input(path, guard.OUTPUT, path.parent)],
        timeout=120, what="ffprobe of the output").stdout)
    stream, container = found["streams"][0], found["format"]
    return {"size": int(container["size"]), "bitrate": int(container.get("bit_rate") or 0),
            "duration": float(container["duration"]), "frames": int(stream["nb_read_packets"]),
            "codec": stream["codec_name"], "width": stream["width"], "height": stream["height"]}
