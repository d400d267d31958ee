"""The server's split: cut each job's source piece with stream copy, then prove it decodes right.

The segment muxer runs once over the source (`-c copy`, no decode) and cuts it at the
keyframes where pieces start or end. It cuts at a packet count in decode order, so we hand
it each keyframe's decode index from the probe: with B-frames under open GOPs the decode and
display indices of a keyframe differ. A piece spanning several segments (a job that starts
mid-GOP in a sparse stream, or one widened for an open GOP) is joined from them with the
concat demuxer, again by stream copy. Segments and pieces are NUT: it carries any codec a
source may have and stores both pts and dts, so B-frame streams can be joined again
(Matroska stores pts only, and re-muxing its segments failed on "unknown timestamp").

Stream copy is only frame-exact if every piece decodes to the frames the plan expects, and
open GOPs break that: the pictures shown just before a keyframe may be decoded after it
("leading" pictures), so they sit in the next piece and reference the previous GOP. So each
piece is decoded once here and its frame count compared with what its packets promise. A
piece that ends before the leading pictures it needs is widened to the next cut; one whose
count is off carries the previous segment too (the decoder then has the GOP the leading
pictures need); one still off after that is refused with the reason.
"""

from __future__ import annotations

import bisect
import shutil
from pathlib import Path
from typing import Any

from src.kinds.transcode import plan, probe, tools
from src.media import guard

SEGMENT = "seg{:06d}.nut"
PIECES = "pieces"  # the task folder's subfolder for source pieces


def piece_path(folder: Path, facts: dict[str, Any]) -> Path:
    """A job's source piece in its task's `folder`, from the job's facts (`piece_file`, set by `place`)."""
    return folder / PIECES / Path(facts["piece_file"]).name


class SplitError(RuntimeError):
    """The source cannot be split frame-exactly with stream copy."""


class Splitter:
    """Cuts `source` (probed as `facts`) into pieces under `folder`, once per task."""

    def __init__(self, source: Path, facts: probe.Probe, folder: Path, timeout: float = 1800):
        self.source = source
        self.facts = facts
        self.folder = folder
        self.timeout = timeout
        self.cuts: list[int] = []  # display frames where segments start, then the frame count
        self._counts: dict[tuple[int, int], int] = {}

    def _packet(self, frame: int) -> int:
        """Decode-order packet index of keyframe `frame` (the frame count past the end)."""
        if frame >= self.facts.frames:
            return self.facts.frames
        return self.facts.key_packets[bisect.bisect_left(self.facts.keyframes, frame)]

    def _leading(self, frame: int) -> int:
        if frame == 0 or frame >= self.facts.frames:
            return 0  # the stream's first keyframe has nothing before it to lead
        return self.facts.leading[bisect.bisect_left(self.facts.keyframes, frame)]

    def segment(self, jobs: list[dict[str, Any]]) -> None:
        """Cut the source at every keyframe a job's piece starts or ends at."""
        wanted = {0}
        for job in jobs:
            wanted.update(job["piece"])
        frames = self.facts.frames
        self.cuts = sorted(k for k in wanted if k < frames) + [frames]
        if self.folder.exists():
            shutil.rmtree(self.folder)  # a retried prepare starts clean
        self.folder.mkdir(parents=True)
        packets = [self._packet(k) for k in self.cuts[1:-1]]
        # With no cut, segment_frames must still be given (else segment_time's 2 s applies):
        # a packet number past the end means one segment.
        points = ",".join(str(p) for p in packets) or str(frames + 1)
        try:
            source = guard.ffmpeg_input(self.source, guard.UPLOAD, self.source.parent)
        except guard.OutsideFolder as exc:
            raise SplitError(f"the source cannot be read: {exc}") from None
        tools.run([*tools.FFMPEG, "-v", "error", *source, "-map", "0:v:0", "-c", "copy",
                   "-f", "segment", "-segment_format", "nut", "-segment_frames", points,
                   "-reset_timestamps", "1", str(self.folder / "seg%06d.nut")],
                  timeout=self.timeout, what="splitting the source")
        made = sorted(self.folder.glob("seg*.nut"))
        if len(made) != len(self.cuts) - 1:
            raise SplitError(f"the segment muxer made {len(made)} pieces where {len(self.cuts) - 1} were planned")

    def piece(self, first: int, last: int) -> Path:
        """The file holding segments first..last-1 (indices into `cuts`), joined by stream copy."""
        if last - first == 1:
            return self.folder / SEGMENT.format(first)
        joined = self.folder / f"piece{first:06d}-{last:06d}.nut"
        if not joined.exists():
            listing = self.folder / f"piece{first:06d}-{last:06d}.txt"
            segments = [(self.folder / SEGMENT.format(i), None) for i in range(first, last)]
            partial = joined.with_suffix(".part")
            tools.run([*tools.FFMPEG, "-v", "error", *guard.concat_input(segments, listing, self.folder),
                       "-map", "0:v:0", "-c", "copy", "-f", "nut", "-y", str(partial)],
                      timeout=self.timeout, what="joining source segments", quiet=True)
            partial.replace(joined)
        return joined

    def decoded(self, first: int, last: int) -> int:
        key = (first, last)
        if key not in self._counts:
            self._counts[key] = probe.count_frames(self.piece(first, last), timeout=self.timeout)
        return self._counts[key]

    def place(self, job: dict[str, Any]) -> dict[str, Any]:
        """The job's facts with its verified piece: `piece_file` (relative to the folder),
        `skip` (decoded frames to drop before `start`), the widened `key`/`piece` if any."""
        start, end = job["start"], job["end"]
        first = self.cuts.index(job["key"])
        last = self.cuts.index(job["piece"][1])
        tried = []
        for _attempt in range(3):
            # Widen the end while the next piece's leading pictures hold frames this job owns.
            while last < len(self.cuts) - 1 and self.cuts[last] - self._leading(self.cuts[last]) < end:
                last += 1
            decoded = self.decoded(first, last)
            packets = self._packet(self.cuts[last]) - self._packet(self.cuts[first])
            lead = self._leading(self.cuts[first])
            skip = None
            if decoded == packets - lead:
                skip = start - self.cuts[first]  # the decoder dropped the undecodable leading pictures
            elif lead and decoded == packets:
                skip = start - self.cuts[first] + lead  # it showed them (broken): drop them too
            if skip is not None and decoded - skip >= end - start:
                path = self.piece(first, last)
                size = path.stat().st_size
                if size > plan.MAX_PIECE_BYTES:
                    raise SplitError(f"frames {start}-{end}: the piece they need is {size} bytes, more than a job "
                                     f"carries ({plan.MAX_PIECE_BYTES}); the source's GOPs are too long")
                return {**job, "key": self.cuts[first], "piece": [self.cuts[first], self.cuts[last]],
                        "piece_file": path.name, "piece_bytes": size, "skip": skip}
            tried.append(f"frames {self.cuts[first]}-{self.cuts[last]} decode to {decoded}, expected {packets - lead}")
            if first == 0:
                break
            first -= 1  # carry the previous GOP: the leading pictures' references are then there
        raise SplitError(f"frames {start}-{end} cannot be cut frame-exactly with stream copy "
                         f"({'; '.join(tried)}); the source's GOP structure is not supported")
