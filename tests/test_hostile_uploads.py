"""The hostile-upload corpus from the HTTP audit: each is refused (or defused) with a clear 4xx,
leaves no file behind, and the service keeps answering.

Bombs are made by hand (headers that lie) and by ffmpeg; playlists name real files on
this machine; chunked and aborted uploads go through the production server on a real
socket, because only a real server sees a body that never ends.
"""

from __future__ import annotations

import http.client
import json
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from src.media import pcm
from src.media.probe import RefusedMedia
from src.server import create_app, wsgi
from tests.helpers import services_of, wait_for, wait_ready

ONE_MB = 1024 * 1024


def leftovers(settings) -> list[Path]:
    return [p for p in (settings.storage_dir / "incoming").iterdir()]


def assert_refused(answer, status: int, *words: str) -> str:
    assert answer.status_code == status, answer.data[:300]
    message = answer.get_json()["error"]
    for word in words:
        assert word in message.lower(), message
    return message


def assert_nothing_kept(client, settings, songs_before: int = 0) -> None:
    assert leftovers(settings) == []
    assert len(client.get("/music").get_json()) == songs_before
    assert client.get("/health").status_code in (200, 503)


def wav_header(samplerate: int, channels: int, declared_frames: int) -> bytes:
    """A 16-bit PCM WAV header that declares `declared_frames` frames, whatever follows it."""
    data_bytes = declared_frames * channels * 2
    fmt = struct.pack("<HHIIHH", 1, channels, samplerate, samplerate * channels * 2, channels * 2, 16)
    return (b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt
            + b"data" + struct.pack("<I", data_bytes))


def test_a_one_hertz_wav_declaring_half_an_hour_is_refused_before_decoding(client, settings):
    bomb = wav_header(samplerate=1, channels=2, declared_frames=1800) + bytes(3600)
    assert len(bomb) < 4 * 1024
    message = assert_refused(client.post("/music", data=bomb, content_type="application/octet-stream"), 422,
                             "sample rate")
    assert "1 hz" in message.lower()
    assert_nothing_kept(client, settings)


def test_a_silent_flac_longer_than_max_duration_is_refused_before_decoding(settings, tmp_path):
    flac = tmp_path / "silence.flac"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i", "anullsrc=r=44100:cl=stereo",
                    "-t", "120", "-c:a", "flac", str(flac)], check=True)
    assert flac.stat().st_size < 200 * 1024  # two minutes of silence compress to almost nothing
    app = create_app(settings.with_overrides(max_duration_s=60))
    try:
        client = app.test_client()
        assert_refused(client.post("/music", data=flac.read_bytes(), content_type="audio/flac"), 422,
                       "120 s", "max_duration_s")
        assert_nothing_kept(client, settings)
        assert not any((settings.storage_dir / "media").iterdir())
    finally:
        services_of(app).close()


@pytest.mark.unit
def test_decoding_stops_at_max_duration_whatever_the_header_said(make_song, tmp_path):
    """The byte and time cap of the decoder itself: a header that under-states the length gains nothing."""
    song = make_song(4.0, "wav")
    target = tmp_path / "decoded.f32"
    with pytest.raises(RefusedMedia, match="MAX_DURATION_S"):
        pcm.decode(song, target, 44100, 2, max_duration_s=1.0)
    assert target.stat().st_size <= (2 * 44100 + 44100) * 2 * 4  # capped just past the limit, not 4 s


def test_too_many_channels_are_refused(client, settings, tmp_path):
    many = tmp_path / "many.wav"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi",
                    "-i", "aevalsrc=" + "|".join(["0"] * 12) + ":d=1",
                    str(many)], check=True)
    assert_refused(client.post("/music", data=many.read_bytes(), content_type="audio/wav"), 422,
                   "12 channels", "max_channels")
    assert_nothing_kept(client, settings)


@pytest.mark.parametrize("kind", ["hls-absolute", "hls-relative", "concat"])
def test_playlists_naming_files_on_the_server_are_not_read(client, settings, make_song, kind):
    secret = make_song(2.0, "mp3")  # a readable media file on this machine
    kept = client.post("/music", data=make_song(2.0, "mp3").read_bytes(), content_type="audio/mpeg").get_json()
    wait_ready(client, kept["music_id"])
    stored = f"../songs/{kept['music_id']}/original"  # where the server keeps that upload, relative to incoming/
    playlist = {
        "hls-absolute": f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\n{secret}\n#EXT-X-ENDLIST\n",
        "hls-relative": f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\n{stored}\n#EXT-X-ENDLIST\n",
        "concat": f"ffconcat version 1.0\nfile '{secret}'\n",
    }[kind]
    message = assert_refused(client.post("/music", data=playlist.encode(), content_type="application/octet-stream",
                                         headers={"X-Filename": "song.m3u8"}), 400, "not a readable audio file")
    assert str(settings.storage_dir) not in message and str(secret) not in message
    assert_nothing_kept(client, settings, songs_before=1)


