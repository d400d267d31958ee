"""The musician's page in headless Chromium against a real server, broker and two workers.

One session does what a musician does, in order, so the songs are separated once: a
refused file, three files uploaded at once with one karaoke choice, the mixer opening
with exactly that choice audible, downloads of what is heard (volumes, tempo and key
measured in the audio), loop, shortcuts, the original to compare, reload, delete, and
then the same songs on a phone. Screenshots of each state go to test-artifacts/browser/
at 1400x900 and 390x844.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from playwright.sync_api import expect

from tests.conftest import ARTIFACTS, ROOT
from tests.helpers import decode_with_ffmpeg, get, get_json, wait_for, wav_array
from tests.test_listening import tags_of

pytestmark = pytest.mark.browser
SHOTS = ARTIFACTS / "browser"
AXE = (ROOT / "tests" / "vendor" / "axe-core" / "axe.min.js").read_text()
DESKTOP, PHONE = {"width": 1400, "height": 900}, {"width": 390, "height": 844}


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def serious_accessibility_violations(page) -> list[str]:
    """axe-core's serious and critical findings. Evaluated through the DevTools protocol, which
    the page's Content-Security-Policy does not govern (a <script> tag would be refused)."""
    found = page.evaluate(AXE + "\n;axe.run(document, {resultTypes: ['violations']})"
                                ".then(r => r.violations.filter(v => ['serious', 'critical'].includes(v.impact))"
                                ".map(v => v.id + ': ' + v.nodes.map(n => n.target.join(' ')).join(', ')))")
    return found


def small_touch_targets(page, controls: str = "button, a[href], input, select, summary") -> list[str]:
    """The visible controls (outside the drop zone) smaller than 24 x 24 px, as "name WxH"."""
    return page.evaluate("""controls => [...document.querySelectorAll(controls)]
        .filter(e => e.offsetParent !== null && !e.closest('.dropzone'))
        .map(e => [e.id || e.getAttribute('aria-label') || e.textContent.trim(), e.getBoundingClientRect()])
        .filter(([, r]) => r.width < 24 || r.height < 24).map(([n, r]) => `${n} ${r.width}x${r.height}`)""",
                         controls)


def downloaded(page, tmp_path: Path, click) -> tuple[Path, str]:
    with page.expect_download() as info:
        click()
    path = tmp_path / info.value.suggested_filename
    info.value.save_as(path)
    return path, info.value.suggested_filename


def stems_of(client, music_id: int) -> dict[str, np.ndarray]:
    status = client.get(f"/music/{music_id}").get_json()
    return {i["name"]: wav_array(client.get(i["track"] + "?format=wav").data)[0] for i in status["instruments"]}


def played_position(page) -> float:
    return float(page.input_value("#seek"))


