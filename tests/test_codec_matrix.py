"""The codec matrix of `transcode` through the whole backbone, and each result in the page.

One short clip (320x180, 25 fps, 47 frames, a keyframe every 12 frames, AAC sound) is uploaded
once to a real server with two real worker processes on the real broker; CHUNK_SECONDS 0.7 cuts
it into 3 jobs (two seams). Every combination below is submitted at once, so the two workers
stay busy, and each is then one test: H.264, HEVC, VP9 and AV1, each with a CRF scaled to 120
rows and with a target bitrate at the source's size, always with a non-default preset, in the
codec's default container, plus H.264 in Matroska.

For each output: its decoded frame count equals the input's (ffprobe -count_frames), it
decodes with `ffmpeg -xerror` without a word on stderr, and codec, size and container are the
ones asked for. Then the page opens the task (`/#task=N`, the Video tab): where this Chromium
says it can play the output (`canPlayType` on its Content-Type with the codecs of its streams),
the page's own <video> plays it to the end with no error; where Chromium cannot (HEVC: it plays
HEVC only with a platform decoder), canPlayType must say "" and the page must say so instead
of a broken player. Which is which is recorded as the test's `chromium` property. (Reaching
`ended` with no error is not enough on its own: Chromium plays an HEVC file's sound to the end
with no error and no picture, so the frames that reached the player are counted too.)

About 50 s on two cores, most of it the 27 jobs; each test then takes 2-8 s.
"""

from __future__ import annotations

import uuid
import warnings
from pathlib import Path

import pytest
import requests
from playwright.sync_api import expect

from bench import harness
from src import config
from src.kinds.transcode import encode, tools
from tests import video
from tests.conftest import Cluster, delete_queues
from tests.helpers import get_json
from tests.test_transcode import finished, transcode, upload
from tests.test_video_page import player_state

pytestmark = pytest.mark.browser

SECONDS, FPS, KEYINT = 1.88, 25, 12        # 47 frames, keyframes at 0, 12, 24, 36
SIZE, SCALED = (320, 180), (214, 120)      # the source; height 120 keeps its aspect, even width
CHUNK_SECONDS = 0.7                        # jobs 0-12, 12-24, 24-47

MATRIX = {
    "h264-crf-120p": {"codec": "h264", "crf": 30, "height": 120, "preset": "ultrafast"},
    "h264-bitrate": {"codec": "h264", "bitrate": "400k", "preset": "superfast"},
    "h264-mkv": {"codec": "h264", "crf": 26, "preset": "veryfast", "container": "mkv"},
    "hevc-crf-120p": {"codec": "hevc", "crf": 32, "height": 120, "preset": "ultrafast"},
    "hevc-bitrate": {"codec": "hevc", "bitrate": "300k", "preset": "superfast"},
    "vp9-crf-120p": {"codec": "vp9", "crf": 40, "height": 120, "preset": "ultrafast"},
    "vp9-bitrate": {"codec": "vp9", "bitrate": "300k", "preset": "superfast"},
    "av1-crf-120p": {"codec": "av1", "crf": 45, "height": 120, "preset": "ultrafast"},
    "av1-bitrate": {"codec": "av1", "bitrate": "300k", "preset": "superfast"},
}
DEFAULT_CONTAINER = {"h264": "mp4", "hevc": "mp4", "vp9": "webm", "av1": "webm"}
CONTENT_TYPES = {"mp4": "video/mp4", "mkv": "video/x-matroska", "webm": "video/webm"}
FORMAT_NAMES = {"mp4": "mp4", "mkv": "matroska", "webm": "webm"}
# H.264 profile name (as ffprobe gives it) -> profile_idc and constraint flags of an avc1 codecs string
AVC_PROFILES = {"Constrained Baseline": "42C0", "Baseline": "4200", "Main": "4D40", "High": "6400"}


class Farm:
    def __init__(self, cluster: Cluster, clip: Path, media: dict, tasks: dict[str, int]):
        self.cluster, self.clip, self.media, self.tasks = cluster, clip, media, tasks
        self.base = cluster.base


@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    """A server and two transcode workers (module-wide: the conftest's `settings` and `cluster` are
    per test), the clip uploaded and every combination of MATRIX submitted at once."""
    folder = tmp_path_factory.mktemp("codec-matrix")
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    settings = config.load({
        "CONFIG_FILE": str(folder / "no-config.yaml"), "QUEUE_PREFIX": prefix,
        "STORAGE_DIR": str(folder / "storage"), "BROKER_HEARTBEAT_MS": "2000",
        "MODEL": "demucs_unittest", "MODEL_SEGMENT": "2",  # GET /kinds describes `separate` too
        "SERVER_PORT": str(harness.free_port()), "WORKER_THREADS": "1",
        "DATA_PORT": str(harness.free_port()),  # the data endpoint's, free too (its default is SERVER_PORT + 1)
    }).with_overrides(chunk_seconds=CHUNK_SECONDS)
    cluster = Cluster(settings, folder)
    try:
        cluster.start_server()
        cluster.start_worker(WORKER_KINDS="transcode")
        cluster.start_worker(WORKER_KINDS="transcode")
        cluster.wait_workers(2)
        clip = video.make_clip(folder / "clip.mp4", SECONDS, fps=str(FPS), size="x".join(map(str, SIZE)),
                               keyint=KEYINT)
        media = upload(cluster.base, clip)
        tasks = {name: transcode(cluster.base, media["media_id"], params) for name, params in MATRIX.items()}
        yield Farm(cluster, clip, media, tasks)
    finally:
        cluster.stop()
        delete_queues(prefix)


