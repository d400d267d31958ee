"""The worker half of `faceblur`: decode a job's piece, find faces on every context frame,
smooth them over time, mask the own frames, encode them as an H.264 chunk.

Two ffmpeg processes and this one, streaming (a piece is never held decoded):

    piece ─▶ ffmpeg: decode, select the context frames, yuv420p ─▶ raw frames on a pipe
          ─▶ here: I420 → BGR, detect; once the faces of frame t+h are known, frame t is
             masked with the union of the faces of t-h..t+h (`anonymize.smooth`)
          ─▶ raw yuv420p on a pipe ─▶ ffmpeg: libx264 (one thread, bitexact), NUT chunk

Frames travel as yuv420p, the source's own format, and only the pixels the mask changed are
converted back from BGR (luma per pixel, chroma per 2x2 block that holds a changed pixel):
everything outside the masks keeps the source's exact values, so at crf 0 (lossless) the
output equals the decoded source outside the masks, and no colour conversion of ffmpeg's
sits between the chunks (OpenCV's fixed-point I420 conversions, one thread, are the same
on every call). The detector sees the same frame whatever piece it was decoded from, and
each own frame sees the same neighbours (its context), so the output does not depend on the
chunking.

The decoding ffmpeg also notes the pts of every context frame it hands over (transcode's
`runner.proof_filter`): the result reports the own frames decoded (`decoded_frames`, first and
last pts), and a piece that does not hold the planned ones is refused with the reason.

Params and body arrive from the broker and are untrusted: `problem` refuses anything outside
what the server ever sends before a byte reaches ffmpeg; commands are lists of validated values.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from src.config import Settings
from src.kinds.base import Cancelled, report_progress
from src.kinds.faceblur import anonymize, detect
from src.kinds.faceblur.kind import CODEC, ECHOED, ENCODER, software_version
from src.kinds.faceblur.plan import MAX_JOB_FRAMES, reach
from src.kinds.transcode import encode, tools
from src.kinds.transcode import runner as transcode_runner

PRESET = "medium"  # x264's own default; not a parameter (the output's quality is crf's)


def available() -> str | None:
    """Why this host cannot run faceblur jobs, or None."""
    if reason := tools.missing() or detect.available():
        return reason
    if ENCODER not in tools.encoders():
        return f"this ffmpeg has no {ENCODER} encoder"
    return None


def worker(settings: Settings) -> Runner:
    return Runner(settings)


def never() -> bool:
    return False


def _number(params: dict[str, Any], name: str, low: float, high: float) -> str | None:
    value = params.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        return f"{name} must be a number in [{low:g}, {high:g}], got {value!r}"
    return None


def _identity(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True)


def decode_command(params: dict[str, Any], piece: str, noted: Path | None = None) -> list[str]:
    """The piece's context frames as raw yuv420p on stdout: decoded frames skip..skip+n-1 (by
    number, as transcode's encode selects), cropped to the even size, one thread. With `noted`,
    each chosen frame's pts is written there (transcode's `proof_filter`, the piece's own
    timestamps kept with -copyts)."""
    cstart, cend = params["context"]
    skip, count = int(params["skip"]), int(cend) - int(cstart)
    steps = f"select='between(n\\,{skip}\\,{skip + count - 1})',"
    if noted is not None:
        steps += transcode_runner.proof_filter(params, noted) + ","
    steps += f"crop={int(params['width'])}:{int(params['height'])}:0:0"
    return [*tools.FFMPEG, "-v", "error", "-threads", "1", "-filter_threads", "1",
            *(["-copyts"] if noted is not None else []), "-i", piece, "-map", "0:v:0",
            "-an", "-sn", "-dn", "-vf", f"{steps},format=yuv420p", "-fps_mode", "passthrough",
            "-f", "rawvideo", "-pix_fmt", "yuv420p", "pipe:1"]


def encode_command(params: dict[str, Any], chunk: str) -> list[str]:
    """Raw yuv420p frames on stdin → an H.264 chunk in NUT, timed N/fps like transcode's chunks."""
    fps = str(params["fps"])
    rate = {"threads": int(params["threads"]), "crf": int(params["crf"]), "bitrate": None, "preset": PRESET}
    return [*tools.FFMPEG, "-v", "error", "-f", "rawvideo", "-pix_fmt", "yuv420p",
            "-s", f"{int(params['width'])}x{int(params['height'])}", "-framerate", fps, "-i", "pipe:0",
            "-map", "0:v:0", "-map_metadata", "-1", "-fps_mode", "passthrough", "-r", fps,
            *encode.encoder_args(rate, ENCODER), "-pix_fmt", "yuv420p",
            "-flags:v", "+bitexact", "-fflags", "+bitexact", "-f", encode.CHUNK_FORMAT, "-y", chunk]


