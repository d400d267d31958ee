"""What the musician's page downloads and plays, on a real processed song (real broker, workers, ffmpeg).

- `/mix`: any stems at any volumes is the weighted sum of those stems, named and tagged
  by its instruments, and leaves the song's saved selection, mix and times alone.
- tempo and key: rubberband's output measured (duration, and pitch by FFT peak).
- MP3, WAV and FLAC are tagged with title, artist and the stems they hold; FLAC is the
  WAV's samples exactly.
- `/stream/{stem}`: what the page's player streams, a WAV made on the fly with Range.
- `DELETE /music/{id}` removes one song and nothing else.
"""

from __future__ import annotations

import json
import subprocess
import tempfile

import numpy as np

from tests.helpers import decode_with_ffmpeg, wav_array
from tests.test_pipeline import wait_done


def tags_of(data: bytes) -> dict[str, str]:
    """The container's tags as ffprobe reads them, keys lower-cased."""
    with tempfile.NamedTemporaryFile() as f:
        f.write(data)
        f.flush()
        out = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format_tags", "-of", "json", f.name],
                             capture_output=True, text=True, check=True, timeout=60).stdout
    return {k.lower(): v for k, v in json.loads(out)["format"].get("tags", {}).items()}


def peak_hz(samples: np.ndarray, rate: int) -> float:
    """The strongest frequency of the first channel (Hann window, FFT)."""
    mono = samples[:, 0] * np.hanning(len(samples))
    spectrum = np.abs(np.fft.rfft(mono))
    spectrum[: int(50 * len(mono) / rate)] = 0  # below 50 Hz: no tone of ours
    return float(np.argmax(spectrum) * rate / len(mono))


def processed_song(client, cluster, make_song, seconds: float = 6.0) -> tuple[dict, dict[str, int]]:
    cluster.start_worker()
    cluster.start_worker()
    music = client.post("/music", data=make_song(seconds, "mp3", title="Practice Song", artist="The Band").read_bytes(),
                        content_type="application/octet-stream").get_json()
    ids = {t["name"]: t["track_id"] for t in music["tracks"]}
    keep = [ids["drums"], ids["bass"], ids["other"]]  # karaoke: no vocals
    assert client.post(f"/music/{music['music_id']}", json=keep).get_json() == {}
    return wait_done(client, music["music_id"]), ids


def test_listening_mix_is_the_weighted_sum_and_changes_nothing_saved(client, cluster, make_song):
    status, ids = processed_song(client, cluster, make_song)
    song = f"/music/{status['music_id']}"
    stems = {i["name"]: wav_array(client.get(i["track"] + "?format=wav").data)[0] for i in status["instruments"]}

    answer = client.get(f"{song}/mix?tracks={ids['drums']},{ids['bass']}&gain=0.5,1&format=wav&download=1")
    assert answer.status_code == 200, answer.get_json()
    assert "drums+bass (drums 50%).wav" in answer.headers["Content-Disposition"]
    mix, _ = wav_array(answer.data)
    assert np.abs(mix - (0.5 * stems["drums"] + stems["bass"])).max() <= 2 / 32767
    assert tags_of(answer.data)["comment"] == "stems: drums+bass"

    after = client.get(song).get_json()
    for key in ("selection", "mix_selection", "started_at", "finished_at"):
        assert after[key] == status[key], f"a listening mix changed the song's {key}"
    saved, _ = wav_array(client.get(f"{song}/final?format=wav").data)
    assert np.abs(saved - (stems["drums"] + stems["bass"] + stems["other"])).max() <= 3 / 32767

    # the player's stream is the WAV download's samples, made on the fly, and any byte range of it
    whole = client.get(f"{song}/stream/drums")
    assert whole.status_code == 200 and whole.headers["Accept-Ranges"] == "bytes"
    assert np.array_equal(wav_array(whole.data)[0], stems["drums"])
    part = client.get(f"{song}/stream/drums", headers={"Range": "bytes=1001-200000"})
    assert part.status_code == 206 and part.data == whole.data[1001:200001]
    assert part.headers["Content-Range"] == f"bytes 1001-200000/{len(whole.data)}"
    assert client.get(f"{song}/stream/kazoo").status_code == 404

    # what a client sends is checked: a foreign track is the course's 405, a bad number 400
    assert client.get(f"{song}/mix?tracks=999999").status_code == 405
    assert client.get(f"{song}/mix?tracks={ids['bass']}&tempo=3").status_code == 400
    assert client.get(f"{song}/mix?tracks={ids['bass']}&gain=1,1").status_code == 400
    assert client.get(f"{song}/mix").status_code == 400


