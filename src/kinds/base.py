"""What a job kind is. The backbone (store, orchestrator, collector, worker runtime, API)
knows a kind only through the two halves below, found by name in `src.kinds.registry`.

Server half, `Kind`, in the order a task meets it:

1. `describe()` lists the kind's parameters for `GET /kinds`; `parameters(raw, media)`
   checks and normalises what a client sent (`BadParams` names the parameter) and
   `accepts(media)` says why the kind cannot run on a medium (`NotApplicable`, 422).
2. `prepare(task)` runs once per task on the server's background thread before
   planning: whatever slow reading of the input the kind needs (separation decodes the
   audio; transcode probes keyframes). It returns facts the store keeps on the task.
3. `plan(task)` cuts the task into jobs. Each `Planned` job owns an exact range of the
   input, carries its own facts (JSON), its size in bytes and its length in media
   seconds (the orchestrator's deadlines count those).
4. `payload(task, job)` is what one job's message carries: params (a small JSON object,
   a header) and a body (bytes: audio samples, an encoded video chunk).
5. `check(task, job, params, body)` judges a worker's result before it is accepted: a
   reason string refuses it (the attempt counts as failed, the job runs again).
   `keep(task, job, params, body)` then stores it under the task's folder.
6. `merge(task, jobs)` turns the accepted results into the task's outputs, once every job
   is in, and returns figures about them (the task's `stats`); `output(task, name)` is
   one output as a file to send (it may render it on first request and keep it).
   `merged_files(task)` lists the files merge wrote, which the outputs are served from:
   the results cache keeps them, so the same task again needs no job at all.

Limits: `max_result_bytes` is the most one job's result may weigh; the data endpoint refuses
a larger upload before the kind sees it.

Routing and caching: `route(params)` is the capability a task's jobs need (transcode: the
codec; None: any worker of the kind), one of the package's ROUTES (src/kinds/registry.py);
or a tuple of routes in order of preference (separation: a GPU, else a CPU), of which the
server takes the first that a live worker serves and keeps it for all of the task's jobs.
`version(params)` names the software that computes a job on this host (encoder and ffmpeg
build, demucs and torch): a cached result is reused only for the same version.

Worker half, `Runner`: `offers()` maps each route this host can serve ("" for a kind
without routes) to its software version; `problem(params, body)` says why a job cannot run
here (the worker refuses it), `run(params, body, should_stop)` does the work and returns the
result's params and body. `corrupt(body)` damages a result for WORKER_SIMULATE=corrupt (it
no longer decodes); `tamper(params, body)` makes one that passes every structural check but
holds other content (WORKER_SIMULATE=tamper), which only verification can catch.

A `TaskView` is what a kind sees of its task: ids, params, its own facts, the medium
and the task's folder. Kinds never touch the store, the broker or HTTP.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


class BadParams(ValueError):
    """A task's params are wrong; the message names the parameter (HTTP 400)."""


class NotApplicable(ValueError):
    """The kind cannot run on this medium, e.g. a video kind on audio-only input (HTTP 422)."""


class Cancelled(Exception):
    """The job's task was cancelled while the job ran."""


# A running job's progress, for the task's progress on the page: the worker sets a callback
# around `Runner.run` (`progress_to`), and a runner that counts its frames says how far it is
# (`report_progress`). Optional: a runner that says nothing shows its job at 0 until it is done.
_progress: ContextVar[Callable[[float], None] | None] = ContextVar("job_progress", default=None)


def report_progress(fraction: float) -> None:
    """The running job is `fraction` (0 to 1) done; nothing outside a worker's job."""
    report = _progress.get()
    if report is not None:
        report(min(1.0, max(0.0, float(fraction))))


@contextmanager
def progress_to(report: Callable[[float], None]) -> Iterator[None]:
    """Send `report_progress` calls made in the block (on this thread) to `report`."""
    token = _progress.set(report)
    try:
        yield
    finally:
        _progress.reset(token)


