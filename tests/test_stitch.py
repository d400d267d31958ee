"""The stitch's audio: copied where the codec fits the container, otherwise encoded once, ahead.

In-process through the transcode kind (`tests.test_transcode_kind.Run`), real ffmpeg: a source
whose AAC fits MP4 keeps its audio packets as they are; one bound for WebM gets Opus at its
own bitrate when that is below 128k; that track is encoded on a background thread when the
first result is kept, and the output is the same file whether the track was made there or at
the merge (a restarted server).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from src.kinds.transcode import runner as runner_module
from src.kinds.transcode import stitch
from src.media import guard
from tests import video
from tests.test_transcode_kind import Run

pytestmark = pytest.mark.skipif(runner_module.available() is not None, reason="needs ffmpeg and ffprobe")


def audio_packets(path: Path) -> str:
    """A digest of the file's first audio stream's packets, as they are (stream copy to a hash)."""
    done = video.ffmpeg("-i", str(path), "-map", "0:a:0", "-c", "copy", "-f", "hash", "-hash", "sha256", "-")
    return done.stdout.decode().strip()


@pytest.mark.unit
def test_the_audio_is_copied_where_it_fits_and_otherwise_encoded_at_most_at_the_source_bitrate():
    assert stitch.audio_args("aac", "mp4", 96_000) == ["-c:a", "copy"]
    assert stitch.audio_args("opus", "webm", 96_000) == ["-c:a", "copy"]
    assert stitch.audio_args("aac", "webm", 64_000) == ["-c:a", "libopus", "-b:a", "64k"]
    assert stitch.audio_args("pcm_s16le", "mp4", 1_411_200) == ["-c:a", "aac", "-b:a", "128k"]
    assert stitch.audio_args("mp3", "mp4", None) == ["-c:a", "aac", "-b:a", "128k"]
    assert stitch.audio_args("aac", "mp4", 96_000, lead=0.02) == ["-c:a", "aac", "-b:a", "96k"], "a trim re-encodes"


@pytest.mark.unit
def test_aac_in_mp4_keeps_the_source_audio_packets(tmp_path):
    clip = video.make_clip(tmp_path / "clip.mp4", 2.2)
    run = Run(tmp_path, clip, {"codec": "h264", "crf": 30, "preset": "ultrafast"})
    out = run.all()
    assert run.stats["audio"] == {"mode": "copy"}
    assert audio_packets(out) == audio_packets(clip)


@pytest.mark.unit
def test_the_encoded_track_is_made_while_jobs_run_and_a_restart_gives_the_same_file(tmp_path):
    clip = video.make_clip(tmp_path / "clip.mp4", 4.2)
    source_bps = stitch.source_audio_bps(clip)
    assert source_bps and source_bps < 128_000  # testsrc2's sine: a small source stays small

    ahead = tmp_path / "ahead"
    ahead.mkdir()
    run = Run(ahead, clip, {"codec": "vp9", "crf": 50, "preset": "ultrafast"})
    first = run.jobs[0]
    params, body = run.encode(first)
    run.kind.keep(run.task, first, params, body)  # the first result kept: the audio starts
    track = stitch.track_path(run.task, "webm")
    stitch.audio_track(run.task, "webm")  # waits for the background thread
    assert track.is_file(), "encoded before the merge"
    for job in run.jobs[1:]:
        run.kind.keep(run.task, job, *run.encode(job))
    with guard.accounted() as merge:  # as the server measures its merge phase (src/server/serial.py)
        run.stats = run.kind.merge(run.task, run.jobs)
    made_ahead = run.kind.output(run.task, "video").path
    audio = run.stats["audio"]
    assert audio["mode"] == "encode" and audio["codec"] == "libopus" and audio["ahead"] is True
    assert merge.children_cpu_seconds >= audio["cpu_seconds"], "the audio's CPU counts in the merge's serial share"
    assert audio["bitrate"] == f"{min(128_000, source_bps) // 1000}k" and audio["cpu_seconds"] > 0
    assert not track.exists(), "the track went once stitched"
    assert video.stream(made_ahead, "a:0")["codec_name"] == "opus"

    # a server restarted before the merge: no thread, no track; the merge encodes it, the same bytes
    later = tmp_path / "later"
    later.mkdir()
    again = Run(later, clip, {"codec": "vp9", "crf": 50, "preset": "ultrafast"})
    for job in again.jobs:
        params, body = again.encode(job)
        again.kind.keep(again.task, job, params, body)
    stitch.audio_track(again.task, "webm")
    shutil.rmtree(again.task.folder / stitch.AUDIO)
    with guard.accounted() as merge:
        again.stats = again.kind.merge(again.task, again.jobs)
    assert again.stats["audio"]["ahead"] is False and merge.children_cpu_seconds >= again.stats["audio"]["cpu_seconds"]
    made_at_merge = again.kind.output(again.task, "video").path
    digest = hashlib.sha256
    assert digest(made_at_merge.read_bytes()).digest() == digest(made_ahead.read_bytes()).digest()
