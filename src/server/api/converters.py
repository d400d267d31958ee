"""URL converters shared by the blueprints.

`<id:...>` is a database id: ASCII digits only (Werkzeug hands `int()` the text, which reads
'١' and '１' as 1), and at most 18 of them, so every value it lets
through fits SQLite's 64-bit INTEGER. It refuses a larger number in the URL pattern
itself, so the route does not match and the answer is a plain 404, like any unknown id.
(A `max=` bound on Werkzeug's int converter is checked only after the method is, and
then a GET beside a POST route on the same path answers 405.)
"""

from __future__ import annotations

from flask import Flask
from werkzeug.routing import IntegerConverter


class IdConverter(IntegerConverter):
    regex = r"[0-9]{1,18}"  # not \d: in Python it also matches Arabic-Indic and fullwidth digits


def register(app: Flask) -> None:
    app.url_map.converters["id"] = IdConverter
