"""Orchestration, the outbound half of the server: upload → decode → plan → jobs on the broker.

An upload is probed in the request (what is not audio, or would cost too much to
decode, is refused now, not later in a worker) and answered at once; a decoder thread
then turns it into the float32 audio that jobs are cut from. A song asked to be
processed before its decode ends starts when it ends.

Starting a song records its jobs as `pending` in the store first and publishes them
from a background thread, each confirmed by a broker RECEIPT before it is marked
`queued`; a server restarted mid-publish finds the rest still pending and publishes
them again (a job published twice is harmless: results are idempotent).

Each publication carries a fresh attempt token (store.issue_attempt). Every few seconds
the publisher also looks for jobs past their deadline and publishes them again, so a job
that a worker took and never answered (lost, or swallowed by a rogue consumer) is never
silent; after MAX_ATTEMPTS publications its song fails with the reason instead. A job's
deadline counts from its publication and allows JOB_DEADLINE_SECONDS plus
JOB_DEADLINE_FACTOR seconds per second of audio of the job and of every job published
before it that is still out, shared among the workers alive (the queue is FIFO).
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PureWindowsPath

from src.config import Settings
from src.messaging.broker import Broker, BrokerUnavailable
from src.messaging.destinations import Destinations
from src.messaging.schema import ControlMessage, JobMessage
from src.separation.compute import job_params
from src.separation.model import ModelSpec
from src.separation.plan import plan_jobs
from src.server import audio, mixdown
from src.server.events import EventHub
from src.server.files import SongFiles
from src.server.metrics import Metrics
from src.server.store import Music, Store
from src.server.views import announce

log = logging.getLogger("server")


DEADLINE_CHECK_SECONDS = 2.0


class NotFound(LookupError):
    pass


class BadSelection(ValueError):
    pass


class NotProcessable(ValueError):
    """The song can never be processed (its audio could not be decoded)."""


def display_name(filename: str | None) -> str:
    """A human name from an uploaded file's name: no folders, no extension, no control characters."""
    if not filename:
        return "untitled"
    base = PureWindowsPath(filename).name  # splits on both / and \
    base = re.sub(r"[\x00-\x1f\x7f]", "", base)
    stem = base.rsplit(".", 1)[0] if "." in base.strip(".") else base
    return stem.strip()[:200] or "untitled"


