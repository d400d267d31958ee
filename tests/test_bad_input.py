"""Bad input gets its 4xx JSON error from the contract, loses nothing, and the server keeps serving."""

from __future__ import annotations

import os

import pytest

from src import config
from src.server import create_app
from tests.helpers import services_of, wait_ready


def upload_raw(client, data: bytes, content_type: str = "application/octet-stream", **kw):
    return client.post("/music", data=data, content_type=content_type, **kw)


@pytest.fixture
def good_song(client, make_song):
    answer = upload_raw(client, make_song(3.0, "mp3", title="Keeper").read_bytes())
    assert answer.status_code == 200
    return answer.get_json()


def assert_error(answer, status: int, *words: str) -> None:
    assert answer.status_code == status, answer.data[:300]
    message = answer.get_json()["error"]
    for word in words:
        assert word in message.lower(), message


@pytest.mark.parametrize("data, words", [
    (b"", ["empty"]),
    (os.urandom(64 * 1024), ["not", "audio"]),
    (b"ID3\x03\x00\x00\x00\x00\x00\x00" + os.urandom(4096), ["audio"]),
    (b"RIFF\x24\x00\x00\x00WAVEfmt ", ["audio"]),  # a truncated WAV header
    (b"%PDF-1.4\n" + b"x" * 2000, ["audio"]),
], ids=["empty", "random-bytes", "fake-mp3", "truncated-wav", "pdf-named-song"])
def test_unreadable_uploads_are_refused_with_400(client, good_song, data, words):
    assert_error(upload_raw(client, data, headers={"X-Filename": "song.mp3"}), 400, *words)
    assert [m["music_id"] for m in client.get("/music").get_json()] == [good_song["music_id"]]


def test_truncated_real_song_is_still_what_ffmpeg_can_read(client, make_song):
    """Half an MP3 is a shorter song, not an error: it decodes to what is there."""
    data = make_song(4.0, "mp3").read_bytes()
    answer = upload_raw(client, data[: len(data) // 2])
    assert answer.status_code == 200
    status = wait_ready(client, answer.get_json()["music_id"])
    assert status["state"] == "uploaded" and status["error"] is None
    assert 1.0 < status["duration"] < 3.0


def test_mislabelled_file_is_judged_by_its_content(client, make_song):
    wav_named_mp3 = make_song(2.0, "wav").read_bytes()
    answer = client.post("/music", data={"file": (__import__("io").BytesIO(wav_named_mp3), "really-a-wav.mp3")},
                         content_type="multipart/form-data")
    assert answer.status_code == 200
    assert answer.get_json()["name"] == "really-a-wav"


def test_path_traversal_names_are_names_not_paths(client, make_song, settings):
    data = make_song(2.0, "wav").read_bytes()
    for name in ["../../../../tmp/evil.wav", "..\\..\\windows\\evil.wav", "/etc/passwd"]:
        answer = upload_raw(client, data, headers={"X-Filename": name})
        assert answer.status_code == 200
        assert "/" not in answer.get_json()["name"] and "\\" not in answer.get_json()["name"]
    assert not os.path.exists("/tmp/evil.wav")
    stored = {p.name for p in settings.storage_dir.rglob("*")}
    assert not any("evil" in name or "passwd" in name for name in stored)


def test_any_body_that_is_not_multipart_is_the_raw_audio(client, make_song):
    """curl --data-binary sends a form content type; a JSON or text body is judged as audio too."""
    song = make_song(2.0, "wav").read_bytes()
    for content_type in ("application/x-www-form-urlencoded", "audio/wav", "text/plain", None):
        answer = upload_raw(client, song, content_type)
        assert answer.status_code == 200, (content_type, answer.data[:200])
    assert_error(upload_raw(client, b'{"song": 1}', "application/json"), 400, "audio")
    assert_error(upload_raw(client, b"hello", "text/plain"), 400, "audio")


def test_multipart_without_file_field_is_400(client):
    answer = client.post("/music", data={"song": "x"}, content_type="multipart/form-data")
    assert_error(answer, 400, "file")


def test_upload_over_the_limit_is_413(settings, make_song):
    app = create_app(settings.with_overrides(max_upload_mb=1))
    try:
        answer = app.test_client().post("/music", data=b"\0" * (2 * 1024 * 1024),
                                        content_type="application/octet-stream")
        assert_error(answer, 413, "1 mb", "max_upload_mb")
        assert app.test_client().get("/music").get_json() == []
    finally:
        services_of(app).close()


@pytest.mark.parametrize("body", [b"not json", b"{\"tracks\": [1]}", b"[1, \"two\"]", b"[true]", b""],
                         ids=["not-json", "object", "string-id", "bool-id", "empty"])
def test_malformed_selection_is_400(client, good_song, body):
    answer = client.post(f"/music/{good_song['music_id']}", data=body, content_type="application/json")
    assert_error(answer, 400, "json list")
    assert client.get(f"/music/{good_song['music_id']}").get_json()["state"] == "uploaded"


def test_foreign_or_unknown_track_ids_are_405_as_the_course_says(client, good_song, make_song):
    other = upload_raw(client, make_song(2.0, "wav").read_bytes()).get_json()
    foreign = other["tracks"][0]["track_id"]
    own = good_song["tracks"][0]["track_id"]
    assert_error(client.post(f"/music/{good_song['music_id']}", json=[own, foreign]), 405, str(foreign))
    assert_error(client.post(f"/music/{good_song['music_id']}", json=[99999]), 405, "99999")
    assert client.get(f"/music/{good_song['music_id']}").get_json()["state"] == "uploaded"
    assert client.get("/job").get_json() == []


def test_unknown_ids_are_404(client, good_song):
    assert_error(client.get("/music/424242"), 404, "424242")
    assert_error(client.post("/music/424242", json=[1]), 404, "424242")
    assert_error(client.get("/job/424242"), 404, "424242")
    assert_error(client.get("/music/not-a-number"), 404)
    track = good_song["tracks"][0]["track_id"]
    assert_error(client.get(f"/music/{good_song['music_id']}/tracks/{track + 1000}"), 404)


def test_downloads_before_done_say_so(client, good_song):
    assert_error(client.get(f"/music/{good_song['music_id']}/final"), 409, "uploaded")


def test_configuration_errors_name_the_setting(tmp_path):
    with pytest.raises(ValueError, match="BROKER_PORT"):
        config.load({"BROKER_PORT": "sixty", "CONFIG_FILE": str(tmp_path / "none.yaml")})
    bad = tmp_path / "config.yaml"
    bad.write_text("MODLE: htdemucs\n")
    with pytest.raises(ValueError, match="MODLE"):
        config.load({"CONFIG_FILE": str(bad)})