def masked(yuv: np.ndarray, bgr: np.ndarray, boxes: list[detect.Box], mode: str, mask_scale: float) -> np.ndarray:
    """The I420 frame `yuv` (H*3/2 x W) with the faces in `boxes` masked: the pixels the mask
    changed in BGR are converted back (chroma per 2x2 block), every other one is kept as is."""
    if not boxes:
        return yuv
    out_bgr = anonymize.anonymize(bgr, boxes, mode, mask_scale)
    changed = np.any(out_bgr != bgr, axis=2)
    if not changed.any():
        return yuv
    height, width = bgr.shape[:2]
    luma, quarter = height * width, height * width // 4
    new = cv2.cvtColor(out_bgr, cv2.COLOR_BGR2YUV_I420).reshape(-1)
    out = yuv.reshape(-1).copy()
    blocks = changed.reshape(height // 2, 2, width // 2, 2).any(axis=(1, 3)).reshape(-1)
    planes = [(slice(0, luma), changed.reshape(-1)), (slice(luma, luma + quarter), blocks),
              (slice(luma + quarter, luma + 2 * quarter), blocks)]
    for plane, where in planes:
        out[plane] = np.where(where, new[plane], out[plane])
    return out.reshape(yuv.shape)


class Runner:
    def __init__(self, settings: Settings | None = None):
        self.settings = settings
        self._detectors: dict[float, detect.Detector] = {}
        self._last: tuple[str, bytes] | None = None  # the last job's piece, for tamper()

    def offers(self) -> dict[str, str]:
        return {"": software_version()}

    def detector(self, threshold: float) -> detect.Detector:
        key = float(threshold)
        if key not in self._detectors:
            self._detectors = {key: detect.Detector(detect.DEFAULT, key)}  # one loaded model at a time
        return self._detectors[key]

    def problem(self, params: dict[str, Any], body: bytes) -> str | None:
        if not isinstance(params, dict):
            return "params must be an object"
        if params.get("mode") not in anonymize.MODES:
            return f"mode must be one of {', '.join(anonymize.MODES)}, got {params.get('mode')!r}"
        for name, low, high in (("threshold", detect.MIN_THRESHOLD, 1.0), ("mask_scale", 1.0, 4.0)):
            if reason := _number(params, name, low, high):
                return reason
        for name, low, high in (("window", 1, 25), ("crf", 0, 51)):
            if reason := transcode_runner.integer_problem(params, name, low, high):
                return reason
        if params["window"] % 2 == 0:
            return "window must be odd"
        if reason := transcode_runner.piece_problem(params, body, max_frames=MAX_JOB_FRAMES, min_side=2):
            return reason
        bounds = params.get("context")
        if not (isinstance(bounds, list) and len(bounds) == 2
                and all(type(value) is int for value in bounds)):
            return "context must be [first, end) frames as two integers"
        h = reach(params["window"])
        if not (0 <= bounds[0] <= params["start"] and params["end"] <= bounds[1]
                and params["start"] - bounds[0] <= h and bounds[1] - params["end"] <= h):
            return f"context must hold the job's frames and at most {h} frames on each side"
        return None

    def run(self, params: dict[str, Any], body: bytes,
            should_stop: Callable[[], bool]) -> tuple[dict[str, Any], bytes]:
        reason = self.problem(params, body)
        if reason:
            raise ValueError(reason)
        self._last = (_identity(params), body)
        try:
            chunk, ms, faces, proven = self.process(params, body, should_stop)
        finally:  # a large frame's net (2.4 GB at 2160p) does not outlive its job
            for detector in self._detectors.values():
                detector.trim()
        result = {name: params[name] for name in ECHOED if name != "codec"}
        result.update(codec=CODEC, encoder=ENCODER, ms=ms, faces=faces, **proven)
        return result, chunk

    def process(self, params: dict[str, Any], body: bytes, should_stop: Callable[[], bool],
                mask: bool = True) -> tuple[bytes, list[int], list[int], dict[str, Any]]:
        """The chunk; per own frame, the milliseconds its detection and masking took and the faces
        found in it; and the account of the own frames decoded (`decoded_frames`, first and last
        pts: PieceRefused where the piece does not hold the planned ones). `mask=False` encodes
        the frames unmasked (tamper)."""
        width, height = int(params["width"]), int(params["height"])
        start, end = int(params["start"]), int(params["end"])
        cstart, cend = (int(v) for v in params["context"])
        window, h = int(params["window"]), reach(params["window"])
        mode, scale = params["mode"], float(params["mask_scale"])
        size = width * height * 3 // 2
        detector = self.detector(params["threshold"]) if mask else None
        found: list[list[detect.Box]] = []  # per context frame
        waiting: deque[tuple[int, np.ndarray, np.ndarray, float]] = deque()  # own frames not yet masked
        ms: list[int] = []
        faces: list[int] = []
        timeout = 600 + 60 * (cend - cstart)
        with tempfile.TemporaryDirectory(prefix="faceblur-") as scratch:
            piece, chunk = Path(scratch) / "piece", Path(scratch) / f"chunk.{encode.CHUNK_FORMAT}"
            piece.write_bytes(body)
            decode_errors, encode_errors = (Path(scratch) / "decode.err").open("w+b"), \
                (Path(scratch) / "encode.err").open("w+b")
            noted = Path(scratch) / "decoded.txt"
            decoder = subprocess.Popen(decode_command(params, str(piece), noted), stdin=subprocess.DEVNULL,
                                       stdout=subprocess.PIPE, stderr=decode_errors)
            encoder = subprocess.Popen(encode_command(params, str(chunk)), stdin=subprocess.PIPE,
                                       stdout=subprocess.DEVNULL, stderr=encode_errors)
            expired = threading.Event()

            def expire() -> None:
                expired.set()
                for process in (decoder, encoder):
                    process.kill()

            watchdog = threading.Timer(timeout, expire)
            watchdog.daemon = True
            watchdog.start()

            def emit(frame: int, yuv: np.ndarray, bgr: np.ndarray, spent: float) -> None:
                started = time.perf_counter()
                out = yuv
                if mask:
                    low, high = max(cstart, frame - h), min(cend, frame + h + 1)
                    boxes = anonymize.smooth(found[low - cstart:high - cstart], window)[frame - low]
                    out = masked(yuv, bgr, boxes, mode, scale)
                try:
                    encoder.stdin.write(out.tobytes())
                except (BrokenPipeError, OSError):
                    raise tools.ToolError(f"encoding with {ENCODER}: the encoder quit: "
                                          f"{tools.tail(_read(encode_errors))}") from None
                ms.append(round((spent + time.perf_counter() - started) * 1000))
                faces.append(len(found[frame - cstart]))
                report_progress(len(ms) / (end - start))  # the worker sends it on, at most once a second

            try:
                for frame in range(cstart, cend):
                    if should_stop():
                        raise Cancelled("the job's task was cancelled")
                    raw = decoder.stdout.read(size)
                    if len(raw) != size:
                        if expired.is_set():
                            raise tools.ToolError(f"faceblur: still running after {timeout} s")
                        decoder.wait(10)
                        raise tools.ToolError(f"decoding the piece: {frame - cstart} frames of {cend - cstart} "
                                              f"came out: {tools.tail(_read(decode_errors))}")
                    yuv = np.frombuffer(raw, np.uint8).reshape(height * 3 // 2, width)
                    bgr = cv2.cvtColor(yuv, cv2.COLOR_YUV2BGR_I420)
                    started = time.perf_counter()
                    found.append(detector.detect(bgr) if detector else [])
                    if start <= frame < end:
                        waiting.append((frame, yuv, bgr, time.perf_counter() - started))
                    # frame u is masked once the faces of min(u + h, cend - 1) are known
                    while waiting and min(waiting[0][0] + h, cend - 1) <= frame:
                        emit(*waiting.popleft())
                encoder.stdin.close()
                if decoder.stdout.read(1):
                    raise tools.ToolError("decoding the piece: more frames came out than the job's context")
                for process, what, errors in ((decoder, "decoding the piece", decode_errors),
                                              (encoder, f"encoding with {ENCODER}", encode_errors)):
                    if process.wait(timeout) != 0:
                        if expired.is_set():
                            raise tools.ToolError(f"{what}: still running after {timeout} s")
                        raise tools.ToolError(f"{what}: exit {process.returncode}: {tools.tail(_read(errors))}")
                stamps = transcode_runner.decoded(noted)
                if len(stamps) != cend - cstart:
                    raise transcode_runner.PieceRefused(f"the piece decodes to {len(stamps)} of the context's "
                                                        f"{cend - cstart} frames")
                proven = transcode_runner.account(params, stamps[start - cstart:end - cstart])
                data = chunk.read_bytes()
            finally:
                watchdog.cancel()
                for process in (decoder, encoder):
                    if process.poll() is None:
                        process.kill()
                        process.wait()
                for stream in (decoder.stdout, encoder.stdin, decode_errors, encode_errors):
                    try:
                        stream.close()
                    except OSError:
                        pass
        if len(ms) != end - start:
            raise tools.ToolError(f"{len(ms)} frames masked, the job owns {end - start}")
        return data, ms, faces, proven

    def tamper(self, params: dict[str, Any], body: bytes) -> bytes:
        """A chunk that passes every structural check (codec, size, frames, a clean decode) but
        masks nothing: the job's source frames re-encoded (flat grey when the piece is gone).
        Only VERIFY_REPLICAS can catch it."""
        if self._last is not None and self._last[0] == _identity(params):
            return self.process(params, self._last[1], never, mask=False)[0]
        with tempfile.TemporaryDirectory(prefix="tamper-") as scratch:
            chunk = Path(scratch) / f"chunk.{encode.CHUNK_FORMAT}"
            grey = f"color=c=gray:s={params['width']}x{params['height']}:r={params['fps']}"
            rate = {"threads": 1, "crf": int(params["crf"]), "bitrate": None, "preset": PRESET}
            tools.run([*tools.FFMPEG, "-v", "error", "-f", "lavfi", "-i", grey, "-frames:v", str(params["frames"]),
                       "-r", str(params["fps"]), *encode.encoder_args(rate, ENCODER), "-pix_fmt", "yuv420p",
                       "-f", encode.CHUNK_FORMAT, "-y", str(chunk)], timeout=600, what="tampering")
            return chunk.read_bytes()

    def corrupt(self, body: bytes) -> bytes:
        """Damaged bytes for WORKER_SIMULATE=corrupt (transcode's: they no longer decode)."""
        return transcode_runner.Runner().corrupt(body)


def _read(errors) -> bytes:
    errors.flush()
    errors.seek(0)
    return errors.read()