def test_the_musicians_page(live_server, page, browser, cluster, make_song, client, tmp_path):
    cluster.start_worker()
    cluster.start_worker()
    page.set_viewport_size(DESKTOP)
    page.goto(live_server)
    page.wait_for_selector("#connection.ok")
    expect(page.locator("#farm-health")).to_have_attribute("data-online", "2", timeout=60_000)
    assert page.locator("#reset").count() == 0, "Reset is the dashboard's, not the musician's"
    shot(page, "01-empty-with-workers")

    # a file that is not audio: the server's reason is shown, not a generic failure
    junk = tmp_path / "notes.txt"
    junk.write_text("these are not the songs you are looking for")
    page.set_input_files("#file-input", str(junk))
    page.wait_for_selector("#upload-message.error:not([hidden])")
    assert "notes.txt was refused" in page.inner_text("#upload-message")
    shot(page, "02-refused-upload")

    # three files at once: every one is uploaded, the first opens, one choice applies to all
    songs = [make_song(4.0, "mp3", title="Practice Song", artist="The Band", name="one.mp3"),
             make_song(3.0, "wav", name="two.wav"), make_song(3.0, "mp3", name="three.mp3")]
    page.set_input_files("#file-input", [str(s) for s in songs])
    expect(page.locator("#library li")).to_have_count(3, timeout=60_000)
    expect(page.locator("#song-title")).to_have_text("Practice Song")
    assert page.locator("#instrument-choices input[data-name='vocals']").is_checked() is False
    expect(page.locator("#start")).to_have_text("Start this and 2 more songs")
    for box in page.locator("#instrument-choices input").all():  # nothing ticked: Start refuses
        box.uncheck()
    expect(page.locator("#start")).to_be_disabled()
    assert "at least one" in page.inner_text("#choose-hint")
    for name in ("drums", "bass", "other"):
        page.check(f"#instrument-choices input[data-name='{name}']")
    shot(page, "03-batch-and-choice")
    page.click("#start")
    page.wait_for_selector("#progress-block:not([hidden])")
    shot(page, "04-processing")

    ids = [int(x) for x in page.locator("#library li").evaluate_all("els => els.map(e => e.dataset.id)")]
    music_id = int(page.url.split("#song=")[1])
    for other in ids:
        wait_for(lambda other=other: client.get(f"/music/{other}").get_json()["state"] == "done", 180,
                 f"song {other} of the batch done")
    for other in ids:  # the one choice, applied to all three
        status = client.get(f"/music/{other}").get_json()
        assert sorted(i["name"] for i in status["instruments"] if i["track_id"] in status["selection"]) == \
            ["bass", "drums", "other"]
    page.wait_for_selector("#song-state.done", timeout=60_000)
    page.wait_for_selector("#play:not([disabled])", timeout=60_000)
    expect(page.locator("#play")).to_be_focused()  # watched while processing: the focus goes to the player
    expect(page.locator("#announce")).to_have_text("Practice Song: done, the player is ready")  # polite live region
    page.locator("#timeline .job.done").first.wait_for()
    shot(page, "05-done-mixer-opens-with-the-choice")

    # 1. the karaoke choice is what plays: vocals muted, the others audible
    for name in ("drums", "bass", "other"):
        expect(page.locator(f".stem[data-stem='{name}'] button[data-role='mute']")).to_have_attribute(
            "aria-pressed", "false")
    expect(page.locator(".stem[data-stem='vocals'] button[data-role='mute']")).to_have_attribute("aria-pressed", "true")
    assert page.get_attribute(".stem[data-stem='vocals'] button[data-role='mute']", "aria-label") == "Mute vocals"

    before = client.get(f"/music/{music_id}").get_json()
    stems = stems_of(client, music_id)
    page.select_option("#mix-format", "wav")
    mix_path, name = downloaded(page, tmp_path, lambda: page.click("#download-mix"))
    assert name == "Practice Song - drums+bass+other.wav"
    mix, _ = wav_array(mix_path.read_bytes())
    assert np.abs(mix - (stems["drums"] + stems["bass"] + stems["other"])).max() <= 3 / 32767
    after = client.get(f"/music/{music_id}").get_json()
    for key in ("selection", "mix_selection", "started_at", "finished_at"):
        assert after[key] == before[key], f"Download mix changed the song's {key}"

    # volumes are in the download too
    page.fill(".stem[data-stem='drums'] input[type='range']", "0.5")
    half_path, name = downloaded(page, tmp_path, lambda: page.click("#download-mix"))
    assert name == "Practice Song - drums+bass+other (drums 50%).wav"
    half, _ = wav_array(half_path.read_bytes())
    assert np.abs(half - (0.5 * stems["drums"] + stems["bass"] + stems["other"])).max() <= 3 / 32767
    page.fill(".stem[data-stem='drums'] input[type='range']", "1")

    # 3. tempo and key: the download at half tempo lasts twice as long; an octave up doubles the pitch
    page.fill("#tempo", "0.5")
    page.dispatch_event("#tempo", "input")
    slow_path, name = downloaded(page, tmp_path, lambda: page.click("#download-mix"))
    assert name.endswith("0.5x.wav")
    slow, rate = wav_array(slow_path.read_bytes())
    assert abs(len(slow) / len(mix) - 2) < 0.03
    assert page.evaluate("[...document.querySelectorAll('audio')].length") == 0  # elements are not in the DOM
    page.fill("#key", "12")
    page.dispatch_event("#key", "input")  # the player shifts the key itself (measured in test_player.py)
    up_path, name = downloaded(page, tmp_path, lambda: page.click("#download-mix"))
    assert name.endswith("0.5x +12 st.wav")
    assert tags_of(up_path.read_bytes())["comment"] == "stems: drums+bass+other"
    expect(page.locator("#download-status")).to_have_text(f"saved “{name}”")  # no "downloading…" left behind
    shot(page, "06-tempo-and-key")
    page.fill("#tempo", "1")
    page.dispatch_event("#tempo", "input")
    page.fill("#key", "0")
    page.dispatch_event("#key", "input")

    # FLAC of a stem from the one Downloads menu, tagged
    page.click("#downloads-menu summary")
    flac_href = page.get_attribute("#downloads-list a[aria-label='Download bass as FLAC']", "href")
    flac = get(live_server + flac_href)[1]
    assert tags_of(flac)["stems"] == "bass" and tags_of(flac)["title"] == "Practice Song"
    assert np.array_equal(np.round(decode_with_ffmpeg(flac) * 32768), np.round(stems["bass"] * 32767))

    # keyboard: Space plays, arrows seek, M and S on the focused stem, [ ] set the loop
    page.focus("#seek")
    page.keyboard.press("Home")
    page.locator("#library-title").click()  # focus on no control
    page.keyboard.press("Space")
    expect(page.locator("#play")).to_have_text("Pause")
    wait_for(lambda: played_position(page) > 0.3, 20, "the song to play")
    page.keyboard.press("Space")
    expect(page.locator("#play")).to_have_text("Play")
    page.keyboard.press("ArrowRight")
    wait_for(lambda: played_position(page) >= 3.9, 10, "→ to seek 5 s on (to the end)")
    page.keyboard.press("ArrowLeft")
    wait_for(lambda: played_position(page) <= 0.1, 10, "← to seek 5 s back")
    page.focus(".stem[data-stem='bass']")
    page.keyboard.press("m")
    expect(page.locator(".stem[data-stem='bass'] button[data-role='mute']")).to_have_attribute("aria-pressed", "true")
    page.keyboard.press("m")
    page.keyboard.press("s")
    expect(page.locator(".stem[data-stem='bass'] button[data-role='solo']")).to_have_attribute("aria-pressed", "true")
    page.keyboard.press("s")

    # A-B loop from 1.0 s to 2.0 s: playing stays inside it and wraps around
    page.fill("#seek", "1")
    page.dispatch_event("#seek", "input")
    page.locator("#library-title").click()
    page.keyboard.press("[")
    page.fill("#seek", "2")
    page.dispatch_event("#seek", "input")
    page.locator("#library-title").click()
    page.keyboard.press("]")
    expect(page.locator("#loop")).to_have_attribute("aria-pressed", "true")
    expect(page.locator("#loop-region")).to_be_visible()
    page.fill("#seek", "1")
    page.dispatch_event("#seek", "input")
    page.locator("#library-title").click()
    page.keyboard.press("Space")
    samples = page.evaluate("""async () => { const seen = [];
        for (let i = 0; i < 40; i++) { seen.push(Number(document.querySelector('#seek').value));
                                       await new Promise(r => setTimeout(r, 100)); } return seen; }""")
    page.keyboard.press("Space")
    assert max(samples) < 2.4 and min(samples) >= 0.9, samples
    assert any(b < a - 0.5 for a, b in zip(samples, samples[1:], strict=False)), f"no wrap to A: {samples}"
    shot(page, "07-loop-and-shortcuts")

    # the original, to compare: O swaps mix and original; the mix download waits
    page.keyboard.press("o")
    expect(page.locator("#compare")).to_have_attribute("aria-pressed", "true")
    expect(page.locator("#download-mix")).to_be_disabled()
    page.keyboard.press("o")

    assert serious_accessibility_violations(page) == []

    # 4. a reload keeps the song; songs are buttons; one song is deleted
    page.reload()
    page.wait_for_selector("#play:not([disabled])", timeout=60_000)
    expect(page.locator("#song-title")).to_have_text("Practice Song")
    other_song = next(i for i in ids if i != music_id)
    page.locator(f"#library li[data-id='{other_song}'] button").focus()
    page.keyboard.press("Enter")
    expect(page).to_have_url(f"{live_server}/#song={other_song}")
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#delete-song")
    expect(page.locator("#library li")).to_have_count(2)
    expect(page.locator("#song-panel")).to_be_hidden()
    assert client.get(f"/music/{other_song}").status_code == 404
    page.locator(f"#library li[data-id='{music_id}'] button").click()
    page.wait_for_selector("#play:not([disabled])", timeout=60_000)
    shot(page, "08-desktop-after-delete")

    # 2. the phone: nothing wider than the screen, the song in view, touch targets of 24 px or more
    for width in (360, 390, 430):
        phone = browser.new_context(viewport={"width": width, "height": 844}, is_mobile=True, has_touch=True)
        tab = phone.new_page()
        errors: list[str] = []
        tab.on("pageerror", lambda error, errors=errors: errors.append(str(error)))
        tab.on("console", lambda m, errors=errors: "Content Security Policy" in m.text and errors.append(m.text))
        tab.goto(live_server)
        expect(tab.locator("#library li")).to_have_count(2)
        tab.locator(f"#library li[data-id='{music_id}'] button").tap()
        tab.wait_for_selector("#play:not([disabled])", timeout=60_000)
        assert tab.evaluate("document.documentElement.scrollWidth") == width, f"horizontal overflow at {width}px"
        top = tab.evaluate("document.querySelector('#song-panel').getBoundingClientRect().top")
        assert -2 <= top < 844 / 2, f"the song panel is not in view after a tap ({top}px)"
        if width == 390:
            tab.screenshot(path=str(SHOTS / "09-phone-song.png"))
            shot(tab, "10-phone-full-page")
            small = small_touch_targets(tab)
            assert small == [], f"touch targets under 24 px: {small}"
            assert serious_accessibility_violations(tab) == []
        phone.close()
        assert not errors, errors


