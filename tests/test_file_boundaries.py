"""Nothing a file, a folder or a worker sends reaches past its own task (issue 27, parts 1 and 2).

The watch folder is driven step by step on a real app (its real store, orchestrator and
probe), with the attacker's moves made by a thread at the moment they won the race in the
audit: between the stability checks and the move. Every role of the ffmpeg input guard
(`src.media.guard`) is then tried with an HLS playlist, a concat list and a symlink, each
naming a real video outside the task's folder, and the playlist "chunk" a worker login sent
is carried through the real transcode kind (check, keep, stitch) with real ffmpeg.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from src import config
from src.kinds import registry
from src.kinds.base import JobView, TaskView
from src.kinds.transcode import check, plan, split, stitch, tools
from src.kinds.transcode import probe as video_probe
from src.media import guard, pcm, probe
from src.server import create_app, quota
from src.server.watch import STABLE_POLLS, UnsafeFolder, Watcher
from tests import video
from tests.helpers import services_of


def never() -> bool:
    return False


@pytest.fixture
def watched(settings, tmp_path):
    """A real app (not connected to the broker: the watcher's steps need only the store, the
    orchestrator and ffprobe) and its watcher, driven by hand, never by its thread."""
    settings = settings.with_overrides(watch_dir=tmp_path / "drop", max_upload_mb=1)
    app = create_app(settings)
    services = services_of(app)
    watcher = Watcher(services.pipeline, services.orchestrator)
    watcher._folders()
    yield app, watcher
    services.orchestrator.stop()
    services.close()


def seen_stable(watcher: Watcher, name: str) -> None:
    for _ in range(STABLE_POLLS):
        ready = watcher._stable()
    assert name in ready


def outside_video(tmp_path: Path) -> Path:
    (tmp_path / "outside").mkdir(exist_ok=True)
    return video.make_clip(tmp_path / "outside" / "secret.mkv", 1.0, size="64x48", audio=False)


def links_in_storage(settings) -> list[Path]:
    return quota._scan(settings.storage_dir, skip=[settings.watch_dir])[1]


def test_a_file_swapped_for_a_symlink_after_its_checks_is_never_stored(watched, tmp_path):
    app, watcher = watched
    secret = outside_video(tmp_path)
    dropped = video.make_clip(watcher.folder / "holiday.mp4", 1.0)
    seen_stable(watcher, "holiday.mp4")

    def swap() -> None:  # the attacker: the checked file becomes a link to a file outside, atomically
        link = watcher.folder / ".swap"
        os.symlink(secret, link)
        os.replace(link, dropped)

    attacker = threading.Thread(target=swap)
    attacker.start()
    attacker.join()
    watcher._take("holiday.mp4")

    assert services_of(app).store.all_media() == []
    assert list(watcher.originals.iterdir()) == []
    assert dropped.is_symlink()  # left where it was dropped, never followed
    assert links_in_storage(watcher.p.settings) == []
    assert app.test_client().get("/media/1/original").status_code == 404


def test_a_file_replaced_by_another_after_its_checks_waits_for_new_checks(watched, tmp_path):
    app, watcher = watched
    dropped = video.make_clip(watcher.folder / "clip.mp4", 1.0)
    seen_stable(watcher, "clip.mp4")
    other = video.make_clip(tmp_path / "other.mp4", 1.0, size="64x48")
    attacker = threading.Thread(target=os.replace, args=(other, dropped))  # another inode under the name
    attacker.start()
    attacker.join()
    watcher._take("clip.mp4")
    assert services_of(app).store.all_media() == [] and list(watcher.originals.iterdir()) == []
    seen_stable(watcher, "clip.mp4")  # once the new file has been seen stable, it is taken
    watcher._take("clip.mp4")
    assert [m.size for m in services_of(app).store.all_media()] == [(watcher.originals / "clip.mp4").stat().st_size]


def test_a_symlinked_failed_folder_is_never_written_through(watched, tmp_path):
    app, watcher = watched
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (watcher.folder / "notes.txt").write_text("not media at all\n")
    seen_stable(watcher, "notes.txt")
    shutil.rmtree(watcher.failed)  # after the checks: failed/ becomes a link to a folder outside
    os.symlink(elsewhere, watcher.failed)
    watcher._take("notes.txt")  # not media: it would go to failed/ with a note
    assert list(elsewhere.iterdir()) == []
    with pytest.raises(UnsafeFolder):
        watcher.poll()
    assert list(elsewhere.iterdir()) == []
    # failed/ made a folder again: the file and its note land there
    os.unlink(watcher.failed)
    watcher.poll()
    assert sorted(p.name for p in watcher.failed.iterdir()) == ["notes.txt", "notes.txt.error.txt"]


def test_a_watched_file_over_max_upload_mb_goes_to_failed(watched, tmp_path):
    app, watcher = watched
    video.ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100", "-ac", "2", "-t", "12",
                 "-c:a", "pcm_s16le", str(watcher.folder / "long.wav"))
    assert (watcher.folder / "long.wav").stat().st_size > 2 * 1024 * 1024
    seen_stable(watcher, "long.wav")
    watcher._take("long.wav")
    assert services_of(app).store.all_media() == []
    note = (watcher.failed / "long.wav.error.txt").read_text()
    assert "MAX_UPLOAD_MB" in note and (watcher.failed / "long.wav").is_file()


def test_a_newline_in_a_watched_name_cannot_forge_a_log_line(watched, caplog, tmp_path):
    app, watcher = watched
    name = "clip.mp4\n2026-01-01 00:00:00.000 ERROR   forged: the server was hacked"
    os.rename(video.make_clip(tmp_path / "clip.mp4", 1.0), watcher.folder / name)
    seen_stable(watcher, name)
    with caplog.at_level(logging.INFO, logger="server"):
        watcher._take(name)
    messages = [record.getMessage() for record in caplog.records if "Watch" in record.getMessage()]
    assert messages and all("\n" not in message for message in messages), messages
    assert len(services_of(app).store.all_media()) == 1


def test_the_server_refuses_to_start_on_a_storage_holding_a_symlink(settings, tmp_path):
    kept = settings.storage_dir / "media" / "1"
    kept.mkdir(parents=True)
    os.symlink(outside_video(tmp_path), kept / "original")
    with pytest.raises(ValueError, match="symlink"):
        create_app(settings)


# -- the guard: every role with a playlist, a concat list and a symlink -----------------------


def hostile(folder: Path, secret: Path, form: str) -> Path:
    """A file in `folder` that would make ffmpeg read `secret` (outside it)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{form}.nut"
    if form == "playlist":
        path.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:1.0,\n{secret}\n#EXT-X-ENDLIST\n")
    elif form == "concat":
        path.write_text(f"ffconcat version 1.0\nfile '{secret}'\n")
    else:
        os.symlink(secret, path)
    return path