@pytest.fixture(scope="module")
def source_frames(farm) -> int:
    frames = int(video.probe(farm.clip, "-select_streams", "v:0", "-count_frames",
                             "-show_streams")["streams"][0]["nb_read_frames"])
    assert frames == farm.media["video"]["frames"] == round(SECONDS * FPS)
    return frames


def codecs_of(streams: list[dict]) -> str:
    """The RFC 6381 codecs parameter for an output's streams (video first, then sound)."""
    names = []
    for stream in streams:
        codec, profile, level = stream["codec_name"], stream.get("profile", ""), int(stream.get("level", -99))
        if codec == "h264":
            names.append(f"avc1.{AVC_PROFILES[profile]}{level:02X}")
        elif codec == "hevc":
            names.append(f"hvc1.{2 if profile == 'Main 10' else 1}.6.L{level}.B0")
        elif codec == "vp9":
            names.append("vp9")
        elif codec == "av1":
            names.append(f"av01.{ {'Main': 0, 'High': 1, 'Professional': 2}[profile] }.{max(level, 0):02d}M.08")
        elif codec == "aac":
            names.append("mp4a.40.2")
        else:
            names.append(codec)  # opus
    return ", ".join(names)


@pytest.mark.parametrize("name", list(MATRIX))
def test_codec_matrix(name, farm, source_frames, page, tmp_path, record_property):
    params = MATRIX[name]
    codec, container = params["codec"], params.get("container", DEFAULT_CONTAINER[params["codec"]])
    width, height = SCALED if "height" in params else SIZE
    if codec == "av1":
        record_property("av1_encoder", encode.encoder_for("av1", tools.encoders()))

    # 1. The task is done and its output is the file asked for, with every frame of the input.
    task_id = farm.tasks[name]
    finished(farm.base, task_id, timeout=240)
    task = get_json(f"{farm.base}/tasks/{task_id}")
    assert task["params"]["preset"] == params["preset"] != encode.DEFAULT_PRESET[codec]
    assert task["params"]["container"] == container
    assert task["jobs_total"] == 3, task
    output = next(o for o in task["outputs"] if o["name"] == "video")
    answer = requests.get(output["url"], timeout=30)
    assert answer.status_code == 200
    content_type = answer.headers["Content-Type"].split(";")[0]
    assert content_type == CONTENT_TYPES[container]
    out = tmp_path / f"{name}.{container}"
    out.write_bytes(answer.content)

    info = video.probe(out, "-count_frames", "-show_streams", "-show_format")
    assert FORMAT_NAMES[container] in info["format"]["format_name"].split(","), info["format"]
    streams = {s["codec_type"]: s for s in info["streams"]}
    picture, sound = streams["video"], streams["audio"]
    assert picture["codec_name"] == codec and task["stats"]["codec"] == codec
    assert (picture["width"], picture["height"]) == (width, height)
    assert (task["stats"]["width"], task["stats"]["height"]) == (width, height)
    assert int(picture["nb_read_frames"]) == source_frames, f"{picture['nb_read_frames']} frames decoded " \
                                                            f"of {source_frames}"
    assert task["stats"]["frames"] == source_frames
    assert sound["codec_name"] == ("opus" if container == "webm" else "aac")

    # 2. Every stream decodes with no error at all.
    decoded = video.ffmpeg("-xerror", "-i", str(out), "-map", "0", "-f", "null", "-")
    assert decoded.stderr == b"", decoded.stderr.decode(errors="replace")

    # 3. The page's Video tab opens the task: its player plays the output where Chromium can.
    page.goto(f"{farm.base}/#task={task_id}")
    expect(page.locator("#video-state")).to_have_text("done", timeout=30_000)
    expect(page.locator("#result-figure")).to_be_visible()
    assert page.inner_text("#result-stats [data-stat='frames'] dd") == str(source_frames)
    mime = f'{content_type}; codecs="{codecs_of([picture, sound])}"'
    verdict = page.evaluate("mime => document.createElement('video').canPlayType(mime)", mime)
    if verdict:
        record_property("chromium", f"plays {mime} ({verdict})")
        expect(page.locator("#result-video")).to_be_visible()
        # Playwright's own bounded waits, not page.evaluate polls: after the musician's page tests,
        # a CI run hung for good in one of these evaluations (no evaluate has a timeout)
        result = page.locator("#result-video")
        expect(result).to_have_js_property("readyState", 4, timeout=60_000)
        page.click("#play-both")  # the page's own control: both players from the start
        expect(result).to_have_js_property("ended", True, timeout=60_000)
        played = {**player_state(page, "#result-video"), **page.evaluate(
            "(v => ({time: v.currentTime, ended: v.ended, shown: v.getVideoPlaybackQuality().totalVideoFrames,"
            " dropped: v.getVideoPlaybackQuality().droppedVideoFrames}))"
            "(document.querySelector('#result-video'))")}
        record_property("played", played)
        assert played["error"] is None and played["ended"], played
        assert abs(played["duration"] - source_frames / FPS) < 0.1, played
        assert abs(played["time"] - played["duration"]) < 0.05, played
        assert played["shown"] == source_frames, played  # every frame reached the player, not just the sound
        assert page.inner_text("#result-note") == ""
    else:
        reason = f"this Chromium cannot play {mime}: canPlayType says ''"
        record_property("chromium", reason)
        warnings.warn(f"{name}: {reason}; only the download is offered", stacklevel=1)
        expect(page.locator("#result-video")).to_be_hidden()
        expect(page.locator("#result-note")).to_contain_text("cannot play")
        expect(page.locator("#result-download")).to_be_visible()