def test_tempo_and_key_are_measured_in_the_rendered_audio(client, cluster, make_song):
    status, ids = processed_song(client, cluster, make_song)
    song = f"/music/{status['music_id']}"
    original, rate = wav_array(client.get(f"{song}/original?format=wav").data)
    assert abs(peak_hz(original, rate) - 220) < 3  # the generated song's lower tone

    up, _ = wav_array(client.get(f"{song}/original?format=wav&semitones=12").data)
    assert abs(peak_hz(up, rate) - 440) < 6, "an octave up doubles the pitch"
    assert abs(len(up) - len(original)) < 0.02 * len(original), "a key shift keeps the tempo"

    down, _ = wav_array(client.get(f"{song}/original?format=wav&semitones=-5").data)
    assert abs(peak_hz(down, rate) - 220 * 2 ** (-5 / 12)) < 4

    every = ",".join(str(i) for i in ids.values())
    slow = decode_with_ffmpeg(client.get(f"{song}/mix?tracks={every}&tempo=0.5&format=flac").data)
    whole = decode_with_ffmpeg(client.get(f"{song}/mix?tracks={every}&format=flac").data)
    assert abs(len(slow) / len(whole) - 2) < 0.03, "half tempo lasts twice as long"
    assert abs(peak_hz(slow, rate) - peak_hz(whole, rate)) < 3, "and keeps its pitch"


def test_every_format_is_tagged_and_flac_is_lossless(client, cluster, make_song):
    status, ids = processed_song(client, cluster, make_song, seconds=4.0)
    song = f"/music/{status['music_id']}"
    wav = client.get(f"{song}/final?format=wav").data
    for fmt in ("mp3", "wav", "flac"):
        answer = client.get(f"{song}/final?format={fmt}&download=1")
        assert answer.status_code == 200 and answer.mimetype == f"audio/{'mpeg' if fmt == 'mp3' else fmt}"
        tags = tags_of(answer.data)
        assert (tags["title"], tags["artist"]) == ("Practice Song", "The Band")
        assert tags["comment"] == "stems: drums+bass+other"
        stem = client.get(f"{song}/tracks/{ids['vocals']}?format={fmt}")
        assert tags_of(stem.data)["comment"] == "stems: vocals"
    flac = decode_with_ffmpeg(client.get(f"{song}/final?format=flac").data)
    assert np.array_equal(np.round(flac * 32768), np.round(wav_array(wav)[0] * 32767)), "FLAC holds the WAV's samples"


def test_one_song_is_deleted_and_the_others_stay(client, make_song):
    first = client.post("/music", data=make_song(2.0, "wav").read_bytes(),
                        content_type="application/octet-stream").get_json()
    second = client.post("/music", data=make_song(2.0, "wav").read_bytes(),
                         content_type="application/octet-stream").get_json()
    assert client.delete(f"/music/{first['music_id']}").status_code == 200
    assert client.get(f"/music/{first['music_id']}").status_code == 404
    assert [m["music_id"] for m in client.get("/music").get_json()] == [second["music_id"]]
    assert client.delete(f"/music/{first['music_id']}").status_code == 404
