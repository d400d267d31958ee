"""/media: upload a file of any kind of media, list what was uploaded, fetch an original."""

from __future__ import annotations

from flask import Blueprint, jsonify, request, send_file

from src.media.guard import OutsideFolder, confined
from src.server.api.errors import ApiError
from src.server.api.uploads import receive_media
from src.server.services import services
from src.server.views import media_view

bp = Blueprint("media", __name__)


@bp.post("/media")
def upload():
    return jsonify(media_view(receive_media(), request.url_root)), 201


@bp.get("/media")
def list_media():
    return jsonify([media_view(m, request.url_root) for m in services().store.all_media()])


def _media_or_404(media_id: int):
    media = services().store.media(media_id)
    if media is None:
        raise ApiError(404, f"no media with id {media_id}")
    return media


@bp.get("/media/<id:media_id>")
def one(media_id: int):
    return jsonify(media_view(_media_or_404(media_id), request.url_root))


@bp.get("/media/<id:media_id>/original")
def original(media_id: int):
    """The file as uploaded, with Range support (the page plays it beside a task's output).

    Sent as an attachment with a neutral type unless it is a medium a browser plays: an
    upload is never served as HTML or script from our origin.
    """
    media = _media_or_404(media_id)
    try:  # a regular file the server wrote, never a link to elsewhere (src.media.guard)
        path = confined(services().files.original(media_id), services().files.media)
    except OutsideFolder:
        raise ApiError(404, f"media {media_id} has no original to send") from None
    video, audio = media.probe.get("video"), media.probe.get("audio")
    mimetype = "video/mp4" if video else "audio/mpeg" if audio and audio.get("codec") == "mp3" else \
        "application/octet-stream"
    return send_file(path, mimetype=mimetype, conditional=True, max_age=0,
                     download_name=f"media-{media_id}", as_attachment=mimetype == "application/octet-stream")
