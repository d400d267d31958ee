"""The page's Video section in headless Chromium against a real server, broker and two workers.

A generated clip (3 s, 320x240, H.264 and AAC in MP4) is uploaded on the Video tab and its facts
shown; it is transcoded to H.264, then to VP9, with the form built from `GET /kinds`. Each result
must play in the page's own <video> (readyState >= 2, the input's duration) and the page must show
the output's frame count as the server measured it. Then: a task queued with no worker alive is
cancelled from the page; the list reopens an earlier task; a reload and a shared link open the same
task; the tabs work from the keyboard; a phone shows it all without sideways scrolling, with touch
targets of 24 px or more, and axe-core finds nothing serious. Screenshots go to test-artifacts/video/.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.sync_api import expect

from tests import video
from tests.conftest import ARTIFACTS
from tests.helpers import get_json, wait_for
from tests.test_browser import serious_accessibility_violations, small_touch_targets

pytestmark = pytest.mark.browser
SHOTS = ARTIFACTS / "video"
DESKTOP = {"width": 1400, "height": 900}
SECONDS, FPS = 3, 25


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


@pytest.fixture
def clip(tmp_path: Path) -> Path:
    return video.make_clip(tmp_path / "test pattern.mp4", SECONDS, fps=str(FPS), size="320x240")


def fact(page, where: str, key: str) -> str:
    return page.inner_text(f"{where} [data-{'fact' if where == '#video-facts' else 'stat'}='{key}'] dd")


def player_state(page, selector: str) -> dict:
    return page.evaluate(f"(() => {{ const v = document.querySelector({selector!r});"
                         " return {ready: v.readyState, duration: v.duration, error: v.error && v.error.code}; })()")


def wait_until(page, expression: str, timeout: float, what: str):
    """Poll a JavaScript expression (page.wait_for_function compiles it in the page, which the page's
    Content-Security-Policy forbids: no 'unsafe-eval')."""
    return wait_for(lambda: page.evaluate(expression), timeout, what)


def task_in_url(page) -> int:
    return int(page.url.split("#task=")[1])


def start_task(page) -> int:
    """Click the form's button; returns the id of the task it started (the page opens it, the URL says which)."""
    before = page.url
    page.click("#run-task")
    page.wait_for_url(lambda url: "#task=" in url and url != before)
    return task_in_url(page)


def transcode(page, base: str, codec: str, media: dict) -> dict:
    """Transcode the open video to `codec` from the page; returns the task as the server has it once done."""
    page.select_option("#param-codec", codec)
    task_id = start_task(page)
    expect(page.locator("#task-progress")).to_be_visible()
    expect(page.locator(f"#video-list li[data-task='{task_id}']")).to_have_count(1)
    expect(page.locator("#video-state")).to_have_text("done", timeout=180_000)
    task = get_json(f"{base}/tasks/{task_id}")
    assert task["state"] == "done" and task["kind"] == "transcode" and task["params"].get("codec", "h264") == codec
    expect(page.locator("#task-percent")).to_have_text("100%")
    expect(page.locator("#cancel-task")).to_be_hidden()
    check_result(page, task, media)
    page.locator("#timeline .job.done").first.wait_for(timeout=10_000)
    return task


def check_result(page, task: dict, media: dict) -> None:
    """The open task's result plays in the page, lasts as long as the input, and its figures are shown."""
    stats = task["stats"]
    assert stats["codec"] == task["params"].get("codec", "h264"), stats
    assert (stats["width"], stats["height"]) == (320, 240), stats
    assert abs(stats["frames"] - media["video"]["frames"]) <= 1, f"{stats['frames']} frames out of " \
                                                                   f"{media['video']['frames']}"
    expect(page.locator("#result-figure")).to_be_visible()
    wait_until(page, "document.querySelector('#result-video').readyState >= 2", 60, "the result to load")
    played = player_state(page, "#result-video")
    assert played["error"] is None
    assert abs(played["duration"] - media["duration"]) < 0.2, f"result lasts {played['duration']} s, " \
                                                             f"the input {media['duration']} s"
    assert fact(page, "#result-stats", "frames") == str(stats["frames"])
    assert fact(page, "#result-stats", "resolution") == "320×240"
    # the task's serial share (stats.serial): the server's CPU against the workers'
    assert fact(page, "#result-stats", "serial").startswith(f"{100 * stats['serial']['share']:.1f}% of the CPU")
    assert fact(page, "#result-stats", "size").startswith(page.evaluate(
        f"import('/web/js/dom.js').then(m => m.bytes({stats['size']}))"))
    output = next(o for o in task["outputs"] if o["name"] == "video")
    assert page.get_attribute("#result-download", "href") == output["url"] + "?download=1"


