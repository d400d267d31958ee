"""Pytest plugin: every answer the suite's real runs get from the server is checked against the OpenAPI document.

The document (src/server/openapi.yaml, served at /openapi.json) is only worth something if the server keeps
to it, so the suite checks every answer it receives through the two doors its tests use: the Flask test
client (of every app, through `Flask.test_client_class`) and the urllib `request()` of tests/helpers.py
(real server processes). Each answer is matched, by openapi-core, to its documented path and method; its
status code must be documented, its media type must be one the document lists for that status, and a JSON
body must match that status's schema. Only the status and the media type of other answers are checked: their
bodies are audio, pages or an endless event stream. A trailing slash is ignored (every path answers with and
without one); HEAD and OPTIONS (CORS preflight) are not part of the document; the web page's own files are
not API. An undocumented route may only answer a JSON `{"error": ...}` 404 or 405.

A mismatch fails the test phase (set-up, call or tear-down) that received it, naming the request and what
is wrong; the end-of-session summary counts the answers checked.

The document and its validators are built once per session; a check costs about a millisecond.
"""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from typing import Any
from urllib.parse import urlsplit

import pytest
from flask import Flask
from flask.testing import FlaskClient
from openapi_core import Config, OpenAPI
from openapi_core.templating.media_types.exceptions import MediaTypeNotFound
from openapi_core.templating.paths.exceptions import PathError
from openapi_core.templating.paths.finders import APICallPathFinder
from openapi_core.templating.responses.exceptions import ResponseNotFound
from openapi_core.testing import MockRequest, MockResponse
from openapi_schema_validator import OAS30Validator
from werkzeug.test import TestResponse

from src.server.api.docs import load_document
from tests import helpers

# (operation, what) -> why today's server differs from the document. `what` is "status N", "content type X",
# or "<JSON path>: <schema keyword>" with list indices as `*` (a missing property is "<path>/<name>: required").
# Each is a change the server still has to make (issue #10); delete the entry when it lands.
# The web pages, the favicon and the static files of /docs: not API, so not in the document.
NOT_API = re.compile(r"^/($|dashboard/?$|favicon\.ico$|web/|docs/static/|docs/vendor/)")
UNCHECKED_METHODS = {"HEAD", "OPTIONS"}


def _is_json(mimetype: str) -> bool:
    return mimetype == "application/json" or mimetype.endswith("+json")


def _text(data: bytes, **_: str) -> str:
    return data.decode("utf-8", "replace")


@dataclass(frozen=True)
class Mismatch:
    request: str  # "GET /music/3 -> 200"
    operation: str  # "GET /music/{music_id}": the documented operation it matched
    what: str
    detail: str

    def __str__(self) -> str:
        return f"{self.request}: {self.what} ({self.detail})"


