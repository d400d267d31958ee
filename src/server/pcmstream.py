"""A float32 file served as a 16-bit WAV made on the fly, with HTTP Range: the page's player.

The page streams every stem into its own <audio> element. Rendering a long song's stems
to MP3 first kept the player waiting (a 15-minute song: about 20 s of encoding), and
decoding whole files in the page cost hundreds of MB of heap. A WAV's bytes are a fixed
function of the samples, so any byte range can be made directly from the float32 file:
nothing is rendered ahead, seeking is exact, and the server reads only what is asked.
The samples are those of the WAV download (`audio.to_pcm16`), but without tags: this is
for listening, not for keeping.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

from flask import Request, Response

from src.media.pcm import BLOCK_FRAMES, read_frames, to_pcm16

HEADER_BYTES = 44


def wav_header(frames: int, samplerate: int, channels: int) -> bytes:
    data = frames * channels * 2
    return (b"RIFF" + struct.pack("<I", 36 + data) + b"WAVEfmt " +
            struct.pack("<IHHIIHH", 16, 1, channels, samplerate, samplerate * channels * 2, channels * 2, 16) +
            b"data" + struct.pack("<I", data))


def _wav_bytes(source: Path, frames: int, samplerate: int, channels: int, start: int, stop: int) -> Iterator[bytes]:
    """Bytes [start, stop) of the WAV of `source`, block by block."""
    header = wav_header(frames, samplerate, channels)
    if start < HEADER_BYTES:
        yield header[start:stop]
        start = HEADER_BYTES
    frame_bytes = channels * 2
    while start < stop:
        first = (start - HEADER_BYTES) // frame_bytes
        count = min(BLOCK_FRAMES // 4, (stop - HEADER_BYTES + frame_bytes - 1) // frame_bytes - first)
        block = to_pcm16(read_frames(source, channels, first, count).T)
        skip = start - HEADER_BYTES - first * frame_bytes
        piece = block[skip:skip + stop - start]
        if not piece:
            return
        yield piece
        start += len(piece)


def wav_response(request: Request, source: Path, samplerate: int, channels: int) -> Response:
    """200 with the whole WAV, or 206 with the range asked for (one range; that is what players ask)."""
    frames = source.stat().st_size // (4 * channels)
    length = HEADER_BYTES + frames * channels * 2
    asked = request.range.range_for_length(length) if request.range else None
    start, stop = asked or (0, length)
    response = Response(_wav_bytes(source, frames, samplerate, channels, start, stop), mimetype="audio/wav",
                        status=206 if asked else 200, direct_passthrough=True)
    response.headers["Accept-Ranges"] = "bytes"
    response.headers["Content-Length"] = str(stop - start)
    response.headers["Cache-Control"] = "no-cache"
    if asked:
        response.headers["Content-Range"] = f"bytes {start}-{stop - 1}/{length}"
    return response