def id3_tag(**frames: str) -> bytes:
    """An ID3v2.3 tag written by hand: Latin-1 text frames (TIT2 title, TPE1 artist)."""
    body = b""
    for frame_id, text in frames.items():
        payload = b"\x00" + text.encode("latin-1")
        body += frame_id.encode() + struct.pack(">I", len(payload)) + b"\x00\x00" + payload
    size = len(body)
    syncsafe = bytes([(size >> 21) & 0x7F, (size >> 14) & 0x7F, (size >> 7) & 0x7F, size & 0x7F])
    return b"ID3\x03\x00\x00" + syncsafe + body


def test_control_characters_and_huge_tags_are_cleaned_and_downloads_still_work(client, cluster, settings, tmp_path):
    plain = tmp_path / "plain.mp3"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i", "sine=f=330:d=3", "-ac", "2",
                    "-id3v2_version", "0", "-write_xing", "0", str(plain)], check=True)
    title = "Evil\r\nSet-Cookie: stolen=1\x00\x07"
    song = id3_tag(TIT2=title, TPE1="A" * (5 * ONE_MB)) + plain.read_bytes()

    answer = client.post("/music", data=song, content_type="audio/mpeg")
    assert answer.status_code == 200, answer.data[:300]
    music = answer.get_json()
    assert music["name"] == "Evil Set-Cookie: stolen=1"
    assert len(music["band"]) <= 200
    assert len(client.get("/music").data) < 10_000, "a 5 MB tag must not be re-sent in every listing"

    cluster.start_worker()
    client.post(f"/music/{music['music_id']}", json=[t["track_id"] for t in music["tracks"]])
    wait_for(lambda: client.get(f"/music/{music['music_id']}").get_json()["state"] == "done", 120, "the song")
    download = client.get(f"/music/{music['music_id']}/final?format=wav&download=1")
    assert download.status_code == 200
    disposition = download.headers["Content-Disposition"]
    assert "\r" not in disposition and "\n" not in disposition and "Evil Set-Cookie" in disposition


@pytest.mark.parametrize("path", ["/music/99999999999999999999999", "/job/99999999999999999999999",
                                  "/music/1/tracks/99999999999999999999999", "/music/-1", "/music/1e9"])
def test_ids_outside_the_integer_range_are_404(client, path):
    assert_refused(client.get(path), 404)


def test_selection_bodies_are_bounded(client, make_song):
    music = client.post("/music", data=make_song(2.0, "wav").read_bytes(), content_type="audio/wav").get_json()
    url, track = f"/music/{music['music_id']}", music["tracks"][0]["track_id"]
    deep = "[" * 30_000 + "]" * 30_000  # within the size bound, far beyond any parser's recursion
    assert_refused(client.post(url, data=deep, content_type="application/json"), 400, "json list")
    huge = json.dumps([track] * (4 * ONE_MB))
    assert_refused(client.post(url, data=huge, content_type="application/json"), 413, "kb")
    assert_refused(client.post(url, json=[track, track]), 400, "once")
    assert_refused(client.post(url, data=f"[{track}]", content_type="text/plain"), 415, "application/json")
    assert client.get(url).get_json()["state"] == "uploaded"
    assert client.get(url).get_json()["selection"] is None


def test_unfinished_uploads_are_swept_at_start(settings):
    incoming = settings.storage_dir / "incoming"
    incoming.mkdir(parents=True)
    (incoming / "0123abcd.upload").write_bytes(b"\0" * ONE_MB)  # what a killed server left
    app = create_app(settings)
    services_of(app).start()
    try:
        assert leftovers(settings) == []
    finally:
        services_of(app).close()


# -- over a real socket: the production server --------------------------------------------------


@pytest.fixture
def small_limit(settings):
    return settings.with_overrides(max_upload_mb=1)


@pytest.fixture
def limited_server(small_limit):
    app = create_app(small_limit)
    server = wsgi.create_server(app, small_limit)
    threading.Thread(target=server.run, daemon=True).start()
    yield small_limit
    server.close()
    services_of(app).close()


def test_a_chunked_upload_over_the_limit_is_413_and_leaves_nothing(limited_server):
    settings = limited_server
    conn = http.client.HTTPConnection(settings.server_host, settings.server_port, timeout=60)
    chunks = (b"\0" * (256 * 1024) for _ in range(10))  # 2.5 MB with no Content-Length
    conn.request("POST", "/music", body=chunks, headers={"Content-Type": "application/octet-stream"},
                 encode_chunked=True)
    answer = conn.getresponse()
    body = answer.read()
    assert answer.status == 413, body[:300]
    assert "max_upload_mb" in json.loads(body)["error"].lower()
    assert leftovers(settings) == []


def test_an_aborted_upload_leaves_nothing_and_the_server_answers(limited_server):
    settings = limited_server
    with socket.create_connection((settings.server_host, settings.server_port), timeout=10) as sock:
        sock.sendall(b"POST /music HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/octet-stream\r\n"
                     b"Content-Length: 900000\r\n\r\n" + b"\0" * 200_000)
        time.sleep(0.5)  # the server has part of the body; the client goes away
    conn = http.client.HTTPConnection(settings.server_host, settings.server_port, timeout=30)
    conn.request("GET", "/music")
    assert conn.getresponse().status == 200
    assert leftovers(settings) == []
