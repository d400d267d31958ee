"""Tiny test videos and the ffprobe/ffmpeg measurements the transcode tests compare.

No fixtures here: plain functions that shell out to ffmpeg, small and single-threaded so
the tests stay fast on a shared two-core machine.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from src.kinds.base import Media


def ffmpeg(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-v", "error", *args], capture_output=True,
                          check=True, timeout=120)


def make_clip(path: Path, seconds: float, *, fps: str = "25", size: str = "160x120", keyint: int = 25,
              audio: bool = True, bframes: int = 2) -> Path:
    """testsrc2 (+ a 440 Hz sine) as H.264/AAC in MP4, a keyframe exactly every `keyint` frames."""
    args = ["-f", "lavfi", "-i", f"testsrc2=size={size}:rate={fps}"]
    if audio:
        args += ["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000"]
    args += ["-t", str(seconds), "-map", "0:v"] + (["-map", "1:a", "-c:a", "aac"] if audio else [])
    args += ["-c:v", "libx264", "-preset", "veryfast", "-threads", "1", "-pix_fmt", "yuv420p", "-g", str(keyint),
             "-keyint_min", str(keyint), "-sc_threshold", "0", "-bf", str(bframes), "-y", str(path)]
    ffmpeg(*args)
    return path


def make_audio(path: Path, seconds: float = 1.0) -> Path:
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000", "-t", str(seconds), "-c:a", "aac",
           "-y", str(path))
    return path


def probe(path: Path, *args: str) -> dict:
    done = subprocess.run(["ffprobe", "-v", "error", "-of", "json", *args, str(path)], capture_output=True,
                          check=True, timeout=120)
    return json.loads(done.stdout)


def media(path: Path, media_id: int = 1) -> Media:
    """A `Media` as the backbone's upload probe would make it."""
    info = probe(path, "-show_streams", "-show_format")
    video = next((s for s in info["streams"] if s["codec_type"] == "video"), None)
    audio = next((s for s in info["streams"] if s["codec_type"] == "audio"), None)
    return Media(
        id=media_id, name=path.name, path=path, size=path.stat().st_size,
        duration=float(info["format"]["duration"]),
        video=None if video is None else {"codec": video["codec_name"], "width": video["width"],
                                          "height": video["height"], "fps": video["r_frame_rate"],
                                          "frames": int(video.get("nb_frames") or 0)},
        audio=None if audio is None else {"codec": audio["codec_name"], "samplerate": int(audio["sample_rate"]),
                                          "channels": audio["channels"]},
    )


def stream(path: Path, selector: str = "v:0") -> dict:
    """The stream's header, with its packets' count (demuxed, not decoded)."""
    return probe(path, "-select_streams", selector, "-count_packets", "-show_streams")["streams"][0]


def packets(path: Path, selector: str = "v:0") -> list[dict]:
    return probe(path, "-select_streams", selector, "-show_entries", "packet=pts,dts,duration,size,flags")["packets"]


def frame_hashes(path: Path) -> list[str]:
    """The MD5 of every decoded video frame, in order (the last column of -f framemd5)."""
    done = ffmpeg("-i", str(path), "-map", "0:v:0", "-f", "framemd5", "-")
    return [line.rsplit(",", 1)[1].strip() for line in done.stdout.decode().splitlines() if not line.startswith("#")]


def psnr(encoded: Path, reference: Path) -> float:
    """Average PSNR (dB) of `encoded`'s video against `reference`'s, frame by frame."""
    done = subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-threads", "1", "-i", str(encoded), "-i",
                           str(reference), "-lavfi", "[0:v][1:v]psnr", "-f", "null", "-"],
                          capture_output=True, check=True, timeout=120)
    return float(re.findall(rb"average:([0-9.]+|inf)", done.stderr)[-1])
