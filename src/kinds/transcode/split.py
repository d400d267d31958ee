"""The server's split: prove each job's source piece from the packets, and cut it on demand.

A piece is a run of packets in decode order, from a keyframe to the packet before another
keyframe (or the end). Planning (`prove`) reads no frame: from the probe's packets it knows
the piece's packets, its bytes, the pts of the job's first and last frames, and whether the
packets alone prove what the piece decodes to. They do where the piece opens on a keyframe
without leading pictures (a closed GOP: nothing decoded after the keyframe is shown before
it) and none of its packets has broken timestamps (`probe.broken_packets`): every packet is
then one frame, the frames come out in pts order, and the job's frames are decoded frames
`start - key` onwards. A piece whose end keyframe has leading pictures is widened to the next
keyframe first, since those pictures are shown before the cut but decoded after it.

Where the packets cannot prove a piece (it opens on an open GOP's keyframe, whose leading
pictures a decoder drops or shows broken; or its timestamps are broken) the piece is cut and
decoded once here, as before, and only that piece: its frame count is held to what its
packets promise, and a piece whose count is off carries the previous GOP too (the decoder
then has the references the leading pictures need); one still off after that is refused with
the reason. The job's facts say which proof it got (`proof`: "packets" or "decode", and why).

Cutting (`cut`) happens when a job's message is built (the kind's `payload`), one piece at a
time, so the first job is on the broker while later pieces are not cut yet. It is a stream
copy that seeks to the piece's keyframe (`-seek_timestamp`; containers seek differently, see
`_seek_targets`) and copies its packets (`-frames:v`), keeping the source's timestamps
(`-copyts`) so the worker's decoded pts can be held to the plan. The same run lists the packets
it wrote (`framecrc`), checked against the plan (count, a keyframe first, the first and last
pts); where a seek landed elsewhere the piece is cut again by reading from the first packet
(the segment muxer), which is exact for every container. A
piece is written under a temporary name and renamed, so a server restarted mid-cut cuts it
again; pieces stay until the task is merged (`stitch.join_jobs`) or deleted.

Pieces are NUT: it carries any codec a source may have and stores both pts and dts, so the
worker reads B-frame streams in order; its time base is at least as fine as the source's, so
every pts converts back to the source's exactly.
"""

from __future__ import annotations

import bisect
import json
import math
import shutil
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Any

from src.kinds.base import JobView, TaskView
from src.kinds.transcode import plan, probe, tools
from src.media import guard

PIECES = "pieces"  # the task folder's subfolder for source pieces
PACKETS = "packets.json"  # the task folder's copy of the probe, for planning after prepare
DECODE_ATTEMPTS = 3  # a piece proven by decode may carry up to two earlier GOPs


def piece_path(folder: Path, facts: dict[str, Any]) -> Path:
    """A job's source piece in its task's `folder`, from the job's facts (`piece_file`, set by `prove`)."""
    return folder / PIECES / Path(facts["piece_file"]).name


def piece_name(first: int, last: int) -> str:
    """The piece of packets first..last-1 (decode order): the same packets, the same name."""
    return f"piece{first:09d}-{last:09d}.nut"


class SplitError(RuntimeError):
    """The source cannot be split frame-exactly with stream copy."""


# -- the probe, kept between prepare and plan ---------------------------------------------------


def save(facts: probe.Probe, folder: Path) -> None:
    """Keep the probe in the task's folder: `plan` runs later (once the live workers are known)."""
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / (PACKETS + ".part")
    partial.write_text(json.dumps(facts.as_json(), separators=(",", ":")))
    partial.replace(folder / PACKETS)


def load(source: Path, folder: Path) -> probe.Probe:
    """The probe `save` kept, or a new one (a folder emptied since: it is packets only, cheap)."""
    try:
        return probe.Probe.from_json(json.loads((folder / PACKETS).read_text()))
    except (OSError, ValueError, TypeError):
        facts = probe.probe(source)
        save(facts, folder)
        return facts


# -- proving a piece from its packets -------------------------------------------------------------


