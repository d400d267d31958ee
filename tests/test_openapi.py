"""The OpenAPI document (src/server/openapi.yaml): valid, served, complete, and rendered offline at /docs.

The check of every answer the suite gets against the document lives in tests/openapi_check.py; the last
test here shows that check catches what it should, so a silent pass there means something.
"""

from __future__ import annotations

import re
import shutil
import threading
from html.parser import HTMLParser
from urllib.parse import urlsplit

import pytest
from openapi_spec_validator import validate
from werkzeug.serving import make_server

from src.server.api.docs import load_document
from tests.conftest import ARTIFACTS
from tests.openapi_check import NOT_API, UNCHECKED_METHODS, ResponseChecker

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# The policy /docs is tested under while the app sends none of its own: everything from this server (Swagger
# UI's CSS has data: images), no inline script or style, no eval.
CSP = "default-src 'self'; img-src 'self' data:"


def operations(document: dict) -> set[str]:
    methods = {"get", "put", "post", "delete", "patch"}
    return {f"{method.upper()} {path}" for path, item in document["paths"].items() for method in item
            if method in methods}


@pytest.mark.unit
def test_the_document_is_valid_openapi_3():
    document = load_document()
    validate(document)  # raises with the offending part of the document
    assert document["openapi"].startswith("3.")
    assert document["components"]["schemas"], "reusable schemas live in components"


@pytest.mark.parametrize("path", ["/openapi.json", "/openapi.json/"])
def test_openapi_json_answers_the_document(client, path):
    answer = client.get(path)
    assert answer.status_code == 200
    assert answer.mimetype == "application/json"
    assert answer.get_json() == load_document()


def test_every_route_is_documented_and_every_documented_operation_is_served(app):
    routed = set()
    for rule in app.url_map.iter_rules():
        if NOT_API.match(rule.rule):
            continue
        path = re.sub(r"<(?:[^<>:]+:)?([^<>]+)>", r"{\1}", rule.rule)  # /music/<int:music_id> -> /music/{music_id}
        routed |= {f"{method} {path.rstrip('/') or '/'}" for method in rule.methods - UNCHECKED_METHODS}
    documented = operations(load_document())
    assert routed - documented == set(), "routes missing from src/server/openapi.yaml"
    assert documented - routed == set(), "documented operations the server does not serve"


