"""The JSON shapes of the HTTP API (see shared/CONTRACT.md), built from the store.

Links are absolute, built from the URL the client used (`base`), because the contract
types them as URIs and clients follow them as they are. A link appears once its file
is ready; before that its key is absent, never `null`. Events pushed to the page are
built without a request: there `base` is empty and links are paths on the same host.

Two families: media and tasks (every kind), and the karaoke façade of the `separate`
kind, where a song is a `separate` task (`music_id` is its task id) and its tracks are
the task's outputs other than the mix.
"""

from __future__ import annotations

from src.server.events import EventHub
from src.server.mixdown import MIX, Song
from src.server.pipeline import Pipeline
from src.server.store import Job, MediaRow, Store, Task

SEPARATE = "separate"
MUSIC_STATES = {"waiting": "uploaded", "queued": "processing", "running": "processing", "done": "done",
                "failed": "failed", "cancelled": "failed"}


def _root(base: str) -> str:
    return base.rstrip("/")


def progress(task: Task, done: int, total: int, running: float = 0.0) -> int:
    """Share of the jobs done, counting the part of the running jobs their workers report done
    (`running`, in jobs: a 75 s task in one job no longer sits at 0 % until its end); 100 only
    once the outputs can be downloaded."""
    if task.state == "done":
        return 100
    if not total:
        return 0
    return min(99, int(100 * (done + min(max(0.0, running), total - done)) / total))


# -- media and tasks ------------------------------------------------------------------


def media_view(media: MediaRow, base: str = "") -> dict:
    return {
        "media_id": media.id,
        "name": media.name,
        "duration": media.duration,
        "size": media.size,
        "video": media.probe.get("video"),
        "audio": media.probe.get("audio"),
        "url": f"{_root(base)}/media/{media.id}/original",
    }


def task_view(store: Store, task: Task, base: str = "", running: float = 0.0) -> dict:
    """A task as the API shows it; `running`: jobs' worth done inside its running jobs (Pipeline.running)."""
    done, total = store.progress(task.id)
    url = f"{_root(base)}/tasks/{task.id}"
    outputs = [{"name": o.name, "url": f"{url}/outputs/{o.name}"} for o in store.outputs(task.id)]
    return {
        "task_id": task.id,
        "kind": task.kind,
        "media_id": task.media_id,
        "params": task.params,
        "state": task.state,
        "progress": progress(task, done, total, running if task.state == "running" else 0.0),
        "jobs_total": total,
        "jobs_done": done,
        "error": task.error,
        # why its jobs wait (no live worker takes them); null when some worker can
        "waiting": task.facts.get("waiting") if task.active else None,
        "outputs": outputs if task.state == "done" else [],
        "stats": task.facts.get("stats", {}),
        "url": url,
        "created_at": task.created_at,
        "started_at": task.started_at,
        "finished_at": task.finished_at,
    }


def job_view(store: Store, job: Job) -> dict:
    task = store.task(job.task_id)
    tracks = [o.id for o in store.outputs(job.task_id) if o.name != MIX] if task and task.kind == SEPARATE else []
    return {
        "job_id": job.id,
        "size": job.size,
        "time": round((job.time_ms or 0) / 1000, 3),  # seconds, as the course's document says
        "music_id": job.task_id,
        "task_id": job.task_id,
        "kind": task.kind if task else None,
        "track_id": tracks,
        "chunk": job.chunk,
        "state": job.state,
        "worker": job.worker,
        "attempts": job.attempts,
        "seconds": round(job.seconds, 3),
        "queued_at": job.queued_at,
        "done_at": job.done_at,
    }


# -- the karaoke façade -------------------------------------------------------------------


def tracks(store: Store, task: Task) -> list[tuple[int, str]]:
    """(track id, source name) of a song: its outputs but the mix."""
    return [(o.id, o.name) for o in store.outputs(task.id) if o.name != MIX]


def song(pipeline: Pipeline, task: Task) -> Song:
    media = pipeline.store.media(task.media_id)
    f = task.facts
    return Song(task.id, media.name, media.probe.get("tags", {}).get("artist", ""), f.get("frames", 0),
                f.get("samplerate", 1), f.get("channels", 1), pipeline.files.task_dir(task.id),
                tuple(f.get("stats", {}).get("mixed", ())))


def _duration(store: Store, task: Task) -> float:
    f = task.facts
    if "frames" in f:
        return round(f["frames"] / f["samplerate"], 3)
    return round(store.media(task.media_id).duration or 0, 3)


def music_summary(store: Store, task: Task) -> dict:
    """The upload answer: contract fields, plus state and duration for the page."""
    media = store.media(task.media_id)
    done, total = store.progress(task.id)
    return {
        "music_id": task.id,
        "name": media.name,
        "band": media.probe.get("tags", {}).get("artist", ""),
        "tracks": [{"name": name, "track_id": track_id} for track_id, name in tracks(store, task)],
        "duration": _duration(store, task),
        "state": MUSIC_STATES[task.state],
        "progress": progress(task, done, total),
        "ready": task.ready,
    }


def music_status(store: Store, task: Task, base: str = "") -> dict:
    done, total = store.progress(task.id)
    finished = task.state == "done"
    path = f"{_root(base)}/music/{task.id}"
    ids = {name: track_id for track_id, name in tracks(store, task)}
    instruments = []
    for track_id, name in tracks(store, task):
        instrument = {"name": name, "track_id": track_id}
        if finished:
            instrument["track"] = f"{path}/tracks/{track_id}"
        instruments.append(instrument)
    links = {"final": f"{path}/final", "original": f"{path}/original"} if finished else {}
    selection = [ids[name] for name in task.params.get("keep", [])] if task.state != "waiting" else None
    mixed = task.facts.get("stats", {}).get("mixed")
    summary = music_summary(store, task)
    return {
        "progress": summary["progress"],
        "instruments": instruments,
        **links,
        "state": summary["state"],
        "error": task.error if task.state != "cancelled" else "cancelled",
        "music_id": task.id,
        "name": summary["name"],
        "band": summary["band"],
        "duration": summary["duration"],
        "ready": task.ready,
        "jobs_done": done,
        "jobs_total": total,
        "selection": selection,
        "mix_selection": [ids[name] for name in mixed] if finished and mixed is not None else None,
        "started_at": task.started_at,
        "finished_at": task.finished_at,
    }


def announce(events: EventHub, pipeline: Pipeline, task_id: int) -> None:
    """Push a task's full status to every open page (and a song's, for a `separate` task)."""
    task = pipeline.store.task(task_id)
    if task is None:
        return
    events.publish("task", task_view(pipeline.store, task, running=pipeline.running(task_id)))
    if task.kind == SEPARATE:
        events.publish("music", music_status(pipeline.store, task))
