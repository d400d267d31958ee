"""The real page in headless Chromium against a real server, broker and two workers.

Screenshots of each state are saved under test-artifacts/browser/.
"""

from __future__ import annotations

import signal
import time

import numpy as np
import pytest
from playwright.sync_api import expect

from tests.conftest import ARTIFACTS
from tests.helpers import wav_array

pytestmark = pytest.mark.browser
SHOTS = ARTIFACTS / "browser"


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_upload_choose_listen_and_download_in_the_browser(live_server, page, cluster, make_song, client, tmp_path):
    cluster.start_worker()
    cluster.start_worker()
    page.goto(live_server)
    page.wait_for_selector("#connection.ok")
    expect(page.locator("#workers tr")).to_have_count(2, timeout=60_000)
    shot(page, "01-empty-with-workers")

    # a file that is not audio: the server's reason is shown, not a generic failure
    junk = tmp_path / "notes.txt"
    junk.write_text("these are not the songs you are looking for")
    page.set_input_files("#file-input", str(junk))
    page.wait_for_selector("#upload-message.error:not([hidden])")
    assert "notes.txt was refused" in page.inner_text("#upload-message")
    assert "audio" in page.inner_text("#upload-message")
    shot(page, "02-refused-upload")

    song = make_song(9.0, "mp3", title="Browser Song", artist="Headless")
    page.set_input_files("#file-input", str(song))
    page.wait_for_selector("#library li.selected")
    assert "Browser Song" in page.inner_text("#library")
    for name in ("vocals", "other"):  # keep drums and bass
        box = page.locator("#instrument-choices label", has_text=name).locator("input")
        if box.is_checked():
            box.uncheck()
    shot(page, "03-choose-instruments")
    page.click("#start")
    page.wait_for_selector("#progress-block:not([hidden])")
    shot(page, "04-processing")

    page.wait_for_selector("#song-state.done", timeout=120_000)
    assert page.inner_text("#progress-percent") == "100%"
    page.wait_for_selector("#play:not([disabled])", timeout=60_000)
    page.locator("#timeline .job.done").first.wait_for()
    shot(page, "05-done-mixer-and-timeline")

    page.click("#play")
    time.sleep(0.5)
    assert page.inner_text("#play") == "Pause"
    page.click("#play")

    # listen without the bass: mute it, then download exactly what is audible
    page.click(".stem[data-stem='bass'] button[data-role='mute']")
    page.select_option("#mix-format", "wav")
    with page.expect_download() as download_info:
        page.click("#download-mix")
    mix_path = tmp_path / "mix.wav"
    download_info.value.save_as(mix_path)
    assert "drums, other, vocals" in page.inner_text("#download-status")
    shot(page, "06-bass-muted-downloaded")

    music_id = int(page.get_attribute("#library li.selected", "data-id"))
    status = client.get(f"/music/{music_id}").get_json()
    stems = {i["name"]: wav_array(client.get(i["track"] + "?format=wav").data)[0] for i in status["instruments"]}
    mix, _ = wav_array(mix_path.read_bytes())
    assert np.abs(mix - (stems["drums"] + stems["other"] + stems["vocals"])).max() <= 3 / 32767

    # solo the drums: only the drums are audible now
    page.click(".stem[data-stem='drums'] button[data-role='solo']")
    with page.expect_download() as download_info:
        page.click("#download-mix")
    download_info.value.save_as(tmp_path / "drums.wav")
    drums_only, _ = wav_array((tmp_path / "drums.wav").read_bytes())
    assert np.abs(drums_only - stems["drums"]).max() <= 1 / 32767


def test_workers_panel_follows_presence_and_reset_empties_the_page(live_server, page, cluster, make_song, settings):
    survivor = cluster.start_worker()
    victim = cluster.start_worker()
    page.goto(live_server)
    expect(page.locator("#workers tr")).to_have_count(2, timeout=60_000)
    assert page.locator(f"#workers tr[data-pid='{victim.pid}']").count() == 1

    victim.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    expect(page.locator("#workers tr")).to_have_count(1, timeout=2 * settings.broker_heartbeat_ms + 5000)
    gone_after = time.monotonic() - killed
    assert page.locator(f"#workers tr[data-pid='{survivor.pid}']").count() == 1
    assert gone_after <= 2 * settings.broker_heartbeat_ms / 1000 + 3
    shot(page, "07-worker-left-the-panel")

    page.set_input_files("#file-input", str(make_song(3.0, "wav")))
    page.wait_for_selector("#library li")
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#reset")
    page.wait_for_selector("#library-empty:not([hidden])")
    assert page.locator("#library li").count() == 0
    shot(page, "08-after-reset")