@pytest.fixture(scope="module")
def secret(tmp_path_factory) -> Path:
    """A real video outside every task's folder, and an honest chunk made of it."""
    folder = tmp_path_factory.mktemp("outside")
    return video.make_clip(folder / "secret.mkv", 1.0, size="64x48", audio=False)


def upload_probe(path: Path, scratch: Path) -> None:
    probe.probe(path)


def upload_decode(path: Path, scratch: Path) -> None:
    pcm.decode(path, scratch / "audio.f32", 44100, 2, 60)


def source_probe(path: Path, scratch: Path) -> None:
    video_probe.probe(path)


def source_split(path: Path, scratch: Path, secret: Path) -> None:
    facts = video_probe.probe(secret)
    jobs = plan.plan_jobs(facts.frames, facts.keyframes, 10, facts.key_bytes, facts.bytes)
    split.cut(path, scratch, split.prove(secret, facts, scratch, jobs[-1]), time_base=facts.time_base)


def piece_count(path: Path, scratch: Path) -> None:
    video_probe.count_frames(path)


def chunk_check(path: Path, scratch: Path) -> None:
    reason = check.check_chunk(path, 25, 64, 48, "h264")
    if reason:
        raise ValueError(reason)


def chunk_psnr(path: Path, scratch: Path, secret: Path) -> None:
    check.psnr(path, secret, 0, 25, 64, 48, "25/1")