class ResponseChecker:
    """Checks answers against the document; thread-safe, since servers and pollers answer from threads."""

    def __init__(self, document: dict):
        # The document has no deserializer for event streams by default; the check only needs it as text.
        self.api = OpenAPI.from_dict(document, config=Config(extra_media_type_deserializers={
            "text/event-stream": _text}))
        self.finder = APICallPathFinder(self.api.spec)
        self.error_schema = OAS30Validator(document["components"]["schemas"]["Error"])
        self.checked = 0
        self.unexpected: list[Mismatch] = []
        self._lock = threading.Lock()

    def check(self, method: str, host_url: str, path: str, status: int, mimetype: str,
              body: bytes | None) -> list[Mismatch]:
        """Checks one answer, records what does not match, and returns it. `body` is only read for JSON."""
        method = method.upper()
        if method in UNCHECKED_METHODS or NOT_API.match(path):
            return []
        path = path.rstrip("/") or "/"
        label = f"{method} {path} -> {status}"
        found = self._mismatches(method, host_url, path, status, mimetype, body, label)
        with self._lock:
            self.checked += 1
            self.unexpected.extend(found)
        return found

    def _mismatches(self, method: str, host_url: str, path: str, status: int, mimetype: str,
                    body: bytes | None, label: str) -> list[Mismatch]:
        url = host_url.rstrip("/") + path
        try:
            operation = f"{method} {self.finder.find(method.lower(), url).path_result.pattern}"
        except PathError:
            return self._undocumented(method, path, status, mimetype, body, label)
        request = MockRequest(host_url, method.lower(), path)
        # Non-JSON bodies (audio, pages, an endless SSE stream) are not read: a placeholder stands in.
        data = body if _is_json(mimetype) else b"-"
        response = MockResponse(data or b"", status, content_type=mimetype)
        found: dict[str, Mismatch] = {}
        for error in self.api.iter_response_errors(request, response):
            for what, detail in self._describe(error, status, mimetype):
                found.setdefault(what, Mismatch(label, operation, what, detail))
        return list(found.values())

    def _undocumented(self, method: str, path: str, status: int, mimetype: str, body: bytes | None,
                      label: str) -> list[Mismatch]:
        operation = f"{method} {path}"
        if status not in (404, 405):
            return [Mismatch(label, operation, "undocumented operation", "not in src/server/openapi.yaml")]
        try:
            payload = json.loads(body or b"") if _is_json(mimetype) else None
        except ValueError:
            payload = None
        if payload is None:
            return [Mismatch(label, operation, f"content type {mimetype}", "errors are JSON {\"error\": str}")]
        return [Mismatch(label, operation, self._where(e), e.message)
                for e in self.error_schema.iter_errors(payload)]

    def _describe(self, error: Exception, status: int, mimetype: str) -> Iterator[tuple[str, str]]:
        cause = error.__cause__ or error
        if isinstance(error, ResponseNotFound):
            yield f"status {status}", "not documented for this operation"
        elif isinstance(cause, MediaTypeNotFound):
            yield f"content type {mimetype}", str(cause)
        elif getattr(cause, "schema_errors", None):
            for schema_error in cause.schema_errors:
                yield self._where(schema_error), schema_error.message
        else:
            yield type(cause).__name__, str(cause)

    @staticmethod
    def _where(error: Any) -> str:
        """'instruments/*/track: type' for a jsonschema error; a missing property is named in the path."""
        parts = ["*" if isinstance(p, int) else str(p) for p in error.absolute_path]
        if error.validator == "required" and (missing := re.match(r"'(.+)' is a required property", error.message)):
            parts.append(missing.group(1))
        return f"{'/'.join(parts) or '(body)'}: {error.validator}"


CHECKER = ResponseChecker(load_document())


class CheckedClient(FlaskClient):
    """Flask's test client; every answer it returns is checked against the document."""

    def open(self, *args: Any, **kwargs: Any) -> TestResponse:
        response = super().open(*args, **kwargs)
        request = response.request
        body = response.get_data() if _is_json(response.mimetype) else None
        CHECKER.check(request.method, request.host_url, request.path, response.status_code, response.mimetype,
                      body)
        return response


def observe_urllib(method: str, url: str, status: int, headers: Message, body: bytes) -> None:
    """tests/helpers.request()'s observer: checks answers of real server processes."""
    parts = urlsplit(url)
    CHECKER.check(method, f"{parts.scheme}://{parts.netloc}", parts.path or "/", status,
                  headers.get_content_type(), body)


_previous_client_class: type[FlaskClient] | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _previous_client_class
    _previous_client_class = Flask.test_client_class
    Flask.test_client_class = CheckedClient
    helpers.observers.append(observe_urllib)


def pytest_unconfigure(config: pytest.Config) -> None:
    Flask.test_client_class = _previous_client_class
    if observe_urllib in helpers.observers:
        helpers.observers.remove(observe_urllib)


_reported = 0  # mismatches up to this index have been attributed to a test phase


def _fail_on_new_mismatches() -> Iterator[None]:
    """Body of the three phase wrappers: fails the phase if an answer it received did not match."""
    global _reported
    try:
        result = yield
    finally:
        new, _reported = CHECKER.unexpected[_reported:], len(CHECKER.unexpected)
    if new:
        pytest.fail("answers that do not match src/server/openapi.yaml:\n  " + "\n  ".join(map(str, new)),
                    pytrace=False)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    return (yield from _fail_on_new_mismatches())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    return (yield from _fail_on_new_mismatches())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    return (yield from _fail_on_new_mismatches())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # An answer received outside any test phase (a straggling thread) still fails the run.
    if len(CHECKER.unexpected) > _reported and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not CHECKER.checked:
        return
    write = terminalreporter.write_line
    terminalreporter.section("OpenAPI response check")
    write(f"{CHECKER.checked} answers checked against src/server/openapi.yaml; "
          f"{len(CHECKER.unexpected)} mismatches")
    unexpected = Counter((m.operation, m.what) for m in CHECKER.unexpected)
    examples = {(m.operation, m.what): m for m in CHECKER.unexpected}
    for key, count in sorted(unexpected.items()):
        write(f"  MISMATCH ({count}x) {examples[key]}")
