"""Cross-origin pages in a real browser: a stranger's page changes nothing, a local one works.

The audit's three attacks, from a page on another origin (127.0.0.2, which the default
CORS_ORIGINS does not allow), each a request a browser sends without asking: a no-cors
`text/plain` POST that would start a song, a multipart POST that would create one, and
an auto-submitted form that would POST /reset. Then a page on another local port (an
allowed origin) uses the API as a client page written for the course would.
"""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.harness import free_port
from tests.helpers import wait_for

ATTACKER = """<!doctype html><meta charset="utf-8"><title>cat pictures</title>
<iframe name="sink"></iframe>
<form id="wipe" action="{api}/reset" method="POST" target="sink"><input type="hidden" name="x" value="1"></form>
<script>
(async () => {{
  const results = {{}};
  try {{
    await fetch("{api}/music/{music_id}", {{method: "POST", mode: "no-cors",
      headers: {{"Content-Type": "text/plain"}}, body: "{tracks}"}});
    results.process = "sent";
  }} catch (error) {{ results.process = String(error); }}
  try {{
    const audio = await (await fetch("/song.wav")).blob();
    const form = new FormData();
    form.append("file", audio, "evil.wav");
    await fetch("{api}/music", {{method: "POST", mode: "no-cors", body: form}});
    results.upload = "sent";
  }} catch (error) {{ results.upload = String(error); }}
  document.getElementById("wipe").submit();
  results.reset = "sent";
  document.title = "attacked " + JSON.stringify(results);
}})();
</script>"""

FRIEND = """<!doctype html><meta charset="utf-8"><title>friend</title>
<script>
(async () => {{
  try {{
    const audio = await (await fetch("/song.wav")).blob();
    const uploaded = await fetch("{api}/music", {{method: "POST", body: audio,
      headers: {{"Content-Type": "application/octet-stream", "X-Filename": "friendly.wav"}}}});
    const music = await uploaded.json();
    const listed = await (await fetch("{api}/music")).json();
    document.title = "friend: " + JSON.stringify({{status: uploaded.status, name: music.name, songs: listed.length}});
  }} catch (error) {{ document.title = "friend: failed " + error; }}
}})();
</script>"""


@pytest.fixture
def other_site(tmp_path: Path, make_song) -> Iterator[callable]:
    """other_site(host, html) -> URL of a page served by a plain HTTP server on another origin."""
    servers = []

    def serve(host: str, html: str) -> str:
        folder = tmp_path / f"site-{len(servers)}"
        folder.mkdir()
        (folder / "index.html").write_text(html)
        (folder / "song.wav").write_bytes(make_song(1.0, "wav").read_bytes())
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
        server = http.server.ThreadingHTTPServer((host, free_port()), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://{host}:{server.server_address[1]}/index.html"

    yield serve
    for server in servers:
        server.shutdown()


def test_a_strangers_page_cannot_change_anything(live_server, browser, client, make_song, other_site):
    music = client.post("/music", data=make_song(2.0, "wav").read_bytes(), content_type="audio/wav").get_json()
    tracks = [t["track_id"] for t in music["tracks"]]
    html = ATTACKER.format(api=live_server, music_id=music["music_id"], tracks=tracks)
    page = browser.new_page()  # not `page`: the stranger's page may break whatever rules it likes
    page.goto(other_site("127.0.0.2", html))
    wait_for(lambda: page.title().startswith("attacked"), 30, "the attacks to be sent")
    assert '"process":"sent"' in page.title() and '"upload":"sent"' in page.title()
    page.wait_for_timeout(1000)  # the form's POST is a navigation of the frame: let it land

    songs = client.get("/music").get_json()
    assert [s["music_id"] for s in songs] == [music["music_id"]], "no song was created, none deleted"
    status = client.get(f"/music/{music['music_id']}").get_json()
    assert status["state"] == "uploaded" and status["selection"] is None, "processing was not started"


def test_a_page_on_another_local_port_uses_the_api(live_server, page, client, other_site):
    page.goto(other_site("localhost", FRIEND.format(api=live_server)))
    wait_for(lambda: page.title().startswith("friend:"), 30, "the friendly page to finish")
    assert page.title() == 'friend: {"status":200,"name":"friendly","songs":1}'
    assert [s["name"] for s in client.get("/music").get_json()] == ["friendly"]
