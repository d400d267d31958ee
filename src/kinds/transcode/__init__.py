"""The `transcode` job kind: one video encoded across many workers and stitched frame-exact.

`kind` is the server half (probe, plan, split with stream copy, check, stitch), `runner`
the worker half (decode a piece, trim to the job's frames, encode). The other modules each
hold one concept: `probe` (ffprobe facts), `plan` (cutting frames into jobs), `split`
(stream-copy pieces), `encode` (the encoder command), `check` (judging a chunk), `stitch`
(joining chunks and the audio), `tools` (running ffmpeg).
"""

# One jobs queue per codec: a worker consumes the codecs its ffmpeg can encode (see registry).
ROUTES = ("h264", "hevc", "vp9", "av1")
