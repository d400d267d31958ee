"""/openapi.json and /docs: the API's OpenAPI document and Swagger UI, served offline by this server.

The document is `src/server/openapi.yaml`, hand-written and the source of truth; it is read once and served
as JSON. /docs is our own small page that loads Swagger UI from the `swagger-ui-bundle` package's static
files through this blueprint, so the page works with no network and under a Content-Security-Policy of
`script-src 'self'`: no CDN, no inline script, no inline event handler (the start-up code is docs.js).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import yaml
from flask import Blueprint, Response, abort, render_template, send_from_directory, url_for
from swagger_ui_bundle import swagger_ui_path

DOCUMENT_PATH = Path(__file__).resolve().parents[1] / "openapi.yaml"

# Only what the page needs from the package: its own index.html and initializer point at the petstore demo.
VENDOR_FILES = frozenset({"swagger-ui.css", "swagger-ui.css.map", "swagger-ui-bundle.js", "swagger-ui-bundle.js.map",
                          "favicon-32x32.png", "favicon-16x16.png"})

bp = Blueprint("docs", __name__, static_folder="docs_static", static_url_path="/docs/static",
               template_folder="docs_templates")


@functools.cache
def load_document() -> dict:
    """The OpenAPI document as a dict (read once; callers must not change it). Tests validate against it."""
    with DOCUMENT_PATH.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


@functools.cache
def _document_json() -> bytes:
    return json.dumps(load_document(), ensure_ascii=False).encode()


@bp.get("/openapi.json", strict_slashes=False)
def openapi_json() -> Response:
    return Response(_document_json(), mimetype="application/json")


@bp.get("/docs", strict_slashes=False)
def docs() -> str:
    return render_template("docs.html", spec_url=url_for("docs.openapi_json"))


@bp.get("/docs/vendor/<name>")
def vendor(name: str) -> Response:
    if name not in VENDOR_FILES:
        abort(404)
    return send_from_directory(str(swagger_ui_path), name)
