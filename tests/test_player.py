"""The practice player in headless Chromium on a real processed song (real server, broker, worker).

One song of a pure 440 Hz tone, separated once, then:
- **key in real time**: while it plays, the key slider shifts the pitch of what is played, as
  an AnalyserNode on the page's own output measures it (on the original's stream: the tiny
  test model's stems of a pure tone are not pure tones, the upload is); the time from the
  slider's change to the new pitch at the output is recorded in
  test-artifacts/player/key-latency.json;
- **the A-B loop** does what each key sequence means, the two that failed before included,
  and a loop line dragged on a waveform moves;
- **settings stay**: tempo, key, volumes, mutes, solos and loop points come back after a
  reload, and from the link alone in a browser that never saw them;
- **keyboard and screen readers**: the seek slider steps 1 s (5 s with Page Up / Down) and
  says "0:05 of 0:24"; axe finds nothing serious;
- **phone** (390x844, touch): the transport and the download stay in view at the mixer, the
  keyboard shortcuts are not shown.
Screenshots in test-artifacts/player/ (phone-player.png is the phone's player at the mixer).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from playwright.sync_api import expect

from tests.conftest import ARTIFACTS
from tests.helpers import wait_for
from tests.test_browser import DESKTOP, serious_accessibility_violations
from tests.test_pipeline import wait_done

pytestmark = pytest.mark.browser
SHOTS = ARTIFACTS / "player"
SECONDS = 24
TONE = 440.0

# Every node the page connects to the speakers is also connected to an analyser the test reads.
ANALYSER = """(() => {
  const connect = AudioNode.prototype.connect;
  AudioNode.prototype.connect = function (target, ...rest) {
    if (target instanceof AudioDestinationNode && !(this instanceof AnalyserNode)) {
      const analyser = this.context.createAnalyser();
      analyser.fftSize = 2048;
      analyser.smoothingTimeConstant = 0;
      connect.call(this, analyser);
      window.testAnalyser = analyser;
    }
    return connect.call(this, target, ...rest);
  };
  window.testPeakHz = () => {
    const a = window.testAnalyser, data = new Float32Array(a.frequencyBinCount);
    a.getFloatFrequencyData(data);
    let i = 2;
    for (let k = 3; k < data.length - 1; k++) if (data[k] > data[i]) i = k;
    const [l, c, r] = [data[i - 1], data[i], data[i + 1]];
    return (i + 0.5 * (l - r) / (l - 2 * c + r)) * a.context.sampleRate / a.fftSize;
  };
})();"""

# Move the key slider and wait, polling the analyser every millisecond, for the new pitch.
KEY_CHANGE = """async ([semitones, hz]) => {
  const key = document.querySelector('#key');
  key.value = semitones;
  const t0 = performance.now();
  key.dispatchEvent(new Event('input', { bubbles: true }));
  while (performance.now() - t0 < 5000) {
    if (Math.abs(window.testPeakHz() - hz) < hz * 0.01) return performance.now() - t0;
    await new Promise((r) => setTimeout(r, 1));
  }
  return null;
}"""


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"))


def pure_tone(path: Path) -> Path:
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", f"sine=f={TONE}:d={SECONDS}:sample_rate=44100",
                    "-af", "volume=0.5", "-ac", "2", "-metadata", "title=Pure Tone", "-y", str(path)],
                   check=True, timeout=60)
    return path


def steady_hz(page) -> float:
    """The median of ten readings over half a second: one reading may fall on a seek or a wrap."""
    readings = page.evaluate("async () => { const seen = []; for (let i = 0; i < 10; i++) {"
                             " seen.push(window.testPeakHz()); await new Promise(r => setTimeout(r, 50)); }"
                             " return seen.sort((a, b) => a - b); }")
    return readings[len(readings) // 2]


def loop_text(page) -> str:
    return page.inner_text("#loop-text")


def seek_to(page, seconds: float) -> None:
    page.fill("#seek", str(seconds))
    page.dispatch_event("#seek", "input")
    page.locator("#song-title").click()  # the focus on no control: the keys are the player's shortcuts


def test_the_practice_player(live_server, page, browser, cluster, client, tmp_path):
    cluster.start_worker()
    song = client.post("/music", data=pure_tone(tmp_path / "tone.wav").read_bytes(),
                       content_type="application/octet-stream").get_json()
    music_id = song["music_id"]
    assert client.post(f"/music/{music_id}", json=[t["track_id"] for t in song["tracks"]]).get_json() == {}
    wait_done(client, music_id)

    page.add_init_script(ANALYSER)
    page.set_viewport_size(DESKTOP)
    page.goto(f"{live_server}/#song={music_id}")
    page.wait_for_selector("#play:not([disabled])", timeout=60_000)
    assert page.get_attribute("#seek", "aria-valuetext") == "0:00 of 0:24"

    # ---- key in real time, measured at the output
    page.click("#compare")  # the original: a pure tone
    page.click("#play")
    wait_for(lambda: abs(steady_hz(page) - TONE) < 3, 20, "the tone at the output")
    latencies = {}
    for semitones in (2, -3):
        expected = TONE * 2 ** (semitones / 12)
        latency = page.evaluate(KEY_CHANGE, [semitones, expected])
        assert latency is not None, f"key {semitones:+d} never reached the output"
        assert abs(steady_hz(page) - expected) < 3, f"key {semitones:+d}: {steady_hz(page)} Hz, not {expected:.1f}"
        latencies[f"{semitones:+d}"] = round(latency, 1)
    assert page.locator("#play").inner_text() == "Pause", "the key changed without stopping the music"
    SHOTS.mkdir(parents=True, exist_ok=True)
    (SHOTS / "key-latency.json").write_text(json.dumps(
        {"ms_from_slider_to_output": latencies,
         "analyser_window_ms": page.evaluate("1000 * testAnalyser.fftSize / testAnalyser.context.sampleRate"),
         "output_latency_ms": page.evaluate("1000 * (testAnalyser.context.baseLatency + "
                                            "(testAnalyser.context.outputLatency || 0))")}))
    page.click("#play")
    page.click("#compare")

    # ---- keyboard: the seek slider steps 1 s, Page Up 5 s, and says where it is
    page.focus("#seek")
    page.keyboard.press("Home")
    page.keyboard.press("ArrowRight")
    expect(page.locator("#seek")).to_have_attribute("aria-valuetext", "0:01 of 0:24")
    page.keyboard.press("PageUp")
    expect(page.locator("#seek")).to_have_attribute("aria-valuetext", "0:06 of 0:24")
    page.keyboard.press("PageDown")
    page.keyboard.press("ArrowLeft")
    expect(page.locator("#seek")).to_have_attribute("aria-valuetext", "0:00 of 0:24")

    # ---- the A-B loop
    # the first that failed: an old loop 5.3-8.3 switched off, then [ at 0:21
    seek_to(page, 5.3)
    page.keyboard.press("[")
    assert loop_text(page) == "A 0:05.3 · B not set"
    expect(page.locator("#loop")).to_be_disabled()  # no loop until both points are set
    page.keyboard.press("]")  # B at A: refused, with a message
    assert "B must come after A" in page.inner_text("#loop-message")
    assert loop_text(page) == "A 0:05.3 · B not set"
    seek_to(page, 8.3)
    page.keyboard.press("]")
    expect(page.locator("#loop")).to_have_attribute("aria-pressed", "true")
    assert loop_text(page) == "A 0:05.3 · B 0:08.3"
    page.keyboard.press("l")
    expect(page.locator("#loop")).to_have_attribute("aria-pressed", "false")
    seek_to(page, 21)
    page.keyboard.press("[")
    assert loop_text(page) == "A 0:21.0 · B not set"
    expect(page.locator("#loop")).to_have_attribute("aria-pressed", "false")
    assert float(page.input_value("#seek")) == pytest.approx(21, abs=0.05), "[ must not jump anywhere"
    page.keyboard.press("]")
    assert "B must come after A (0:21.0)" in page.inner_text("#loop-message")
    # the second: [, an arrow key, ]
    seek_to(page, 5.9)
    page.keyboard.press("[")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("]")
    assert loop_text(page) == "A 0:05.9 · B 0:10.9"
    expect(page.locator("#loop")).to_have_attribute("aria-pressed", "true")
    # ] with no A is refused; Clear loop clears both
    page.click("#loop-clear")
    assert loop_text(page) == "no loop"
    expect(page.locator("#loop")).to_be_disabled()
    page.keyboard.press("]")
    assert page.inner_text("#loop-message") == "Set A first: B is the end of the loop"
    # set 6-12 with the buttons, then drag A on a waveform to about 3 s
    seek_to(page, 6)
    page.click("#loop-a")
    seek_to(page, 12)
    page.click("#loop-b")
    wave = page.locator(".stem[data-stem='drums'] canvas").bounding_box()
    y = wave["y"] + wave["height"] / 2
    page.mouse.move(wave["x"] + wave["width"] * 6 / SECONDS, y)
    page.mouse.down()
    page.mouse.move(wave["x"] + wave["width"] * 3 / SECONDS, y, steps=5)
    page.mouse.up()
    a = float(loop_text(page).split(" ")[1].replace("0:", ""))
    assert 2.5 < a < 3.5 and loop_text(page).endswith("B 0:12.0"), loop_text(page)
    shot(page, "desktop-loop")

    # ---- settings stay: tempo, key, volumes, mutes, solos, loop points
    page.fill("#tempo", "0.8")
    page.dispatch_event("#tempo", "input")
    page.fill("#key", "-2")
    page.dispatch_event("#key", "input")
    page.fill(".stem[data-stem='drums'] input[type='range']", "0.5")
    page.click(".stem[data-stem='bass'] button[data-role='mute']")
    page.click(".stem[data-stem='other'] button[data-role='solo']")
    page.wait_for_function("() => location.hash.includes('tempo=0.8') && location.hash.includes('solo=other')")
    link, loop_before = page.evaluate("location.href"), loop_text(page)

    def settings_are_back(tab) -> None:
        tab.wait_for_selector("#play:not([disabled])", timeout=60_000)
        assert tab.input_value("#tempo") == "0.8" and tab.input_value("#key") == "-2"
        assert tab.inner_text("#key-value") == "-2"
        assert tab.input_value(".stem[data-stem='drums'] input[type='range']") == "0.5"
        expect(tab.locator(".stem[data-stem='bass'] button[data-role='mute']")).to_have_attribute(
            "aria-pressed", "true")
        expect(tab.locator(".stem[data-stem='other'] button[data-role='solo']")).to_have_attribute(
            "aria-pressed", "true")
        expect(tab.locator("#loop")).to_have_attribute("aria-pressed", "true")
        assert loop_text(tab) == loop_before

    page.reload()
    settings_are_back(page)
    assert serious_accessibility_violations(page) == []

    # ---- the link alone carries them, on a phone that never saw this song
    phone = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    tab = phone.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda error: errors.append(str(error)))
    tab.on("console", lambda m: m.type == "error" and errors.append(m.text))
    tab.goto(link)
    settings_are_back(tab)
    tab.locator("#mixer .stem.original").scroll_into_view_if_needed()
    for control in ("#play", "#seek", "#loop", "#download-mix", "#position"):
        box = tab.locator(control).bounding_box()
        assert box and 0 <= box["y"] and box["y"] + box["height"] <= 844, f"{control} out of view at the mixer: {box}"
    assert tab.locator("#download-mix").bounding_box()["y"] > 844 / 2, "the download is within a thumb's reach"
    expect(tab.locator(".shortcuts")).to_be_hidden()
    tab.screenshot(path=str(SHOTS / "phone-player.png"))
    assert tab.evaluate("document.documentElement.scrollWidth") == 390
    assert serious_accessibility_violations(tab) == []
    phone.close()
    assert not errors, errors