def chunks_stitched(path: Path, scratch: Path, secret: Path) -> None:
    honest = scratch / "honest.nut"
    video.ffmpeg("-i", str(secret), "-c", "copy", "-f", "nut", str(honest))
    stitch.stitch([(honest, 25), (path, 25)], "25/1", secret, False, "mkv", "h264", scratch / "out.mkv",
                  folder=scratch)


def output_stats(path: Path, scratch: Path) -> None:
    stitch.stats(path)


ROLES = {"upload probe": upload_probe, "upload decode": upload_decode, "source probe": source_probe,
         "source split": source_split, "piece count": piece_count, "chunk check": chunk_check,
         "chunk psnr": chunk_psnr, "chunks stitched": chunks_stitched, "output stats": output_stats}
REFUSALS = (probe.UnreadableMedia, tools.ToolError, split.SplitError, ValueError)


@pytest.mark.unit
@pytest.mark.parametrize("form", ["playlist", "concat", "symlink"])
@pytest.mark.parametrize("role", sorted(ROLES))
def test_every_guarded_input_refuses_what_names_a_file_outside(role, form, secret, tmp_path):
    scratch = tmp_path / "task"
    path = hostile(scratch, secret, form)
    call = ROLES[role]
    with pytest.raises(REFUSALS):
        call(path, scratch, secret) if call.__code__.co_argcount == 3 else call(path, scratch)
    assert not (scratch / "out.mkv").exists()


@pytest.mark.unit
def test_the_guard_names_only_regular_files_inside_the_folder(secret, tmp_path):
    inside = tmp_path / "task"
    inside.mkdir()
    (inside / "sub").symlink_to(secret.parent)
    for path in (secret, inside / "sub" / secret.name, inside / "missing.nut"):
        with pytest.raises(guard.OutsideFolder):
            guard.probe_input(path, guard.PIECE, inside)
    copy = inside / "chunk.nut"
    shutil.copyfile(secret, copy)
    assert guard.probe_input(copy, guard.PIECE, inside)[-1] == f"file:{copy.resolve()}"


# -- the playlist result, through the real kind -------------------------------------------------


@pytest.mark.unit
def test_a_playlist_result_is_refused_by_the_check_and_never_stitched(tmp_path):
    settings = config.load({"CONFIG_FILE": str(tmp_path / "none.yaml")}).with_overrides(
        chunk_seconds=1.0, storage_dir=tmp_path)
    kind, runner = registry.server("transcode", settings), registry.worker("transcode", settings)
    media = video.media(video.make_clip(tmp_path / "clip.mp4", 2.0, audio=False))
    task = TaskView(id=7, kind="transcode", params=kind.parameters({"preset": "ultrafast"}, media), facts={},
                    media=media, folder=tmp_path / "task")
    task.folder.mkdir()
    task = replace(task, facts=kind.prepare(task))
    jobs = [JobView(id=100 + i, chunk=i, facts=p.facts) for i, p in enumerate(kind.plan(task))]
    results = [runner.run(*kind.payload(task, job), never) for job in jobs]
    # A worker login's "chunk" for job 0: an HLS playlist naming, outside STORAGE_DIR, a file
    # that is exactly the chunk the job expects (so only the guard can tell them apart).
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "chunk.nut").write_bytes(results[0][1])
    video.ffmpeg("-i", str(outside / "chunk.nut"), "-c", "copy", "-f", "mpegts", str(outside / "secret.ts"))
    playlist = (f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:1.0,\n{outside / 'secret.ts'}\n"
                "#EXT-X-ENDLIST\n").encode()
    assert len(playlist) < 200
    reason = kind.check(task, jobs[0], results[0][0], playlist)
    assert reason and "chunk" in reason, reason
    for job, (params, body) in zip(jobs, results, strict=True):  # kept anyway, as if unchecked
        kind.keep(task, job, params, playlist if job is jobs[0] else body)
    with pytest.raises(REFUSALS):
        kind.merge(task, jobs)
    assert not kind.output(task, "video").path.exists()
