"""What an uploaded file holds, asked of ffprobe before anything is decoded.

Every kind starts from this: the streams (audio, video), their formats, the duration
and the tags. ffmpeg reads uploads only with the demuxers of `INPUT_GUARD`, never one
that opens further files or the network. Subprocesses get argument lists, never a shell.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path


class UnreadableMedia(ValueError):
    """The upload is not media ffmpeg can read; the message says why."""


class RefusedMedia(ValueError):
    """Readable media that this server will not take (too long, too many channels...)."""


# Demuxers an upload may be read with: media containers only, never a playlist (hls,
# concat) or anything else that opens further files or the network. Without this list
# ffmpeg guesses the format from the content, and an uploaded HLS playlist naming a file
# on the server became a song holding that file's audio.
DEMUXERS = ",".join([
    "mp3", "wav", "w64", "flac", "ogg", "mov", "matroska", "aac", "aiff", "caf", "asf", "wv", "ape",
    "tta", "au", "amr", "ac3", "eac3", "mpc", "mpc8", "tak", "dsf", "shorten", "voc",
    "avi", "mpegts", "ivf", "flv",  # video containers (mp4 is "mov", webm is "matroska")
])
INPUT_GUARD = ["-protocol_whitelist", "file", "-format_whitelist", DEMUXERS]
SAMPLERATES = (8000, 192000)
TAG_CHARACTERS = 200


@dataclass(frozen=True)
class Probe:
    """What ffprobe says of an upload, read before anything is decoded."""

    title: str | None
    artist: str | None
    duration: float | None
    audio: dict | None  # codec, samplerate, channels of the first audio stream
    video: dict | None  # codec, width, height, fps, frames of the first video stream

    @property
    def samplerate(self) -> int:
        return self.audio["samplerate"] if self.audio else 0

    @property
    def channels(self) -> int:
        return self.audio["channels"] if self.audio else 0


def clean_tag(value: object) -> str | None:
    """A tag value fit to show and to put in a file name: one line, printable, bounded."""
    text = " ".join(re.sub(r"[\x00-\x1f\x7f-\x9f]", " ", str(value)).split())
    return text[:TAG_CHARACTERS].strip() or None


def last_line(stderr: str, path: Path) -> str:
    """ffmpeg's last complaint, without the server's paths in it."""
    lines = stderr.strip().splitlines()
    reason = lines[-1] if lines else ""
    return reason.replace(str(path), "the upload").replace(path.name, "the upload").split(": ")[-1].strip()


def probe(path: Path) -> Probe:
    """Streams, duration and tags of the upload; UnreadableMedia if it holds no stream we read."""
    proc = subprocess.run(
        ["ffprobe", "-v", "error", *INPUT_GUARD, "-show_entries",
         "format=duration:format_tags:stream=codec_type,codec_name,sample_rate,channels,duration,width,height,"
         "avg_frame_rate,nb_frames:stream_tags:stream_disposition=attached_pic",
         "-of", "json", str(path)],
        capture_output=True, text=True, timeout=60,
    )
    if proc.returncode != 0:
        reason = last_line(proc.stderr, path) or "ffprobe failed"
        raise UnreadableMedia(f"not a readable audio file nor video ({reason})")
    info = json.loads(proc.stdout or "{}")
    streams = info.get("streams", [])
    audio_streams = [s for s in streams if s.get("codec_type") == "audio"]
    # cover art in an MP3 is a one-picture "video" stream: not a video
    video_streams = [s for s in streams if s.get("codec_type") == "video"
                     and not s.get("disposition", {}).get("attached_pic")]
    if not audio_streams and not video_streams:
        raise UnreadableMedia("the file holds no audio or video stream")
    tags: dict[str, str] = {}
    for source in [info.get("format", {}).get("tags", {})] + [s.get("tags", {}) for s in streams]:
        for key, value in source.items():
            tags.setdefault(key.lower(), value)
    first = (audio_streams or video_streams)[0]
    duration = _number(info.get("format", {}).get("duration")) or _number(first.get("duration"))
    audio = video = None
    if audio_streams:
        a = audio_streams[0]
        audio = {"codec": str(a.get("codec_name", "")), "samplerate": int(_number(a.get("sample_rate")) or 0),
                 "channels": int(a.get("channels") or 0)}
    if video_streams:
        v = video_streams[0]
        fps = _rate(v.get("avg_frame_rate"))
        frames = int(_number(v.get("nb_frames")) or round((duration or 0) * (fps or 0)))
        video = {"codec": str(v.get("codec_name", "")), "width": int(v.get("width") or 0),
                 "height": int(v.get("height") or 0), "fps": round(fps, 3) if fps else None, "frames": frames}
    return Probe(title=clean_tag(tags.get("title", "")), artist=clean_tag(tags.get("artist", "")),
                 duration=duration, audio=audio, video=video)


def _rate(value: object) -> float | None:
    """An ffprobe rate like "30000/1001" as a number; None for "0/0" or nonsense."""
    try:
        num, _, den = str(value).partition("/")
        rate = float(num) / float(den or 1)
    except (ValueError, ZeroDivisionError):
        return None
    return rate if math.isfinite(rate) and rate > 0 else None


def _number(value: object) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number >= 0 else None


def check_limits(found: Probe, max_duration_s: float, max_channels: int) -> None:
    """RefusedMedia for what would be too costly to decode, before decoding any of it."""
    if found.duration is not None and found.duration > max_duration_s:
        raise RefusedMedia(f"the media lasts {found.duration:.0f} s; at most {max_duration_s:.0f} s are taken "
                           "(MAX_DURATION_S)")
    if found.audio is None:
        return
    low, high = SAMPLERATES
    if not low <= found.samplerate <= high:
        raise RefusedMedia(f"the sample rate {found.samplerate} Hz is outside {low}–{high} Hz")
    if not 1 <= found.channels <= max_channels:
        raise RefusedMedia(f"{found.channels} channels; at most {max_channels} are taken (MAX_CHANNELS)")
