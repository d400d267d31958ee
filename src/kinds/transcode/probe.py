"""What the transcode kind needs to know about a video file, read with ffprobe's JSON output.

Planning frame-exact jobs needs more than `Media.video`: the exact number of frames, which
frames are keyframes (as display-order frame indices, where jobs may start) and where those
keyframes sit in decode order (where a stream copy can cut: pieces are runs of packets in
decode order). It is all read from the packets (flags, sizes, pts and dts: demuxing only, no
frame is decoded; one packet per frame in every codec we split), so probing a 10-minute
1080p file takes a fraction of a second.

The packets also say where they alone cannot prove what a piece decodes to, which `split`
needs: a keyframe with *leading* pictures (decoded after it, shown before it: an open GOP),
and packets whose timestamps are missing, repeated or out of decode order, or that are empty
(`broken`). A run of packets with neither decodes to exactly its packets, in pts order.
"""

from __future__ import annotations

import contextvars
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from src.kinds.transcode import tools
from src.media import guard


@dataclass(frozen=True)
class Probe:
    frames: int
    fps: str  # exact, "30000/1001"
    width: int
    height: int
    codec: str
    pix_fmt: str
    audio: bool
    keyframes: list[int]  # display-order frame indices, ascending, starting with 0
    key_packets: list[int]  # decode-order packet index of each keyframe (same order)
    key_bytes: list[int]  # bytes of packets before each keyframe in decode order
    bytes: int  # bytes of all video packets
    leading: list[int]  # per keyframe: packets after it in decode order that display before it
    audio_lead: float = 0.0  # seconds the first audio stream starts before the video (0 if after)
    time_base: str = "1/1"  # the video stream's time base: every pts below counts in it
    pts: list[int | None] = field(default_factory=list)  # per packet, decode order
    display_pts: list[int] = field(default_factory=list)  # per frame, display order (the sorted pts)
    broken: list[int] = field(default_factory=list)  # decode indices of packets with unusable timestamps

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Probe:
        return cls(**data)

    @property
    def rate(self) -> Fraction:
        return tools.fraction(self.fps)


def _json(args: list[str], path: Path, role: guard.Role, timeout: float, what: str) -> dict[str, Any]:
    """ffprobe's JSON about `path`, read as `role` allows (src.media.guard); memory capped where
    nothing is decoded but the header (a full decode keeps the decoder's threads and memory)."""
    try:
        source = guard.probe_input(path, role, path.parent)
    except guard.OutsideFolder as exc:
        raise tools.ToolError(f"{what}: {exc}") from None
    decodes = "-count_frames" in args
    header = [] if decodes else ["-threads", "1"]
    done = tools.run([*tools.FFPROBE, "-v", "error", *header, "-of", "json", *args, *source],
                     timeout=timeout, what=what, memory=0 if decodes else guard.PROBE_MEMORY_BYTES)
    try:
        return json.loads(done.stdout or b"{}")
    except ValueError:
        raise tools.ToolError(f"{what}: ffprobe's answer is not JSON") from None


def frame_rate(stream: dict[str, Any]) -> str:
    """The stream's frame rate as an exact fraction string.

    `r_frame_rate` is the container's nominal rate and exact for constant-rate video;
    `avg_frame_rate` is frames ÷ duration and can come out as "155000/6201" from rounded
    durations, so it wins only where the two disagree by more than 1 % (variable rate).
    """
    nominal = average = None
    for key in ("r_frame_rate", "avg_frame_rate"):
        try:
            value = tools.fraction(stream.get(key, "0/0"))
        except (ValueError, ZeroDivisionError):
            continue
        if key == "r_frame_rate":
            nominal = value
        else:
            average = value
    rate = nominal or average
    if nominal and average and abs(nominal - average) / average > Fraction(1, 100):
        rate = average
    if rate is None or not (Fraction(1, 1000) < rate <= 1000):
        raise tools.ToolError(f"the video's frame rate ({stream.get('r_frame_rate')}) is unusable")
    return f"{rate.numerator}/{rate.denominator}"


