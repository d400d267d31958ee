"""The server half of `transcode`: parameters, prepare (probe), plan (jobs and their pieces),
payload (cut one piece), check, keep and merge, as `src.kinds.base.Kind` defines them.

prepare reads the source's packets once (flags, sizes, timestamps: no frame is decoded) and
keeps them in the task's folder. plan cuts the video into jobs for the live workers (about
CHUNK_SECONDS each at most, a workers-th of a short clip, see `plan.job_seconds`) and proves
each job's piece from the packets; only a piece the packets cannot prove (it opens on an open
GOP's keyframe, or holds broken timestamps) is cut and decoded then (see `split`). payload cuts
its job's piece by stream copy when the job is published, so the first job is on the broker
while the later pieces are not cut yet; the worker decodes its piece anyway, reports the frames
it decoded and refuses a piece that does not hold the planned ones (see `runner`). Results are
chunks in NUT (see `encode`), joined in merge (see `stitch`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from src.config import Settings
from src.kinds.base import BadParams, JobView, Media, NotApplicable, Output, Param, Planned, TaskView
from src.kinds.transcode import check, encode, plan, probe, split, stitch, tools
from src.media.atomic import atomic

NAME = "transcode"
CONTAINERS = ("mp4", "mkv", "webm")
DEFAULT_CONTAINER = {"h264": "mp4", "hevc": "mp4", "vp9": "webm", "av1": "webm"}
WEBM_CODECS = ("vp9", "av1")
HEIGHT_RANGE = (16, 4320)
BITRATE = re.compile(r"([1-9][0-9]*)(k|M)?")  # fullmatch: "$" would also match before a final newline
BITRATE_RANGE = (16_000, 200_000_000)  # bits/s
THREADS = 1  # encoder threads per job: pinned so every worker's bytes are the same
MAX_RESULT_BYTES = 64 * 1024 * 1024  # the most a chunk may weigh: the data plane refuses more


def server(settings: Settings) -> TranscodeKind:
    return TranscodeKind(settings)


def max_height(source_height: int) -> int:
    """The tallest output of a source: its own height (even). Upscaling adds no detail, and a
    320x240 clip asked for 4320 rows took a worker's ffmpeg to 4.09 GB."""
    return max(HEIGHT_RANGE[0], source_height + source_height % 2)


def output_size(width: int, height: int, wanted: int | None) -> tuple[int, int]:
    """The encoded size: `wanted` rows (or the source's) and the width that keeps the aspect,
    both even as yuv420p needs (the same rounding as ffmpeg's `scale=-2:H`)."""
    if wanted is None:
        return max(2, width - width % 2), max(2, height - height % 2)
    return max(2, 2 * round(width * wanted / (2 * height))), wanted