def walk_through(page, browser, base: str, clip: Path, stop_workers) -> None:
    """What someone does in the Video section, in order; `stop_workers()` ends every worker."""
    page.set_viewport_size(DESKTOP)
    page.goto(base)
    page.wait_for_selector("#connection.ok")
    expect(page.locator("#farm-health")).to_have_attribute("data-online", "2", timeout=60_000)

    # the tab, by mouse and then by keyboard; the hash says which section is open
    page.click("#tab-video")
    expect(page.locator("#video-view")).to_be_visible()
    expect(page.locator("#songs-view")).to_be_hidden()
    expect(page).to_have_url(f"{base}/#video")
    page.focus("#tab-video")
    page.keyboard.press("ArrowLeft")
    expect(page.locator("#tab-songs")).to_be_focused()
    expect(page.locator("#library-panel")).to_be_visible()
    page.keyboard.press("ArrowRight")
    expect(page.locator("#tab-video")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#timeline-title")).to_have_text("Jobs of the open video task")

    # a file that is no media: the server's reason is shown
    junk = clip.with_name("notes.txt")
    junk.write_text("not a video")
    page.set_input_files("#video-file-input", str(junk))
    expect(page.locator("#video-message")).to_contain_text("notes.txt was refused")

    # the clip: its facts, its player, and the form built from GET /kinds
    page.set_input_files("#video-file-input", str(clip))
    expect(page.locator("#video-panel")).to_be_visible(timeout=60_000)
    expect(page.locator("#video-message")).to_be_hidden()
    media_id = int(page.url.split("#media=")[1])
    media = get_json(f"{base}/media/{media_id}")
    assert media["name"] in (clip.name, clip.stem)
    expect(page.locator("#video-title")).to_have_text(media["name"])
    assert media["video"]["frames"] in range(SECONDS * FPS - 1, SECONDS * FPS + 2), media
    assert fact(page, "#video-facts", "resolution") == "320×240"
    assert fact(page, "#video-facts", "fps") == f"{FPS} fps"
    assert fact(page, "#video-facts", "frames") == str(media["video"]["frames"])
    assert fact(page, "#video-facts", "duration") == f"{media['duration']:.2f} s"
    wait_until(page, "document.querySelector('#original-video').readyState >= 1", 30, "the original to load")
    # the form in people's words: presets first, each with a size estimate; the raw fields under Advanced
    expect(page.locator("input[name='preset'][value='web']")).to_be_checked()
    expect(page.locator("#size-estimate")).to_contain_text("Estimated size: about")
    expect(page.locator("#param-codec")).to_be_hidden()
    page.get_by_text("Small (AV1 360p)").click()
    expect(page.locator("#size-estimate")).not_to_contain_text("larger than the original")
    shot(page, "01b-video-form-presets")
    page.click("#task-advanced summary")
    assert page.input_value("#param-codec") == "av1" and page.input_value("#param-height") == ""  # 240p: kept
    assert page.locator("input[name='rate-mode'][value='bitrate']").is_checked()
    page.get_by_text("Web (H.264 720p)").click()
    assert page.input_value("#param-codec") == "h264"
    assert page.locator("input[name='rate-mode'][value='bitrate']").is_checked()  # from the source's bitrate
    kind = next(k for k in get_json(f"{base}/kinds") if k["name"] == "transcode")
    codecs = next(p for p in kind["params"] if p["name"] == "codec")["choices"]
    assert page.locator("#param-codec option").evaluate_all("os => os.map(o => o.value)") == codecs
    for name in ("bitrate", "height", "preset", "container"):
        expect(page.locator(f"#param-{name}")).to_be_visible()
    expect(page.locator("#param-crf")).to_be_hidden()  # CRF or bitrate, one at a time
    page.check("input[name='rate-mode'][value='crf']")
    expect(page.locator("#param-crf")).to_be_visible()
    expect(page.locator("#param-bitrate")).to_be_hidden()
    expect(page.locator("input[name='preset'][value='custom']")).to_be_checked()  # a raw field changed: Custom
    page.check("input[name='rate-mode'][value='bitrate']")
    assert page.locator("#param-height option").first.inner_text() == "source (240p)"
    assert page.locator("#param-height option[value='360']").count() == 1
    shot(page, "01-uploaded")

    # 1. H.264, then 2. VP9: each plays in the page with the input's length and its frame count shown
    h264 = transcode(page, base, "h264", media)
    shot(page, "02-h264-done")
    vp9 = transcode(page, base, "vp9", media)
    shot(page, "03-vp9-done")
    expect(page.locator("#video-list li[data-task]")).to_have_count(2)
    expect(page.locator(f"#video-list li[data-task='{vp9['task_id']}'] .meta")).to_contain_text("VP9")
    expect(page.locator(f"#video-list li[data-task='{h264['task_id']}'] .meta")).to_contain_text("H.264")

    # 3. the list reopens the first task, with its settings in the form
    page.click(f"#video-list li[data-task='{h264['task_id']}'] button")
    expect(page).to_have_url(f"{base}/#task={h264['task_id']}")
    assert page.input_value("#param-codec") == "h264"
    check_result(page, h264, media)
    assert serious_accessibility_violations(page) == []

    # 4. a reload opens the same task, on the Video tab
    page.reload()
    expect(page.locator("#tab-video")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#video-state")).to_have_text("done", timeout=30_000)
    check_result(page, h264, media)

    # 5. no worker alive: a new task waits; Cancel stops it
    stop_workers()
    page.select_option("#param-codec", "h264")
    page.select_option("#param-height", "240")  # the source's: the kind refuses to upscale
    waiting = start_task(page)
    expect(page.locator("#cancel-task")).to_be_visible()
    assert get_json(f"{base}/tasks/{waiting}")["params"]["height"] == 240
    shot(page, "04-waiting")
    page.click("#cancel-task")
    expect(page.locator("#video-state")).to_have_text("cancelled", timeout=30_000)
    expect(page.locator("#cancel-task")).to_be_hidden()
    expect(page.locator(f"#video-list li[data-task='{waiting}'] .state")).to_have_text("cancelled")
    assert get_json(f"{base}/tasks/{waiting}")["state"] == "cancelled"

    # a job in progress counts once: a worker that died in job 7 (its attempt not yet called lost) and the
    # one redoing it make 75 frames in progress of a 75-frame clip, not 150
    page.evaluate("""import('/web/js/videoframes.js').then(m => m.renderShares({ state: 'running', stats: {} },
        { video: { fps: 25, frames: 75 } }, { pending: { jobs: 0, seconds: 0 }, workers: [
          { worker: 'dead', seconds_done: 0, compute_ms: 0, alive: true,
            running: { job_id: 7, seconds: 3, started_at: 10 } },
          { worker: 'redo', seconds_done: 0, compute_ms: 0, alive: true,
            running: { job_id: 7, seconds: 3, started_at: 20 } },
        ] }))""")
    assert page.get_attribute("#task-workers-total [data-col='running']", "data-frames") == "75"
    expect(page.locator("#task-workers tr[data-worker='dead'] [data-col='running']")).to_contain_text("lost")

    # 6. the Songs tab is as it was
    page.click("#tab-songs")
    expect(page.locator("#library-panel")).to_be_visible()
    expect(page.locator("#video-panel")).to_be_hidden()
    expect(page).to_have_url(f"{base}/")

    # 7. a phone, from a shared link to the VP9 task
    for width in (360, 390):
        phone = browser.new_context(viewport={"width": width, "height": 844}, is_mobile=True, has_touch=True)
        tab = phone.new_page()
        errors: list[str] = []
        tab.on("pageerror", lambda error, errors=errors: errors.append(str(error)))
        tab.on("console", lambda m, errors=errors: "Content Security Policy" in m.text and errors.append(m.text))
        tab.goto(f"{base}/#task={vp9['task_id']}")
        expect(tab.locator("#video-state")).to_have_text("done", timeout=30_000)
        wait_until(tab, "document.querySelector('#result-video').readyState >= 2", 60, "the result to load")
        assert tab.evaluate("document.documentElement.scrollWidth") == width, f"horizontal overflow at {width}px"
        top = tab.evaluate("document.querySelector('#video-panel').getBoundingClientRect().top")
        assert -2 <= top < 844 / 2, f"the open task is not in view ({top}px)"
        if width == 390:
            shot(tab, "05-phone")
            small = small_touch_targets(tab, "button, a[href], input, select, summary, video")
            assert small == [], f"touch targets under 24 px: {small}"
            assert serious_accessibility_violations(tab) == []
        phone.close()
        assert not errors, errors


def test_the_video_page(live_server, page, browser, cluster, clip):
    cluster.start_worker()
    cluster.start_worker()

    def stop_workers():
        for worker in cluster.workers:
            worker.kill()
            worker.wait(10)

    walk_through(page, browser, live_server, clip, stop_workers)
