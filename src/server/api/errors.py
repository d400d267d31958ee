"""Every error answers JSON `{"error": "what is wrong"}` with its status code.

An unexpected exception is logged with its traceback and answered 500 with a fixed
text: exception messages can carry server paths and internals.
"""

from __future__ import annotations

import logging

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def register(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def api_error(exc: ApiError):
        return jsonify(error=exc.message), exc.status

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(exc: RequestEntityTooLarge):
        limit = app.config["MAX_CONTENT_LENGTH"] // (1024 * 1024)
        return jsonify(error=f"the upload is larger than the {limit} MB limit (MAX_UPLOAD_MB)"), 413

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        return jsonify(error=exc.description or exc.name), exc.code

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        logging.getLogger("server").exception("Request failed")
        return jsonify(error="internal error; the server's log has the details"), 500
