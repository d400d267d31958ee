"""`python -m src.server`: the HTTP server (API + web page) in the foreground."""

from __future__ import annotations

import logging

from src import config
from src.config import configure_logging
from src.server import create_app, wsgi
from src.server.services import EXTENSION


def main() -> None:
    configure_logging()
    settings = config.load()
    app = create_app(settings)
    app.extensions[EXTENSION].start()
    logging.getLogger("server").info("Serving on http://%s:%d/", settings.server_host, settings.server_port)
    wsgi.serve(app, settings)


if __name__ == "__main__":
    main()
