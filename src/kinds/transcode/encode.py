"""The worker's encode: decode a source piece, keep exactly the job's frames, encode them.

One ffmpeg run: `select` keeps decoded frames skip..skip+frames-1 (by frame number, not
time, so rounding can never drop or repeat one at a boundary), `setpts` re-times them as
frame index ÷ fps, so every chunk starts at 0 and runs at the source's exact constant rate,
`scale` reaches the planned size and `format` yuv420p. The encoder's first frame is always
a keyframe, so every chunk opens with one.

Determinism, so a redelivered job gives the same bytes on any worker with the same build:
the encoder's threads are pinned (the job's `threads`, 1) with its row/frame parallelism
off, and the muxer and encoder run with bitexact flags (no version strings, no random ids).

The chunk container is NUT, ffmpeg's own: it stores each stream's exact rational time base
(1001/30000 stays 1001/30000, where Matroska rounds every timestamp to a millisecond), keeps
B-frame pts and dts, and carries all four codecs. So the server's concat demuxer can join the
chunks with stream copy and the result has one frame every 1/fps, with no jitter or seam.
Raw Annex-B would concatenate by bytes but loses timestamps (and B-frame order) for H.264;
IVF only carries VP9/AV1.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

from src.kinds.transcode import ROUTES

CODECS = ROUTES  # a codec is a route: its own jobs queue
PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")
DEFAULT_PRESET = {"h264": "medium", "hevc": "fast", "vp9": "faster", "av1": "faster"}
DEFAULT_CRF = {"h264": 23, "hevc": 28, "vp9": 32, "av1": 35}
# crf 0 is lossless for x264 (-qp 0), x265 (lossless=1) and libvpx-vp9 (-lossless 1); AV1 has
# no lossless mode in SVT-AV1, so its scale starts at 1.
CRF_RANGE = {"h264": (0, 51), "hevc": (0, 51), "vp9": (0, 63), "av1": (1, 63)}
# x264-style names mapped onto each encoder's own speed knob, slowest last.
VP9_SPEED = {"ultrafast": ("realtime", 8), "superfast": ("realtime", 7), "veryfast": ("good", 5),
             "faster": ("good", 4), "fast": ("good", 3), "medium": ("good", 2), "slow": ("good", 1),
             "slower": ("good", 0), "veryslow": ("best", 0)}
SVTAV1_PRESET = {"ultrafast": 12, "superfast": 11, "veryfast": 10, "faster": 9, "fast": 8, "medium": 6,
                 "slow": 4, "slower": 2, "veryslow": 1}
AOM_CPU_USED = {"ultrafast": 6, "superfast": 6, "veryfast": 6, "faster": 5, "fast": 4, "medium": 3, "slow": 2,
                "slower": 1, "veryslow": 0}
CHUNK_FORMAT = "nut"


def encoder_for(codec: str, available: frozenset[str]) -> str | None:
    """The ffmpeg encoder this host uses for `codec`, or None when it has none."""
    choices = {"h264": ["libx264"], "hevc": ["libx265"], "vp9": ["libvpx-vp9"], "av1": ["libsvtav1", "libaom-av1"]}
    return next((name for name in choices[codec] if name in available), None)


def video_filter(params: dict[str, Any], proof: str | None = None) -> str:
    """select → (`proof`: filters that note each kept frame, see runner.proof_filter) → re-time →
    scale → yuv420p. (scale passes frames through untouched when the size and format already
    match, so a lossless run keeps the source's pixels.)"""
    skip, frames = int(params["skip"]), int(params["frames"])
    rate = Fraction(params["fps"])
    steps = [f"select='between(n\\,{skip}\\,{skip + frames - 1})'", *([proof] if proof else []),
             # µs time base first, so N/fps rounds to within a µs; the encoder's time base
             # (1/fps, from -r) then maps each frame back to exactly N.
             "settb=AVTB", f"setpts=N*{rate.denominator}/{rate.numerator}/TB"]
    steps.append(f"scale={int(params['width'])}:{int(params['height'])}:flags=bicubic")
    steps.append("format=yuv420p")
    return ",".join(steps)


def encoder_args(params: dict[str, Any], encoder: str) -> list[str]:
    """The encoder and its rate, speed and thread flags for `params`."""
    threads = str(int(params["threads"]))
    crf, bitrate, preset = params.get("crf"), params.get("bitrate"), params["preset"]
    args = ["-c:v", encoder]
    if encoder == "libx264":
        args += ["-preset", preset, "-threads", threads]
        args += ["-qp", "0"] if crf == 0 else (["-crf", str(crf)] if crf is not None else ["-b:v", bitrate])
    elif encoder == "libx265":
        # pools/frame-threads pin x265's own thread pool; -threads alone does not.
        extra = f"pools={threads}:frame-threads=1:log-level=error"
        if crf == 0:
            extra += ":lossless=1"
        args += ["-preset", preset, "-x265-params", extra]
        args += (["-crf", str(crf)] if crf is not None else ["-b:v", bitrate])
    elif encoder == "libvpx-vp9":
        deadline, speed = VP9_SPEED[preset]
        args += ["-deadline", deadline, "-cpu-used", str(speed), "-threads", threads, "-row-mt", "0",
                 "-tile-columns", "0", "-frame-parallel", "0"]
        if crf == 0:
            args += ["-lossless", "1"]
        elif crf is not None:
            args += ["-crf", str(crf), "-b:v", "0"]  # -b:v 0: constant quality, no bitrate cap
        else:
            args += ["-b:v", bitrate]
    elif encoder == "libsvtav1":
        args += ["-preset", str(SVTAV1_PRESET[preset]), "-svtav1-params", f"lp={threads}"]
        args += (["-crf", str(crf)] if crf is not None else ["-b:v", bitrate])
    elif encoder == "libaom-av1":
        args += ["-usage", "good", "-cpu-used", str(AOM_CPU_USED[preset]), "-threads", threads,
                 "-row-mt", "0", "-tiles", "1x1"]
        args += (["-crf", str(crf), "-b:v", "0"] if crf is not None else ["-b:v", bitrate])
    else:
        raise ValueError(f"no settings for encoder {encoder!r}")
    return args


def command(params: dict[str, Any], encoder: str, piece: str, output: str, proof: str | None = None) -> list[str]:
    """The whole ffmpeg command that turns the piece file into the chunk file. With `proof`, the
    piece's own timestamps are kept (-copyts: the frames are re-timed by number anyway, so the
    chunk's bytes are the same) and noted for each kept frame."""
    # -threads before -i pins the decoder, -filter_threads the filters: a job uses one core.
    return ["ffmpeg", "-nostdin", "-hide_banner", "-v", "error", "-filter_threads", str(int(params["threads"])),
            "-threads", str(int(params["threads"])), *(["-copyts"] if proof else []),
            "-i", piece, "-map", "0:v:0", "-an", "-sn", "-dn", "-map_metadata", "-1", "-map_chapters", "-1",
            "-vf", video_filter(params, proof), "-fps_mode", "passthrough", "-r", str(params["fps"]),
            *encoder_args(params, encoder), "-pix_fmt", "yuv420p",
            "-flags:v", "+bitexact", "-fflags", "+bitexact", "-f", CHUNK_FORMAT, "-y", output]