def probe(path: Path, timeout: float = 600) -> Probe:
    """Probe the first video stream of `path` (ToolError when there is none or it is unreadable)."""
    # The streams' header is read beside the packet scan, not before it: the scan is most of the
    # time from a task's creation to its first job. (The copied context keeps the server's CPU
    # accounting of the phase: src.media.guard.accounted.)
    with ThreadPoolExecutor(1, thread_name_prefix="probe") as pool:
        header = pool.submit(contextvars.copy_context().run, _json,
                             ["-show_entries", "stream=index,codec_type,codec_name,width,height,pix_fmt,r_frame_rate,"
                              "avg_frame_rate,start_time,time_base"], path, guard.UPLOAD, 60, "ffprobe streams")
        scanned = _json(["-select_streams", "v:0", "-show_entries", "packet=pts,dts,flags,size"], path,
                        guard.UPLOAD, timeout=timeout, what="ffprobe packets")
        info = header.result()
    streams = info.get("streams") or []
    video = next((s for s in streams if s.get("codec_type") == "video"), None)
    if video is None:
        raise tools.ToolError(f"{path.name} has no video stream")
    packets = scanned.get("packets") or []
    if not packets:
        raise tools.ToolError(f"{path.name}: the video stream has no packets")

    # Display order: sort decode-order packets by presentation time (ties and missing
    # times keep decode order). A keyframe's display index is its rank in that order.
    def when(index: int) -> tuple[int, int]:
        packet = packets[index]
        stamp = packet.get("pts", packet.get("dts"))
        return (int(stamp) if stamp not in (None, "N/A") else index, index)

    order = sorted(range(len(packets)), key=when)
    display = [0] * len(packets)
    for rank, index in enumerate(order):
        display[index] = rank
    cumulative = [0]
    for packet in packets:
        cumulative.append(cumulative[-1] + int(packet.get("size") or 0))

    keys = [i for i, packet in enumerate(packets) if "K" in str(packet.get("flags", ""))]
    if not keys or keys[0] != 0:
        # A stream that does not open on a keyframe cannot be cut or decoded from its start.
        raise tools.ToolError(f"{path.name}: the video does not start with a keyframe")
    pairs = sorted((display[i], i) for i in keys)
    keyframes = [d for d, _ in pairs]
    key_packets = [i for _, i in pairs]
    # Open GOPs: pictures decoded after a keyframe yet shown before it ("leading"
    # pictures) need the previous GOP; `split` uses these counts to judge its pieces.
    leading = []
    for (d, i), following in zip(pairs, [*key_packets[1:], len(packets)], strict=True):
        leading.append(sum(1 for j in range(i + 1, following) if display[j] < d))
    sound = next((s for s in streams if s.get("codec_type") == "audio"), None)
    lead = 0.0
    if sound is not None:
        try:
            lead = max(0.0, float(video["start_time"]) - float(sound["start_time"]))
        except (KeyError, TypeError, ValueError):
            lead = 0.0
    stamps = [_stamp(packet.get("pts")) for packet in packets]
    return Probe(
        frames=len(packets),
        fps=frame_rate(video),
        width=int(video.get("width") or 0),
        height=int(video.get("height") or 0),
        codec=str(video.get("codec_name") or "unknown"),
        pix_fmt=str(video.get("pix_fmt") or "unknown"),
        audio=sound is not None,
        keyframes=keyframes,
        key_packets=key_packets,
        key_bytes=[cumulative[i] for i in key_packets],
        bytes=cumulative[-1],
        leading=leading,
        audio_lead=lead,
        time_base=_time_base(video),
        pts=stamps,
        display_pts=sorted(stamp for stamp in stamps if stamp is not None),
        broken=broken_packets(packets, stamps),
    )


def _stamp(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):  # "N/A" or absent
        return None


def _time_base(stream: dict[str, Any]) -> str:
    try:
        base = tools.fraction(stream.get("time_base", ""))
    except (ValueError, ZeroDivisionError):
        return "1/1"  # no usable time base: no timestamp can then be held to the plan (see split)
    return f"{base.numerator}/{base.denominator}"


def broken_packets(packets: list[dict[str, Any]], stamps: list[int | None]) -> list[int]:
    """Decode indices of the packets whose frame the packets alone cannot place: no pts, a pts
    shown twice or below its dts, a dts not after the one before, or an empty packet (which
    decodes to no frame, or repeats one). A missing dts is not broken: Matroska stores none for
    the first packets of a B-frame stream, and the pts alone order the frames."""
    broken: set[int] = set()
    seen: dict[int, int] = {}
    previous = None
    for index, (packet, pts) in enumerate(zip(packets, stamps, strict=True)):
        dts = _stamp(packet.get("dts"))
        if pts is None or int(packet.get("size") or 0) <= 0 or (dts is not None and pts < dts):
            broken.add(index)
        if dts is not None:
            if previous is not None and dts <= previous:
                broken.add(index)
            previous = dts
        if pts is not None:
            if pts in seen:
                broken.update((index, seen[pts]))
            seen[pts] = index
    return sorted(broken)


def count_frames(path: Path, timeout: float = 600) -> int:
    """Frames the first video stream decodes to (a full decode: for checking pieces)."""
    info = _json(["-count_frames", "-select_streams", "v:0", "-show_entries", "stream=nb_read_frames"], path,
                 guard.PIECE, timeout=timeout, what="ffprobe count frames")
    streams = info.get("streams") or [{}]
    try:
        return int(streams[0].get("nb_read_frames"))
    except (TypeError, ValueError):
        return 0
