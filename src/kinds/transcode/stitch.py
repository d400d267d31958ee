"""The server's stitch: join the accepted chunks by stream copy and add the audio, once.

The concat demuxer reads the chunks in order and shifts each by the exact length of the
ones before it (given as `duration` lines: frames ÷ fps, so no container guesswork about a
chunk's last frame); the chunks are NUT with a 1/fps time base, so the joined video has one
frame every 1/fps with no seam. The audio is encoded here from the whole source in one run:
encoding it per chunk would add an encoder delay and padding at every chunk edge (audible
gaps and drift). AAC for MP4 and Matroska, Opus for WebM (the only audio WebM allows).
"""

from __future__ import annotations

import json
import shutil
from fractions import Fraction
from pathlib import Path

from src.kinds.base import JobView, TaskView
from src.kinds.transcode import tools
from src.kinds.transcode.encode import CHUNK_FORMAT
from src.kinds.transcode.split import PIECES
from src.media import guard

MIMETYPES = {"mp4": "video/mp4", "mkv": "video/x-matroska", "webm": "video/webm"}
FORMATS = {"mp4": "mp4", "mkv": "matroska", "webm": "webm"}
AUDIO_BITRATE = "128k"


def stitch(chunks: list[tuple[Path, int]], fps: str, source: Path, audio: bool, container: str, codec: str,
           output: Path, audio_lead: float = 0.0, timeout: float = 3600, folder: Path | None = None) -> None:
    """Write `output` from the chunks (path, frames) in order, plus the source's first audio stream.

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
            args += guard.ffmpeg_input(source, guard.UPLOAD, source.parent)
    except guard.OutsideFolder as exc:
        listing.unlink(missing_ok=True)
        raise ValueError(f"stitching the chunks: {exc}") from None
    args += ["-map", "0:v:0", "-c:v", "copy"]
    if audio:
        args += ["-map", "1:a:0", "-c:a", "libopus" if container == "webm" else "aac", "-b:a", AUDIO_BITRATE]
        if audio_lead > 0:
            # ffmpeg starts the source at its earliest stream; where the audio starts before
            # the video, drop that lead so the sound stays on the picture.
            args += ["-af", f"atrim=start={audio_lead:.6f},asetpts=PTS-STARTPTS"]
    if container == "mp4":
        args += ["-movflags", "+faststart"]
        if codec == "hevc":
            args += ["-tag:v", "hvc1"]  # Safari/QuickTime play HEVC in MP4 only as hvc1, not hev1
    partial = output.with_name(output.name + ".part")
    # Keep the source's title and tags where it is an input (with audio); never the chunks'.
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
    served their jobs. Returns the jobs in frame order."""
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
    stitch(chunks, task.facts["fps"], task.media.path, task.facts["audio"], container, codec, output,
           audio_lead=task.facts.get("audio_lead", 0.0), folder=task.folder)
    shutil.rmtree(task.folder / PIECES, ignore_errors=True)
    return ordered


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