class Pieces:
    """The packet-level plan of one source's pieces (`facts`, its probe)."""

    def __init__(self, facts: probe.Probe):
        self.facts = facts

    def _index(self, frame: int) -> int:
        """Index in `keyframes` of keyframe `frame` (len(keyframes) for the frame count)."""
        if frame >= self.facts.frames:
            return len(self.facts.keyframes)
        return bisect.bisect_left(self.facts.keyframes, frame)

    def frame(self, index: int) -> int:
        """Display frame of keyframe `index` (the frame count past the last)."""
        return self.facts.keyframes[index] if index < len(self.facts.keyframes) else self.facts.frames

    def packet(self, index: int) -> int:
        """Decode-order packet of keyframe `index` (the packet count past the last)."""
        return self.facts.key_packets[index] if index < len(self.facts.key_packets) else self.facts.frames

    def leading(self, index: int) -> int:
        """Leading pictures of keyframe `index` (none past the end)."""
        return self.facts.leading[index] if index < len(self.facts.leading) else 0

    def bytes(self, first: int, last: int) -> int:
        end = self.facts.key_bytes[last] if last < len(self.facts.key_bytes) else self.facts.bytes
        return end - self.facts.key_bytes[first]

    def widened(self, first: int, last: int, end: int) -> int:
        """The end keyframe index: `last`, moved on while its leading pictures hold frames < `end`
        (they are decoded after the cut but shown before it, so the job needs them)."""
        while last < len(self.facts.keyframes) and self.frame(last) - self.leading(last) < end:
            last += 1
        return last

    def unproven(self, first: int, last: int) -> str | None:
        """Why packets alone cannot prove the piece from keyframe `first` to keyframe `last`, or None."""
        if self.leading(first):
            return (f"its keyframe (frame {self.frame(first)}) opens an open GOP: {self.leading(first)} "
                    "leading picture(s) decoded after it are shown before it")
        p0, p1 = self.packet(first), self.packet(last)
        broken = self.facts.broken
        low = bisect.bisect_left(broken, p0)
        if low < len(broken) and broken[low] < p1:
            return f"packet {broken[low]} has no usable timestamp (missing, repeated, out of order or empty)"
        # its packets' pts must be exactly the display pts of its frames (up to the end keyframe's
        # leading pictures, which lie beyond its last packet): no other piece's frame among them
        stamps = sorted(self.facts.pts[p0:p1])  # type: ignore[type-var]  # none is None: not broken
        if stamps != self.facts.display_pts[self.frame(first):self.frame(last) - self.leading(last)]:
            return "its packets' pts interleave with another piece's"
        return None

    def stamps(self, start: int, end: int, first: int, last: int) -> dict[str, Any]:
        """The pts of the job's first and last frames, and of the piece's first and last packets
        (in the source's time base), where the timestamps can be trusted; None otherwise."""
        p0, p1 = self.packet(first), self.packet(last)
        trusted = not self.facts.broken and len(self.facts.display_pts) == self.facts.frames
        following = self.packet(first + 1)  # the next keyframe's packet: a seek must stay before it
        return {"first_pts": self.facts.display_pts[start] if trusted else None,
                "last_pts": self.facts.display_pts[end - 1] if trusted else None,
                "cut_pts": [self.facts.pts[p0], self.facts.pts[p1 - 1]],
                "next_key_pts": self.facts.pts[following] if following < self.facts.frames else None}

    def facts_of(self, job: dict[str, Any], first: int, last: int, skip: int, proof: str,
                 why: str | None) -> dict[str, Any]:
        p0, p1 = self.packet(first), self.packet(last)
        size = self.bytes(first, last)
        if size > plan.MAX_PIECE_BYTES:
            raise SplitError(f"frames {job['start']}-{job['end']}: the piece they need is {size} bytes, more than a "
                             f"job carries ({plan.MAX_PIECE_BYTES}); the source's GOPs are too long")
        placed = {**job, "key": self.frame(first), "piece": [self.frame(first), self.frame(last)],
                  "packets": [p0, p1], "piece_file": piece_name(p0, p1), "piece_bytes": size, "skip": skip,
                  **self.stamps(job["start"], job["end"], first, last), "proof": proof}
        if why:
            placed["unproven"] = why
        return placed


