"""What an uploaded file holds, asked of ffprobe before anything is decoded, and what it may cost.

Every kind starts from this: the streams (audio, video), their formats, the duration
and the tags. Every input goes through `src.media.guard` (media demuxers only, the file
protocol, `-max_pixels`), the probe runs with a memory cap and a timeout, and
subprocesses get argument lists, never a shell.

`probe(path, limits)` then holds the upload to the limits (`Limits`, from the settings)
twice: from the header, and from the packets (a stream-copy pass that decodes nothing,
stopped as soon as a limit is passed), so a header that lies about the duration or the
frame count (an MKV saying 1 s that holds 9000 s) is measured, not believed.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from src.media import guard


class UnreadableMedia(ValueError):
    """The upload is not media ffmpeg can read; the message says why."""


class RefusedMedia(ValueError):
    """Readable media that this server will not take (too long, too many channels...)."""


PROBE_TIMEOUT_S = 60
PACKETS_TIMEOUT_S = 600  # the packet pass reads the whole file (no decode): a 2-hour film in seconds
TOO_MANY_PIXELS = "exceeds specified max pixel count"
FPS_SLACK = 1.01  # packets may show a rate this much above the limit (timestamps are rounded)


@dataclass(frozen=True)
class Limits:
    """What one upload may cost (README's settings table gives the reasons for the defaults)."""

    max_duration_s: float
    max_channels: int
    max_pixels: int
    max_fps: float
    max_frames: int

    @classmethod
    def of(cls, settings: Any) -> Limits:
        return cls(settings.max_duration_s, settings.max_channels, settings.max_pixels, settings.max_fps,
                   settings.max_frames)


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


def probe(path: Path, limits: Limits | None = None) -> Probe:
    """Streams, duration and tags of the upload; UnreadableMedia if it holds no stream we read.

    With `limits`, RefusedMedia for what is over them, from the header and then from the packets.
    """
    try:
        proc = guard.run(  # guard.run: a server phase counts the child's CPU
            ["ffprobe", "-v", "error", "-threads", "1",
             *guard.probe_input(path, guard.UPLOAD, path.parent, limits.max_pixels if limits else 0),
             "-show_entries",
             "format=duration:format_tags:stream=codec_type,codec_name,sample_rate,channels,duration,width,"
             "height,avg_frame_rate,r_frame_rate,nb_frames:stream_tags:stream_disposition=attached_pic",
             "-of", "json"],
            capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, preexec_fn=guard.limited(),
        )
    except guard.OutsideFolder as exc:
        raise UnreadableMedia(f"the upload cannot be read ({exc})") from None
    except subprocess.TimeoutExpired:
        raise UnreadableMedia(f"ffprobe gave no answer within {PROBE_TIMEOUT_S} s") from None
    if TOO_MANY_PIXELS in proc.stderr and limits:
        raise RefusedMedia(f"the pictures are larger than {limits.max_pixels} pixels (MAX_PIXELS)")
    if proc.returncode != 0:
        reason = last_line(proc.stderr, path) or "ffprobe failed"
        raise UnreadableMedia(f"not a readable audio file nor video ({reason})")
    found = _parse(json.loads(proc.stdout or "{}"))
    if limits is None:
        return found
    check_limits(found, limits)
    found = measured(path, found, limits)
    check_limits(found, limits)
    return found


def _parse(info: dict) -> Probe:
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
        fps = _rate(v.get("avg_frame_rate")) or _rate(v.get("r_frame_rate"))
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


def check_limits(found: Probe, limits: Limits) -> None:
    """RefusedMedia for what would be too costly to decode, before decoding any of it."""
    if found.duration is not None and found.duration > limits.max_duration_s:
        raise RefusedMedia(f"the media lasts {found.duration:.0f} s; at most {limits.max_duration_s:.0f} s are "
                           "taken (MAX_DURATION_S)")
    if found.video is not None:
        video = found.video
        if not video["width"] or not video["height"]:
            raise UnreadableMedia("the video's picture size cannot be read")
        if video["width"] * video["height"] > limits.max_pixels:
            raise RefusedMedia(f"the video is {video['width']}x{video['height']}: more than {limits.max_pixels} "
                               "pixels a picture (MAX_PIXELS)")
        if video["fps"] and video["fps"] > limits.max_fps * FPS_SLACK:
            raise RefusedMedia(f"the video runs at {video['fps']:g} frames a second; at most {limits.max_fps:g} "
                               "(MAX_FPS)")
        if video["frames"] > limits.max_frames:
            raise RefusedMedia(f"the video holds {video['frames']} frames; at most {limits.max_frames} are taken "
                               "(MAX_FRAMES)")
    if found.audio is None:
        return
    low, high = SAMPLERATES
    if not low <= found.samplerate <= high:
        raise RefusedMedia(f"the sample rate {found.samplerate} Hz is outside {low}–{high} Hz")
    if not 1 <= found.channels <= limits.max_channels:
        raise RefusedMedia(f"{found.channels} channels; at most {limits.max_channels} are taken (MAX_CHANNELS)")


def measured(path: Path, found: Probe, limits: Limits) -> Probe:
    """`found` with the duration and frame count its packets show, read by a stream copy that
    decodes nothing and stops once past MAX_DURATION_S or MAX_FRAMES (so a lying header costs
    no more than an honest file at the limits)."""
    maps = (["-map", "0:v:0"] if found.video else []) + (["-map", "0:a:0"] if found.audio else [])
    try:
        proc = guard.run(
            ["ffmpeg", "-nostdin", "-v", "error", "-nostats", "-threads", "1",
             *guard.ffmpeg_input(path, guard.UPLOAD, path.parent, limits.max_pixels), *maps, "-c", "copy",
             "-t", f"{limits.max_duration_s + 1:.3f}", "-frames:v", str(limits.max_frames + 1),
             "-f", "null", "-progress", "pipe:1", "-"],
            capture_output=True, text=True, timeout=PACKETS_TIMEOUT_S, preexec_fn=guard.limited(),
        )
    except subprocess.TimeoutExpired:
        raise RefusedMedia(f"reading the file's packets took over {PACKETS_TIMEOUT_S} s") from None
    if proc.returncode != 0:
        reason = last_line(proc.stderr, path) or f"ffmpeg exit {proc.returncode}"
        raise UnreadableMedia(f"the file's packets cannot be read ({reason})")
    progress: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        key, _, value = line.partition("=")
        progress[key.strip()] = value.strip()
    seconds = (_number(progress.get("out_time_us")) or 0) / 1e6
    frames = int(_number(progress.get("frame")) or 0)
    header = f"{found.duration:.0f} s" if found.duration is not None else "no length"
    if seconds > limits.max_duration_s:
        raise RefusedMedia(f"the media's packets run past {limits.max_duration_s:.0f} s (MAX_DURATION_S); its "
                           f"header says {header}")
    if frames > limits.max_frames:
        raise RefusedMedia(f"the video's packets hold more than {limits.max_frames} frames (MAX_FRAMES)")
    duration = max(found.duration or 0.0, seconds) or found.duration
    video = found.video
    if video is not None:
        fps = video["fps"]
        if frames > 1 and seconds > 0:  # frames over the time they span: what the packets say the rate is
            fps = max(fps or 0.0, round((frames - 1) / seconds, 3))
        video = {**video, "frames": frames or video["frames"], "fps": fps}
    return Probe(title=found.title, artist=found.artist, duration=duration, audio=found.audio, video=video)