def test_status_is_honest_about_workers_and_the_server(page, cluster, make_song, settings):
    """One truth about a killed worker: the page's farm line and the dashboard both say it is not
    answering within a heart-beat and gone within two, its job shown busy on one card only; its attempt
    is drawn lost; a server restart is shown and recovered from; the timeline stays readable at 150 jobs."""
    cluster.start_server()
    cluster.start_worker()  # the survivor, which redoes the lost job
    victim = cluster.start_worker(WORKER_SLOWDOWN="30")  # holds its first job long enough to be killed in it
    page.set_viewport_size(DESKTOP)
    page.goto(cluster.base)
    dashboard = page.context.new_page()
    dashboard.goto(cluster.base + "/dashboard")
    expect(page.locator("#farm-health")).to_have_attribute("data-online", "2", timeout=60_000)
    name = next(w["worker"] for w in cluster.wait_workers(2) if w["pid"] == victim.pid)
    card = dashboard.locator(f"#workers [data-worker='{name}']")
    expect(card).to_have_attribute("data-liveness", "online", timeout=30_000)
    page.set_input_files("#file-input", str(make_song(8.0, "wav", name="victim.wav")))
    page.wait_for_selector("#start:not([disabled])")
    page.click("#start")
    job = wait_for(lambda: next((w["job_id"] for w in get_json(cluster.base + "/workers")
                                 if w["pid"] == victim.pid and w["state"] == "busy"), None), 60, "the victim busy")
    expect(page.locator(f"#timeline .job.running[data-job='{job}']")).to_have_count(1, timeout=10_000)

    victim.kill()
    heartbeat_ms = settings.broker_heartbeat_ms
    # stale once its last presence is one heart-beat interval (plus 0.5 s for delivery) old, by each page's own
    # clock: at most that after the kill, plus the half-second redraw and a second of margin, on both pages
    expect(page.locator("#farm-health")).to_have_attribute("data-stale", "1", timeout=heartbeat_ms + 2000)
    expect(card).to_have_attribute("data-liveness", "stale", timeout=heartbeat_ms + 2000)
    expect(page.locator(f"#timeline .job.stalled[data-job='{job}']")).to_have_count(1, timeout=5000)
    busy = dashboard.locator("#workers .state.busy", has_text=f"job {job}")
    assert busy.count() <= 1, "a lost job shows once: on the worker that redoes it"
    shot(page, "11-worker-stale")
    # gone after two intervals (the registry's expiry, checked every second), on both pages
    expect(card).to_have_attribute("data-liveness", "offline", timeout=heartbeat_ms + 3000)
    expect(page.locator("#farm-health")).to_have_attribute("data-online", "1", timeout=heartbeat_ms + 3000)
    expect(page.locator("#farm-health")).to_have_attribute("data-stale", "0")
    expect(page.locator(f"#timeline .job.lost[data-job='{job}']")).to_have_count(1, timeout=5000)
    expect(dashboard.locator("#workers [data-liveness='online']")).to_have_count(1)
    dashboard.screenshot(path=str(SHOTS / "11b-dashboard-worker-offline.png"), full_page=True)
    dashboard.close()
    page.wait_for_selector("#song-state.done", timeout=120_000)
    shot(page, "12-lost-attempt-redone")

    # the server goes away: a banner, figures greyed; it comes back: everything fetched again
    cluster.server.kill()
    cluster.server.wait(10)
    page.wait_for_selector("#offline-banner:not([hidden])", timeout=20_000)
    assert "unreachable" in page.inner_text("#offline-banner")
    assert page.evaluate("document.body.classList.contains('offline')")
    shot(page, "13-server-unreachable")
    cluster.start_server()
    expect(page.locator("#offline-banner")).to_be_hidden(timeout=30_000)
    expect(page.locator("#connection")).to_have_text("live")
    expect(page.locator("#farm-health")).to_have_attribute("data-online", "1", timeout=30_000)  # the survivor
    expect(page.locator("#song-state")).to_have_text("done")
    shot(page, "14-server-back")

    # 150 jobs on three workers: labels only where they fit, every bar named in its tooltip
    page.evaluate("""import('/web/js/operator.js').then(m => {
        const t0 = Date.now() / 1000 - 600;
        m.drawTimeline([...Array(150).keys()].map(i => ({ job_id: 1000 + i, worker: `worker-${i % 3}`,
            started_at: t0 + 4 * Math.floor(i / 3) * 3 / 3, ended_at: t0 + 4 * Math.floor(i / 3) + 3.5,
            outcome: i === 40 ? 'lost' : 'done' })));
    })""")
    page.wait_for_function("document.querySelectorAll('#timeline .lane-track .job').length === 150")
    overflowing = page.evaluate("""[...document.querySelectorAll('#timeline .lane-track .job')]
        .filter(b => b.scrollWidth > b.clientWidth + 1).length""")
    assert overflowing == 0
    assert page.locator("#timeline .job[title^='job #1040 ']").count() == 1
    shot(page, "15-timeline-150-jobs")
