"""The JSON shapes of the HTTP API (see shared/CONTRACT.md), built from the store.

Links are absolute, built from the URL the client used (`base`), because the contract
types them as URIs and clients follow them as they are. A link appears once its file
is ready; before that its key is absent, never `null`. Events pushed to the page are
built without a request: there `base` is empty and links are paths on the same host.
"""

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
        "ready": music.ready,
    }


def progress(music: Music, done: int, total: int) -> int:
    """Share of jobs done; 100 only once the final mix can be downloaded."""
    if music.state == "done":
        return 100
    if not total:
        return 0
    return min(99, int(100 * done / total))


def music_status(store: Store, music: Music, base: str = "") -> dict:
    done, total = store.progress(music.id)
    finished = music.state == "done"
    song = f"{base.rstrip('/')}/music/{music.id}"
    instruments = []
    for t in store.tracks(music.id):
        instrument = {"name": t.name, "track_id": t.id}
        if finished:
            instrument["track"] = f"{song}/tracks/{t.id}"
        instruments.append(instrument)
    links = {"final": f"{song}/final", "original": f"{song}/original"} if finished else {}
    return {
        "progress": progress(music, done, total),
        "instruments": instruments,
        **links,
        "state": music.state,
        "error": music.error,
        "music_id": music.id,
        "name": music.name,
        "band": music.band,
        "duration": round(music.duration, 3),
        "ready": music.ready,
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
        "time": round((job.time_ms or 0) / 1000, 3),  # seconds, as the course's document says
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