class _Tags(HTMLParser):
    """Every start tag of a page, with its attributes, and whether a <script> had inline text."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.inline_script = ""
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.inline_script += data.strip()


@pytest.mark.parametrize("path", ["/docs", "/docs/"])
def test_docs_page_loads_only_same_origin_scripts(client, path):
    answer = client.get(path)
    assert answer.status_code == 200 and answer.mimetype == "text/html"
    page = _Tags()
    page.feed(answer.get_data(as_text=True))
    assert page.inline_script == "", "no inline script: the CSP allows only script-src 'self'"
    handlers = [(tag, name) for tag, attrs in page.tags for name in attrs if name.startswith("on")]
    assert handlers == [], "no inline event handlers"
    scripts = [attrs.get("src") for tag, attrs in page.tags if tag == "script"]
    assert len(scripts) == 2 and all(scripts)
    resources = scripts + [attrs["href"] for tag, attrs in page.tags if tag == "link"]
    for url in resources:
        parts = urlsplit(url)
        assert not parts.scheme and not parts.netloc and url.startswith("/"), f"{url} is not from this server"
        loaded = client.get(url)
        assert loaded.status_code == 200, url
    assert {client.get(url).mimetype for url in scripts} <= {"text/javascript", "application/javascript"}
    assert client.get("/docs/vendor/index.html").status_code == 404, "only the files the page needs"


@pytest.fixture
def live_server(app, settings):
    server = make_server(settings.server_host, settings.server_port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://{settings.server_host}:{settings.server_port}"
    server.shutdown()


@pytest.mark.browser
def test_swagger_ui_renders_every_operation_offline_in_chromium(live_server):
    sync_api = pytest.importorskip("playwright.sync_api")
    origin = live_server
    foreign: list[str] = []
    problems: list[str] = []

    def route(request_route):
        url = request_route.request.url
        if not url.startswith(origin + "/"):
            foreign.append(url)
            request_route.abort()
        elif urlsplit(url).path.rstrip("/") == "/docs":
            # The app's own policy once it sends one; until then the policy the page is written for.
            response = request_route.fetch()
            headers = {**response.headers}
            headers.setdefault("content-security-policy", CSP)
            request_route.fulfill(response=response, headers=headers)
        else:
            request_route.continue_()

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM,
                                             args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 1000})
            context.route("**/*", route)
            tab = context.new_page()
            tab.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            tab.on("console", lambda message: message.type == "error" and problems.append(message.text))
            tab.goto(origin + "/docs")
            upload = tab.locator("#operations-music-uploadMusic")
            upload.wait_for(state="visible", timeout=30_000)
            summary = upload.locator(".opblock-summary").first
            assert summary.locator(".opblock-summary-method").inner_text() == "POST"
            assert summary.locator(".opblock-summary-path").inner_text().replace("\u200b", "") == "/music"
            assert tab.locator(".opblock").count() == len(operations(load_document()))
            summary.click()  # expands: the request body and the documented answers render from the schemas
            tab.locator("#operations-music-uploadMusic .responses-table").first.wait_for(state="visible")
            assert "422" in upload.inner_text()
            (ARTIFACTS / "browser").mkdir(parents=True, exist_ok=True)
            tab.screenshot(path=str(ARTIFACTS / "browser" / "docs.png"), full_page=True)
        finally:
            browser.close()
    assert foreign == [], "requests that left the host"
    assert problems == [], "errors in the page (a CSP violation shows here)"


@pytest.mark.unit
def test_the_response_check_catches_answers_that_differ_from_the_document():
    checker = ResponseChecker(load_document())  # its own, so these deliberate mismatches fail nothing else
    host = "http://127.0.0.1:5000"

    def whats(method, path, status, mimetype="application/json", body=b"{}"):
        return sorted(m.what for m in checker.check(method, host, path, status, mimetype, body))

    job = (b'{"job_id": 1, "size": 10, "time": 1.5, "music_id": 1, "task_id": 1, "kind": "separate",'
           b' "track_id": [1, 2], "chunk": 0, "state": "done", "worker": "w", "attempts": 1, "seconds": 7.5,'
           b' "queued_at": 1.0, "done_at": 2.0}')
    assert whats("GET", "/job/1", 200, body=job) == []
    assert whats("GET", "/job/1/", 200, body=job) == [], "a trailing slash is the same path"
    assert whats("GET", "/job/1", 200, body=job.replace(b'"size": 10', b'"size": "10"')) == ["size: type"]
    assert whats("GET", "/job/1", 200, body=job.replace(b'"time": 1.5, ', b"")) == ["time: required"]
    assert whats("POST", "/reset", 200, body=b'{"deleted": 3}') == ["(body): maxProperties"]
    assert whats("GET", "/job/1", 418, body=b'{"error": "x"}') == ["status 418"]
    assert whats("GET", "/job/1", 404, body=b'{"message": "x"}') == ["error: required"]
    assert whats("GET", "/job/1", 404, "text/html", b"<p>") == ["content type text/html"]
    assert whats("GET", "/music/1/final", 200, "audio/mpeg", None) == []
    assert whats("GET", "/music/1/final", 200, "audio/ogg", None) == ["content type audio/ogg"]
    assert whats("GET", "/events", 200, "text/event-stream", None) == []
    assert whats("GET", "/nothing", 404, body=b'{"error": "not built yet"}') == [], "unknown routes may 404 as JSON"
    assert whats("GET", "/nothing", 200, body=b"[]") == ["undocumented operation"]
    assert whats("DELETE", "/job/1", 405, body=b'{"error": "no"}') == []
    assert whats("OPTIONS", "/music", 200, "text/html", b"") == [], "CORS preflight is not in the document"
    assert whats("GET", "/", 200, "text/html", b"") == [], "the page is not API"