class TranscodeKind:
    name = NAME
    max_result_bytes = MAX_RESULT_BYTES

    def __init__(self, settings: Settings):
        self.settings = settings

    # -- what clients see ------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        params = [
            Param("codec", "string", "h264", choices=encode.CODECS, description="video codec of the output"),
            Param("crf", "integer", None, minimum=0, maximum=63,
                  description="constant quality, lower is better; default by codec "
                  + ", ".join(f"{c} {v}" for c, v in encode.DEFAULT_CRF.items())
                  + "; 0 is lossless for h264, hevc and vp9; not with bitrate"),
            Param("bitrate", "string", None, description="target bitrate such as '2500k' or '4M'; not with crf"),
            Param("height", "integer", None, minimum=HEIGHT_RANGE[0], maximum=HEIGHT_RANGE[1],
                  description="output height in pixels, even, width follows the aspect (360 for 360p); "
                  "default: the source's"),
            Param("preset", "string", None, choices=encode.PRESETS,
                  description="encoder speed, x264 names mapped per encoder; default by codec "
                  + ", ".join(f"{c} {v}" for c, v in encode.DEFAULT_PRESET.items())),
            Param("container", "string", None, choices=CONTAINERS,
                  description="output file type; default mp4 for h264/hevc, webm for vp9/av1; webm only "
                  "for vp9/av1"),
        ]
        return {"name": NAME, "description": "Encode a video across many workers and stitch it frame-exact.",
                "media": "video", "params": [p.as_json() for p in params], "outputs": ["video"]}

    def accepts(self, media: Media) -> None:
        if media.video is None:
            raise NotApplicable("transcode needs a video stream; this file has none")

    def parameters(self, raw: dict[str, Any], media: Media) -> dict[str, Any]:
        if not isinstance(raw, dict):
            raise BadParams("params must be an object")
        unknown = sorted(set(raw) - {"codec", "crf", "bitrate", "height", "preset", "container"})
        if unknown:
            raise BadParams(f"unknown parameter {unknown[0]!r} (transcode takes codec, crf, bitrate, height, "
                            "preset, container)")
        codec = raw.get("codec", "h264")
        if codec not in encode.CODECS:
            raise BadParams(f"codec must be one of {', '.join(encode.CODECS)}, got {codec!r}")
        crf, bitrate = raw.get("crf"), raw.get("bitrate")
        if crf is not None and bitrate is not None:
            raise BadParams("crf and bitrate: give one of them, not both")
        if crf is not None:
            low, high = encode.CRF_RANGE[codec]
            if isinstance(crf, bool) or not isinstance(crf, int) or not low <= crf <= high:
                raise BadParams(f"crf must be an integer in [{low}, {high}] for {codec}, got {crf!r}")
        if bitrate is not None:
            bitrate = self._bitrate(bitrate)
        elif crf is None:
            crf = encode.DEFAULT_CRF[codec]
        height = raw.get("height")
        if height is not None:
            if isinstance(height, bool) or not isinstance(height, int):
                raise BadParams(f"height must be an integer, got {height!r}")
            if not HEIGHT_RANGE[0] <= height <= HEIGHT_RANGE[1] or height % 2:
                raise BadParams(f"height must be even and in [{HEIGHT_RANGE[0]}, {HEIGHT_RANGE[1]}], got {height}")
            source = (media.video or {}).get("height") or 0
            if source and height > max_height(source):
                raise BadParams(f"height {height} would upscale the {source}-row source; at most {max_height(source)} "
                                "(the source's height: upscaling adds no detail, only cost)")
        preset = raw.get("preset", encode.DEFAULT_PRESET[codec])
        if preset not in encode.PRESETS:
            raise BadParams(f"preset must be one of {', '.join(encode.PRESETS)}, got {preset!r}")
        container = raw.get("container", DEFAULT_CONTAINER[codec])
        if container not in CONTAINERS:
            raise BadParams(f"container must be one of {', '.join(CONTAINERS)}, got {container!r}")
        if container == "webm" and codec not in WEBM_CODECS:
            raise BadParams(f"container webm holds only vp9 or av1, not {codec}; use mp4 or mkv")
        return {"codec": codec, "crf": crf, "bitrate": bitrate, "height": height, "preset": preset,
                "container": container, "threads": THREADS}

    @staticmethod
    def _bitrate(value: Any) -> str:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        match = BITRATE.fullmatch(value) if isinstance(value, str) else None
        if not match:
            raise BadParams(f"bitrate must look like '2500k' or '4M', got {value!r}")
        bits = int(match.group(1)) * {None: 1, "k": 1000, "M": 1_000_000}[match.group(2)]
        if not BITRATE_RANGE[0] <= bits <= BITRATE_RANGE[1]:
            raise BadParams(f"bitrate must be between 16k and 200M, got {value!r}")
        return value

    def output_names(self, params: dict[str, Any], facts: dict[str, Any]) -> list[str]:
        return ["video"]

    def route(self, params: dict[str, Any]) -> str | None:
        return params["codec"]

    def version(self, params: dict[str, Any]) -> str:
        encoder = encode.encoder_for(params["codec"], tools.encoders())
        return tools.encoder_version(encoder) if encoder else "none"

    def merged_files(self, task: TaskView) -> list[Path]:
        return [task.output_path("video", task.params["container"])]

    # -- planning ---------------------------------------------------------------------

    def prepare(self, task: TaskView) -> dict[str, Any]:
        facts = probe.probe(task.media.path)  # packets only: no frame is decoded
        split.save(facts, task.folder)
        width, height = output_size(facts.width, facts.height, task.params.get("height"))
        return {"frames": facts.frames, "fps": facts.fps, "time_base": facts.time_base,
                "source_codec": facts.codec, "source_width": facts.width, "source_height": facts.height,
                "width": width, "height": height, "audio": facts.audio, "audio_lead": facts.audio_lead,
                "keyframes": len(facts.keyframes), **split.packet_facts(facts)}

    def plan(self, task: TaskView) -> list[Planned]:
        facts = split.load(task.media.path, task.folder)
        rate = facts.rate
        seconds = plan.job_seconds(facts.frames / rate, task.workers, self.settings.chunk_seconds)
        jobs = plan.plan_jobs(facts.frames, facts.keyframes, plan.chunk_frames(seconds, float(rate)),
                              facts.key_bytes, facts.bytes)
        # packets prove each piece; only where they cannot (open GOP, broken timestamps) is one decoded
        jobs = [split.prove(task.media.path, facts, task.folder, job) for job in jobs]
        plan.check_traffic(jobs, facts.bytes)  # again with the pieces as proven (open GOPs widen them)
        return [Planned(facts=job, size=job["piece_bytes"], seconds=float(job["frames"] / rate)) for job in jobs]

    def payload(self, task: TaskView, job: JobView) -> tuple[dict[str, Any], bytes]:
        params = {name: task.params[name] for name in ("codec", "crf", "bitrate", "preset", "threads")}
        params.update({name: job.facts[name] for name in ("start", "end", "frames", "skip")})
        params.update(first_pts=job.facts.get("first_pts"), last_pts=job.facts.get("last_pts"),
                      time_base=task.facts.get("time_base"))
        params.update(width=task.facts["width"], height=task.facts["height"], fps=task.facts["fps"])
        return params, split.piece_bytes(task, job)

    # -- results ----------------------------------------------------------------------

    def check(self, task: TaskView, job: JobView, params: dict[str, Any], body: bytes) -> str | None:
        if reason := check.echo_problem(params, job.facts, task.facts, task.params["codec"]):
            return reason
        # packets only, unless VERIFY=psnr or VERIFY_SAMPLE picks this chunk: then a clean
        # decode and the PSNR against the source too (what catches a clean chunk of wrong pictures)
        full = self.settings.verify == "psnr" or check.sampled(task.folder, job.chunk, self.settings.verify_sample)
        return check.check_body(body, task.folder / "checking", job.facts["frames"], task.facts["width"],
                                task.facts["height"], task.params["codec"], MAX_RESULT_BYTES,
                                also=(lambda chunk: self._verify(task, job, chunk)) if full else None,
                                decode=full, fps=task.facts["fps"])

    def _verify(self, task: TaskView, job: JobView, chunk: Path) -> str | None:
        """VERIFY=psnr and VERIFY_SAMPLE's chunks: the chunk must look like the source frames it stands for."""
        piece = split.piece_path(task.folder, job.facts)
        if not piece.is_file():
            if self.merged_files(task)[0].is_file():
                return None  # a late result for a task already merged (its pieces are gone): nothing to keep
            split.piece_bytes(task, job)  # not cut here (yet, or any more): cut it, never pass unmeasured
        measured = check.psnr(chunk, piece, job.facts["skip"], job.facts["frames"], task.facts["width"],
                              task.facts["height"], task.facts["fps"])
        if measured < self.settings.verify_min_psnr:
            return (f"PSNR {measured:.2f} dB against the source frames {job.facts['start']}-{job.facts['end']}, "
                    f"below VERIFY_MIN_PSNR {self.settings.verify_min_psnr:g} dB")
        return None

    def keep(self, task: TaskView, job: JobView, params: dict[str, Any], body: bytes) -> None:
        with atomic(task.result_path(job.id, encode.CHUNK_FORMAT)) as partial:
            partial.write_bytes(body)
        stitch.start_audio(task, task.params["container"])  # beside the video jobs, not after them

    def merge(self, task: TaskView, jobs: list[JobView]) -> dict[str, Any]:
        container = task.params["container"]
        output = task.output_path("video", container)
        stitch.join_jobs(task, jobs, task.params["codec"], container, output)
        return {**stitch.stats(output), "audio": stitch.audio_done(task, container)}

    def output(self, task: TaskView, name: str) -> Output:
        container = task.params["container"]
        return Output(name, task.output_path("video", container), stitch.MIMETYPES[container])