class Orchestrator:
    def __init__(self, settings: Settings, store: Store, files: SongFiles, spec: ModelSpec, broker: Broker,
                 events: EventHub, metrics: Metrics):
        self.settings = settings
        self.store = store
        self.files = files
        self.spec = spec
        self.broker = broker
        self.events = events
        self.metrics = metrics
        self.workers_alive: Callable[[], int] = lambda: 1  # the collector's registry, wired by the app
        self._wake = queue.Queue()
        self._stopped = threading.Event()
        self._publisher = threading.Thread(target=self._publish_loop, name="publisher", daemon=True)
        self._decoder = ThreadPoolExecutor(1, thread_name_prefix="decoder")
        self._decoded = threading.Lock()  # orders "decode ended" against "processing asked for"

    def start(self) -> None:
        swept = self.files.sweep_incoming()
        if swept:
            log.info("Deleted %d unfinished upload(s) left from before", swept)
        self._publisher.start()
        self._wake.put(None)  # publish whatever a previous run left pending
        for music in self.store.all_music():  # decodes a previous run did not finish
            if not music.ready and music.state in ("uploaded", "processing"):
                self._decoder.submit(self._decode, music.id)

    # -- upload ---------------------------------------------------------------------

    def upload(self, upload_path: Path, filename: str | None) -> Music:
        """Probe an uploaded file and keep it; it is decoded in the background.

        Raises UnreadableAudio or RefusedAudio; the file is the caller's to delete then.
        """
        if upload_path.stat().st_size == 0:
            raise audio.UnreadableAudio("the upload is empty")
        found = audio.probe(upload_path)
        audio.check_limits(found, self.settings.max_duration_s, self.settings.max_channels)
        estimate = int((found.duration or 0) * self.spec.samplerate)
        music = self.store.create_music(
            name=found.title or display_name(filename), band=found.artist or "", token=uuid.uuid4().hex,
            frames=estimate, samplerate=self.spec.samplerate, channels=self.spec.channels, sources=self.spec.sources,
        )
        target = self.files.original(music.id)
        target.parent.mkdir(parents=True, exist_ok=True)
        upload_path.replace(target)
        self._decoder.submit(self._decode, music.id)
        log.info("Music[%d] - uploaded %r by %r, %s, about %.1fs", music.id, music.name, music.band, found.codec,
                 found.duration or 0)
        return music

    def _decode(self, music_id: int) -> None:
        music = self.store.music(music_id)
        if music is None or self._stopped.is_set():
            return
        decoded = self.files.incoming / f"{uuid.uuid4().hex}.f32"
        try:
            frames = audio.decode(self.files.original(music_id), decoded, self.spec.samplerate, self.spec.channels,
                                  self.settings.max_duration_s)
            mean, std = audio.normalisation(decoded, self.spec.channels)
            if self.store.music(music_id) is None:
                return  # reset while decoding
            decoded.replace(self.files.audio(music_id))
        except (audio.UnreadableAudio, audio.RefusedAudio, FileNotFoundError) as exc:
            if self.store.mark_failed(music_id, str(exc)):
                log.warning("Music[%d] - decoding failed: %s", music_id, exc)
                announce(self.events, self.store, music_id)
            return
        finally:
            decoded.unlink(missing_ok=True)
        with self._decoded:
            self.store.mark_decoded(music_id, frames, mean, std)
            music = self.store.music(music_id)
            log.info("Music[%d] - decoded, %.1fs", music_id, frames / self.spec.samplerate)
            if music is not None and music.state == "processing":
                self._start_jobs(music)
        announce(self.events, self.store, music_id)

    # -- processing -------------------------------------------------------------------

    def process(self, music_id: int, track_ids: Sequence[int]) -> None:
        music = self.store.music(music_id)
        if music is None:
            raise NotFound(f"no music with id {music_id}")
        own = {t.id for t in self.store.tracks(music_id)}
        foreign = [t for t in track_ids if t not in own]
        if foreign:
            raise BadSelection(f"track ids {foreign} do not belong to music {music_id} (its tracks: {sorted(own)})")
        with self._decoded:
            music = self.store.music(music_id)
            if not music.ready and music.state == "failed":
                raise NotProcessable(f"music {music_id} cannot be processed: {music.error}")
            self.store.set_selection(music_id, track_ids)
            if music.state == "done":
                mixdown.render_mix(self.store, self.files, music_id, list(track_ids))
                log.info("Music[%d] - remixed with tracks %s", music_id, list(track_ids))
            elif music.state in ("uploaded", "failed") and music.ready:
                self._start_jobs(music)
            elif music.state == "uploaded":
                self.store.request_processing(music_id)
                log.info("Music[%d] - processing starts once its audio is decoded", music_id)
        announce(self.events, self.store, music_id)

    def _start_jobs(self, music: Music) -> None:
        plans = plan_jobs(self.spec, music.frames, self.settings.chunk_seconds)
        self.store.start_processing(music.id, plans, bytes_per_frame=4 * music.channels)
        log.info("Music[%d] - processing in %d jobs", music.id, len(plans))
        self._wake.put(music.id)

    def stop(self) -> None:
        self._stopped.set()
        self._wake.put(None)
        self._decoder.shutdown(wait=True, cancel_futures=True)

    def _publish_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                self._wake.get(timeout=DEADLINE_CHECK_SECONDS)
            except queue.Empty:
                pass
            if self._stopped.is_set():
                return
            try:
                self._republish_overdue()
                self._publish_pending()
            except BrokerUnavailable as exc:
                log.warning("Publishing paused: %s; retrying", exc)
                time.sleep(2)
                self._wake.put(None)
            except Exception:
                log.exception("Publishing failed; retrying")
                time.sleep(2)
                self._wake.put(None)

    def _publish_pending(self) -> None:
        for job in self.store.jobs(state="pending"):
            music = self.store.music(job.music_id)
            if music is None or music.state != "processing":
                continue
            plan = job.plan
            message = JobMessage(
                music_id=music.id, job_id=job.id, chunk=job.chunk, song_token=music.token, kind="separate",
                model=self.spec.name, samplerate=music.samplerate, total_frames=music.frames,
                slice_start=plan.slice_start,
                audio=audio.read_frames(self.files.audio(music.id), music.channels, plan.slice_start,
                                        plan.slice_end - plan.slice_start),
                params=job_params(plan.first_offset, plan.segments, self.spec.stride, self.spec.segment_frames,
                                  self.spec.segment_override, music.norm_mean, music.norm_std),
                attempt_token=uuid.uuid4().hex,
            )
            self.store.issue_attempt(job.id, message.attempt_token)
            self.broker.send(self.broker.destinations.jobs, message.body(), message.headers())
            self.store.mark_queued(job.id)
            self.metrics.jobs_published.inc()
            log.info("Music[%d] - Job[%d] (chunk %d) queued (attempt %d)", music.id, job.id, job.chunk,
                     job.publications + 1)

    def deadline(self, seconds_of_audio: float) -> float:
        """Seconds a job may take from its publication, given the audio ahead of it and its own."""
        s = self.settings
        return s.job_deadline_seconds + s.job_deadline_factor * seconds_of_audio / max(1, self.workers_alive())

    def _republish_overdue(self) -> None:
        now, ahead = time.time(), 0.0
        outstanding = sorted(self.store.jobs(state="queued"), key=lambda j: j.published_at or 0)
        songs: dict[int, Music | None] = {}
        for job in outstanding:
            music = songs.setdefault(job.music_id, self.store.music(job.music_id))
            if music is None or music.state != "processing":
                continue
            ahead += (job.plan.slice_end - job.plan.slice_start) / music.samplerate
            allowed = self.deadline(ahead)
            if job.published_at is None or now - job.published_at <= allowed:
                continue
            if job.publications >= self.settings.max_attempts:
                reason = (f"job {job.id} (chunk {job.chunk}) failed: no result after {job.publications} attempt(s), "
                          f"each given {allowed:.0f}s")
                if self.store.mark_failed(music.id, reason):
                    log.error("Music[%d] - failed: %s", music.id, reason)
                    announce(self.events, self.store, music.id)
            elif self.store.republish(job.id):
                self.metrics.jobs_republished.inc()
                log.warning("Music[%d] - Job[%d] not done %.0fs after its publication (deadline %.0fs); "
                            "publishing it again", music.id, job.id, now - job.published_at, allowed)

    # -- reset ------------------------------------------------------------------------

    def reset(self) -> None:
        """Stop every worker's current job, empty the queues, delete every song."""
        newest = max((m.id for m in self.store.all_music()), default=0)
        self.broker.send(self.broker.destinations.control, b"",
                         ControlMessage("reset", (newest,)).headers(), persistent=False)
        self.store.delete_everything()
        self.files.delete_everything()
        drained = drain_stale_jobs(self.settings, self.store)
        log.info("Reset: every song deleted, %d queued jobs dropped", drained)
        self.events.publish("reset", {})


def drain_stale_jobs(settings: Settings, store: Store, quiet_seconds: float = 1.0, limit_seconds: float = 15.0) -> int:
    """ACK every queued job whose song no longer exists, until the jobs queue is quiet."""
    broker = Broker(settings, client_name=f"drain-{uuid.uuid4().hex[:8]}", role="server")
    destinations = Destinations(settings.queue_prefix)
    seen = queue.Queue()
    broker.subscribe(destinations.jobs, seen.put, prefetch=100)
    broker.connect(give_up_after=10)
    dropped, deadline = 0, time.monotonic() + limit_seconds
    try:
        while time.monotonic() < deadline:
            try:
                delivery = seen.get(timeout=quiet_seconds)
            except queue.Empty:
                break
            music_id = delivery.headers.get("music-id", "")
            if not music_id.isdigit():
                broker.nack(delivery, requeue=False)  # not ours: park it on the dead queue
                continue
            if store.music(int(music_id)) is None:
                broker.ack(delivery)
                dropped += 1
            else:
                broker.nack(delivery, requeue=True)
    finally:
        broker.close()
    return dropped