@dataclass(frozen=True)
class Param:
    """One parameter of a kind, as `GET /kinds` shows it."""

    name: str
    type: str  # "integer", "number", "string", "list"
    default: Any = None
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    description: str = ""

    def as_json(self) -> dict[str, Any]:
        shown = {"name": self.name, "type": self.type, "default": self.default, "description": self.description}
        if self.choices is not None:
            shown["choices"] = list(self.choices)
        if self.minimum is not None:
            shown["minimum"] = self.minimum
        if self.maximum is not None:
            shown["maximum"] = self.maximum
        return shown


@dataclass(frozen=True)
class Media:
    """An uploaded file as probed (`ffprobe`), the same for every kind."""

    id: int
    name: str
    path: Path  # the file as uploaded
    size: int
    duration: float | None
    video: dict | None  # codec, width, height, fps, frames
    audio: dict | None  # codec, samplerate, channels
    tags: dict = field(default_factory=dict)  # title, artist, ... from the container


@dataclass(frozen=True)
class TaskView:
    """What a kind sees of one task."""

    id: int
    kind: str
    params: dict[str, Any]
    facts: dict[str, Any]  # what prepare() returned (plus anything the kind updated)
    media: Media
    folder: Path  # the task's own folder: results, outputs, scratch
    workers: int = 1  # live workers that would take its jobs, when it was viewed: plans give each some

    def result_path(self, job_id: int, suffix: str = "bin") -> Path:
        return self.folder / "results" / f"{int(job_id)}.{suffix}"

    def output_path(self, name: str, suffix: str) -> Path:
        return self.folder / "outputs" / f"{name}.{suffix}"


@dataclass(frozen=True)
class Planned:
    """One job as planned: its facts (JSON), bytes of input and seconds of media."""

    facts: dict[str, Any]
    size: int
    seconds: float


@dataclass(frozen=True)
class JobView:
    """What a kind sees of one job: its id, its place in the task, its planned facts."""

    id: int
    chunk: int
    facts: dict[str, Any]


@dataclass(frozen=True)
class Output:
    """One output of a task: its name, the file, its MIME type."""

    name: str
    path: Path
    mimetype: str


class Kind(Protocol):
    name: str
    max_result_bytes: int

    def describe(self) -> dict[str, Any]: ...
    def accepts(self, media: Media) -> None: ...
    def parameters(self, raw: dict[str, Any], media: Media) -> dict[str, Any]: ...
    def output_names(self, params: dict[str, Any], facts: dict[str, Any]) -> list[str]: ...
    def prepare(self, task: TaskView) -> dict[str, Any]: ...
    def plan(self, task: TaskView) -> list[Planned]: ...
    def payload(self, task: TaskView, job: JobView) -> tuple[dict[str, Any], bytes]: ...
    def check(self, task: TaskView, job: JobView, params: dict[str, Any], body: bytes) -> str | None: ...
    def keep(self, task: TaskView, job: JobView, params: dict[str, Any], body: bytes) -> None: ...
    def merge(self, task: TaskView, jobs: list[JobView]) -> dict[str, Any]: ...
    def output(self, task: TaskView, name: str) -> Output: ...
    def merged_files(self, task: TaskView) -> list[Path]: ...
    def route(self, params: dict[str, Any]) -> str | None | tuple[str, ...]: ...
    def version(self, params: dict[str, Any]) -> str: ...


class Runner(Protocol):
    def offers(self) -> dict[str, str]: ...
    def problem(self, params: dict[str, Any], body: bytes) -> str | None: ...
    def run(self, params: dict[str, Any], body: bytes,
            should_stop: Callable[[], bool]) -> tuple[dict[str, Any], bytes]: ...
    def corrupt(self, body: bytes) -> bytes: ...
    def tamper(self, params: dict[str, Any], body: bytes) -> bytes: ...
