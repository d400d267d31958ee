"""`python -m src.server`: the HTTP server (API + web page) in the foreground."""

from __future__ import annotations

import logging

from src import config
from src.server import configure_logging, create_app, wsgi


def main() -> None:
    configure_logging()
    settings = config.load()
    app = create_app(settings)
    logging.getLogger("server").info("Serving on http://%s:%d/", settings.server_host, settings.server_port)
    wsgi.serve(app, settings)


if __name__ == "__main__":
    main()
