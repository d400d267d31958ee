"""The JSON shapes of the HTTP API (see shared/CONTRACT.md), built from the store."""

from __future__ import annotations

from src.server.events import EventHub
from src.server.store import Job, Music, Store


def music_summary(store: Store, music: Music) -> dict:
    """The upload answer: contract fields, plus state and duration for the page."""
    done, total = store.progress(music.id)
    return {
        "music_id": music.id,
        "name": music.name,
        "band": music.band,
        "tracks": [{"name": t.name, "track_id": t.id} for t in store.tracks(music.id)],
        "duration": round(music.duration, 3),
        "state": music.state,
        "progress": progress(music, done, total),
    }


def progress(music: Music, done: int, total: int) -> int:
    """Share of jobs done; 100 only once the final mix can be downloaded."""
    if music.state == "done":
        return 100
    if not total:
        return 0
    return min(99, int(100 * done / total))


def music_status(store: Store, music: Music) -> dict:
    done, total = store.progress(music.id)
    ready = music.state == "done"
    return {
        "progress": progress(music, done, total),
        "instruments": [
            {"name": t.name, "track_id": t.id, "track": f"/music/{music.id}/tracks/{t.id}" if ready else None}
            for t in store.tracks(music.id)
        ],
        "final": f"/music/{music.id}/final" if ready else None,
        "state": music.state,
        "error": music.error,
        "music_id": music.id,
        "name": music.name,
        "band": music.band,
        "duration": round(music.duration, 3),
        "jobs_done": done,
        "jobs_total": total,
        "selection": music.selection,
        "mix_selection": music.mix_selection,
        "started_at": music.started_at,
        "finished_at": music.finished_at,
    }


def job_view(store: Store, job: Job) -> dict:
    return {
        "job_id": job.id,
        "size": job.size,
        "time": job.time_ms or 0,
        "music_id": job.music_id,
        "track_id": [t.id for t in store.tracks(job.music_id)],
        "chunk": job.chunk,
        "state": job.state,
        "worker": job.worker,
        "attempts": job.attempts,
        "segments": job.plan.segments,
        "queued_at": job.queued_at,
        "done_at": job.done_at,
    }


def announce(events: EventHub, store: Store, music_id: int) -> None:
    """Push a song's full status to every open page."""
    music = store.music(music_id)
    if music is not None:
        events.publish("music", music_status(store, music))
