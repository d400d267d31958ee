"""The `faceblur` job kind: every face in a video masked, temporally stable, chunking-independent.

`kind` is the server half (probe and split with transcode's modules, plan with context,
check, stitch), `runner` the worker half (decode a piece, detect on every context frame,
smooth, mask the own frames, encode H.264). `plan` cuts frames into jobs with their
context; `detect` finds faces, `anonymize` smooths detections over time and masks them.

No routes: every faceblur worker runs every job (one queue, `{p}.jobs.faceblur`).
"""
