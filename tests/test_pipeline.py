"""The whole pipeline over HTTP: upload → jobs over STOMP → two real workers → merge → mix."""

from __future__ import annotations

import numpy as np

from tests.helpers import decode_with_ffmpeg, wait_for, wav_array

SOURCES = ["drums", "bass", "other", "vocals"]


def wait_done(client, music_id: int, timeout: float = 180) -> dict:
    def done():
        status = client.get(f"/music/{music_id}").get_json()
        assert status["state"] != "failed", status["error"]
        return status if status["progress"] == 100 else None

    return wait_for(done, timeout, f"music {music_id} to reach 100%")


def test_uploaded_song_comes_back_whole_with_the_chosen_instruments(client, cluster, make_song):
    song = make_song(9.0, "mp3", title="Test Song", artist="The Testers")
    cluster.start_worker()
    cluster.start_worker()

    answer = client.post("/music", data=song.read_bytes(), content_type="application/octet-stream")
    assert answer.status_code == 200, answer.get_json()
    music = answer.get_json()
    assert (music["name"], music["band"]) == ("Test Song", "The Testers")
    assert [t["name"] for t in music["tracks"]] == SOURCES
    track_ids = {t["name"]: t["track_id"] for t in music["tracks"]}
    keep = [track_ids["drums"], track_ids["vocals"]]

    assert client.post(f"/music/{music['music_id']}", json=keep).get_json() == {}
    status = wait_done(client, music["music_id"])
    assert status["state"] == "done" and status["error"] is None
    assert status["final"] and all(i["track"] for i in status["instruments"])

    input_frames = decode_with_ffmpeg(song.read_bytes()).shape[0]
    stems = {}
    for instrument in status["instruments"]:
        wav = client.get(instrument["track"] + "?format=wav")
        assert wav.status_code == 200 and wav.mimetype == "audio/wav"
        stems[instrument["name"]], rate = wav_array(wav.data)
        assert rate == 44100 and stems[instrument["name"]].shape == (input_frames, 2)

    mix, _ = wav_array(client.get(status["final"] + "?format=wav").data)
    assert mix.shape == (input_frames, 2), "the final mix must be exactly as long as the input"
    expected = stems["drums"] + stems["vocals"]
    assert np.abs(mix - expected).max() <= 2 / 32767, "the mix is the sum of the chosen stems"
    assert np.abs(mix).max() > 1e-3, "the mix is not silence"
    everything = sum(stems.values())
    assert np.abs(mix - everything).max() > 1e-3, "unchosen instruments are left out"

    mp3 = client.get(status["final"])
    assert mp3.status_code == 200 and mp3.mimetype == "audio/mpeg"
    assert decode_with_ffmpeg(mp3.data).shape[0] == input_frames, "the MP3 decodes to the input's length"

    import torch

    expected_device = "cuda" if torch.cuda.is_available() else "cpu"  # DEVICE=auto
    assert {w["device"] for w in client.get("/workers").get_json()} == {expected_device}

    job_ids = client.get("/job").get_json()
    assert len(job_ids) == status["jobs_total"] >= 3
    for job_id in job_ids:
        job = client.get(f"/job/{job_id}").get_json()
        assert job["music_id"] == music["music_id"]
        assert job["size"] > 0 and job["time"] > 0
        assert sorted(job["track_id"]) == sorted(track_ids.values())


def test_choosing_other_instruments_after_processing_remixes_without_new_jobs(client, cluster, make_song):
    cluster.start_worker()
    music = client.post("/music", data=make_song(5.0, "wav").read_bytes(),
                        content_type="application/octet-stream").get_json()
    ids = {t["name"]: t["track_id"] for t in music["tracks"]}
    client.post(f"/music/{music['music_id']}", json=[ids["bass"]])
    status = wait_done(client, music["music_id"])
    jobs_before = client.get("/job").get_json()

    assert client.post(f"/music/{music['music_id']}", json=[ids["bass"], ids["other"]]).status_code == 200
    status = client.get(f"/music/{music['music_id']}").get_json()
    assert status["state"] == "done" and status["mix_selection"] == [ids["bass"], ids["other"]]
    assert client.get("/job").get_json() == jobs_before
    stems = {i["name"]: wav_array(client.get(i["track"] + "?format=wav").data)[0] for i in status["instruments"]}
    mix, _ = wav_array(client.get(status["final"] + "?format=wav").data)
    assert np.abs(mix - (stems["bass"] + stems["other"])).max() <= 2 / 32767