def prove(source: Path, facts: probe.Probe, folder: Path, job: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    """The job's facts with its proven piece: `packets` [first, last) in decode order, `piece_file`,
    `piece_bytes`, `skip` (decoded frames before `start`), `first_pts`/`last_pts` (the pts of its
    first and last frames, source time base; None where timestamps are broken), `cut_pts`, the
    widened `key`/`piece` if any, and `proof`. Reads no frame unless the packets cannot prove the
    piece; then it cuts and decodes that piece (see the module's docstring)."""
    pieces = Pieces(facts)
    start, end = job["start"], job["end"]
    first = pieces._index(job["key"])
    last = pieces.widened(first, pieces._index(job["piece"][1]), end)
    why = pieces.unproven(first, last)
    if why is None:
        return pieces.facts_of(job, first, last, start - pieces.frame(first), "packets", None)
    return _prove_by_decode(source, pieces, folder, job, first, last, why, timeout)


def _prove_by_decode(source: Path, pieces: Pieces, folder: Path, job: dict[str, Any], first: int, last: int,
                     why: str, timeout: float) -> dict[str, Any]:
    start, end = job["start"], job["end"]
    tried = []
    for _attempt in range(DECODE_ATTEMPTS):
        last = pieces.widened(first, last, end)
        candidate = pieces.facts_of(job, first, last, 0, "decode", why)
        path = cut(source, folder, candidate, timeout, pieces.facts.time_base)
        decoded = probe.count_frames(path, timeout=timeout)
        packets = pieces.packet(last) - pieces.packet(first)
        lead = pieces.leading(first) if first else 0
        skip = None
        if decoded == packets - lead:
            skip = start - pieces.frame(first)  # the decoder dropped the undecodable leading pictures
        elif lead and decoded == packets:
            skip = start - pieces.frame(first) + lead  # it showed them (broken): drop them too
        if skip is not None and decoded - skip >= end - start:
            return {**candidate, "skip": skip}
        tried.append(f"frames {pieces.frame(first)}-{pieces.frame(last)} decode to {decoded}, "
                     f"expected {packets - lead}")
        if first == 0:
            break
        first -= 1  # carry the previous GOP: the leading pictures' references are then there
    raise SplitError(f"frames {start}-{end} cannot be cut frame-exactly with stream copy "
                     f"({'; '.join(tried)}); the source's GOP structure is not supported")


def packet_facts(facts: probe.Probe) -> dict[str, Any]:
    """What the packets say about proving pieces without a decode (a task's facts): GOPs open or
    closed, keyframes with leading pictures, packets with broken timestamps. Pieces that open on
    an open GOP's keyframe, or hold a broken packet, are proven by a decode (`prove`)."""
    leading = sum(1 for count in facts.leading if count)
    return {"gop": "open" if leading else "closed", "open_keyframes": leading,
            "broken_packets": len(facts.broken)}


def piece_bytes(task: TaskView, job: JobView) -> bytes:
    """The job's source piece, cut now if it is not there yet (the first job's message leaves
    while later pieces are still uncut; a server restarted mid-publish cuts what is missing)."""
    if "packets" not in job.facts:  # planned before pieces were cut on demand: cut in prepare
        return piece_path(task.folder, job.facts).read_bytes()
    return cut(task.media.path, task.folder, job.facts, time_base=task.facts.get("time_base")).read_bytes()


# -- cutting a piece -----------------------------------------------------------------------------


# ffmpeg seeks this much before -ss in a container that does not seek by pts when a stream has
# B-frames (its "dts heuristic", 3/23 s: Matroska, FLV), so a target that far after the keyframe
# lands on it there, and still on it where the container seeks by pts to the keyframe at or
# before the time (MP4), if the next keyframe is further away. MPEG-TS lands on the keyframe at
# or after the time: there the keyframe's own pts is the target that works.
SEEK_HEURISTIC = Fraction(3, 23)


def _seek_targets(job: dict[str, Any], time_base: Fraction) -> list[str]:
    """-ss values to try for the job's keyframe, in order, rounded up to ffmpeg's microsecond."""
    key = job["cut_pts"][0] * time_base
    following = job.get("next_key_pts")
    times = [key]
    if following is None or key + SEEK_HEURISTIC < following * time_base:
        times.insert(0, key + SEEK_HEURISTIC)
    micros = [math.ceil(t * 1_000_000) for t in times]
    return [f"{m // 1_000_000}.{m % 1_000_000:06d}" if m >= 0 else f"{m / 1_000_000:.6f}" for m in micros]


def _copy_args() -> list[str]:
    # -copyts keeps the source's timestamps; negative ones (the first B-frame dts) too
    return ["-map", "0:v:0", "-c", "copy", "-copyts", "-avoid_negative_ts", "disabled", "-map_metadata", "-1"]


def _copied(args: list[str], frames: int, output: list[str], timeout: float,
            what: str) -> tuple[Fraction, list[tuple[int | None, bool]]]:
    """Run one stream copy of the input in `args` to `output` (the piece) and, in the same run,
    to a `framecrc` listing of the very packets it wrote: their time base and each packet's pts
    and key flag (a packet check without a second process)."""
    copy = [*_copy_args(), "-frames:v", str(frames)]
    done = tools.run([*tools.FFMPEG, "-v", "error", *args, *copy, *output, *copy, "-f", "framecrc", "-"],
                     timeout=timeout, what=what)
    base, packets = Fraction(1), []
    for line in done.stdout.decode("ascii", "replace").splitlines():
        if line.startswith("#tb 0:"):
            base = tools.fraction(line.split(":", 1)[1])
        elif line and not line.startswith("#"):
            fields = [field.strip() for field in line.split(",")]
            # stream, dts, pts, duration, size, crc[, F=flags]: no F= means a keyframe alone
            flags = next((int(f[2:], 16) for f in fields[6:] if f.startswith("F=")), 1)
            packets.append((probe._stamp(fields[2]), bool(flags & 1)))
    return base, packets


def _matches(base: Fraction, packets: list[tuple[int | None, bool]], job: dict[str, Any],
             time_base: Fraction) -> str | None:
    """Why the packets a cut wrote are not the job's (count, a keyframe first, the first and last
    packets' pts), or None. Packets only: nothing is decoded."""
    p0, p1 = job["packets"]
    if len(packets) != p1 - p0:
        return f"{len(packets)} packets where {p1 - p0} were planned"
    if not packets[0][1]:
        return "it does not open on a keyframe"
    for (got, _), planned in ((packets[0], job["cut_pts"][0]), (packets[-1], job["cut_pts"][1])):
        # in the source's time base, rounded as the worker's settb rounds (NUT's is finer)
        if planned is not None and (got is None or round(got * base / time_base) != planned):
            return f"a packet's pts is {got} ({base}), the plan's {planned} ({time_base})"
    return None


def cut(source: Path, folder: Path, job: dict[str, Any], timeout: float = 1800,
        time_base: str | None = None, seek: bool = True) -> Path:
    """The job's piece (its packets [first, last) of the source's video by stream copy), cut now
    unless it is already there. `folder` is the task's; `time_base` the source's (task facts);
    `seek=False` reads from the first packet (what a seek that lands elsewhere falls back to)."""
    path = piece_path(folder, job)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    base = tools.fraction(time_base or "1/1")
    p0, p1 = job["packets"]
    key_pts = job["cut_pts"][0]
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".cut-") as scratch:
        partial = Path(scratch) / "piece.nut"
        tried = []
        try:
            source_args = guard.ffmpeg_input(source, guard.UPLOAD, source.parent)
        except guard.OutsideFolder as exc:
            raise SplitError(f"the source cannot be read: {exc}") from None
        if None in job["cut_pts"]:
            # packets without a pts (AVI with B-frames): NUT needs one; derive it from the dts
            source_args = ["-fflags", "+genpts", *source_args]
        for target in _seek_targets(job, base) if seek and p0 > 0 and key_pts is not None else []:
            seeking = ["-seek_timestamp", "1", "-ss", target, *source_args]
            reason = _matches(*_copied(seeking, p1 - p0, ["-f", "nut", "-y", str(partial)], timeout,
                                       "cutting a source piece"), job, base)
            if reason is None:
                partial.replace(path)
                return path
            tried.append(f"seeking to {target} s: {reason}")
        # from the first packet: the segment muxer counts packets in decode order, exact whatever
        # the container's seeking does (only the listing's last p1 - p0 packets are the piece's)
        output = (["-f", "nut", "-y", str(partial)] if p0 == 0 else
                  ["-f", "segment", "-segment_format", "nut", "-segment_frames", str(p0), "-reset_timestamps", "0",
                   str(Path(scratch) / "seg%d.nut")])
        packet_base, packets = _copied(source_args, p1, output, timeout, "cutting a source piece from the start")
        if p0 > 0:
            shutil.move(str(Path(scratch) / "seg1.nut"), partial)
        reason = _matches(packet_base, packets[p0:], job, base)
        if reason is not None:
            raise SplitError(f"packets {p0}-{p1} cannot be cut with stream copy: "
                             f"{'; '.join([*tried, f'from the start: {reason}'])}")
        partial.replace(path)
    return path
