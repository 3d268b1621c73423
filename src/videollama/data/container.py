"""Opening a video with FFmpeg: the checks that come before FFmpeg does any work on a source, the
bounded open, and the first video stream. Timing the stream and walking its frames is
decoding.py's job (``open_and_time``).

Hostile input. FFmpeg trusts what a file declares, and acts on it inside ``av.open``, before
any check of ours could run: the mp4 demuxer allocates an index entry for every sample that a
sample table claims, and a decoder allocates frames of whatever size a parameter set declares
(``av.open`` decodes a few frames to learn the pixel format). So, before FFmpeg sees a source:

* a path must name a regular file (``os.stat`` first: opening a FIFO blocks forever, a device
  never ends, a directory or a symlink loop is no video);
* an ISO BMFF file (mp4, mov, m4v, 3gp, fragmented mp4) has its box tree walked, box headers
  and entry counts only (``untrusted.iso_bmff_summary``): a table that claims more entries than
  the rest of the file could hold, or sample tables that claim more samples in all than
  ``MAX_SAMPLES`` or than the file has bytes, are refused; the H.264 parameter sets in ``avcC``
  are checked as below;
* a raw H.264 (Annex B) stream has its sequence parameter sets parsed
  (``untrusted.parse_h264_sps``) and is refused when one declares a frame above ``MAX_SIDE`` per
  side or ``MAX_PIXELS``, or reference frames that need more than ``MAX_REFERENCE_BYTES``.

FFmpeg then runs with bounded probing (``PROBE_OPTIONS``; its analysis, which decodes frames,
shortened in proportion for frames declared larger than full HD), with ``max_pixels`` so that no
decoder allocates a frame above ``MAX_PIXELS`` whatever the container says, and with the clip's
remaining wall-clock budget as its open and read timeout. Every loop of ours that reads packets
or decodes frames (decoding.py: finding a stream's time origin and duration, and the one walk over
its frames that every reader uses) checks one ``WorkBound``: the frame/packet cap per pass, the
decoding work in pixels (each packet at the frame size it decodes at, shown or not), and the
deadline.
"""

from __future__ import annotations

import io
import mmap
import os
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

import av

from videollama.data.errors import (
    ABSURD_RESOLUTION,
    ABSURD_SAMPLE_COUNT,
    EMPTY_FILE,
    INVALID_CONTAINER,
    NO_VIDEO_STREAM,
    NOT_A_FILE,
    TIMEOUT,
    BadSample,
)
from videollama.data.h264_sps import annexb_sps_nals, looks_like_annexb_h264, parse_h264_sps
from videollama.data.mp4_boxes import iso_bmff_summary
from videollama.data.safe_io import check_regular_file

# Limits on what a declared video may be before we spend any work on it.
MAX_SIDE = 8192
MAX_PIXELS = 40_000_000
MAX_DURATION_S = 24 * 3600.0
# Samples that the sample tables of one file may claim, all tracks together: a day
# (MAX_DURATION_S) of 120 FPS video. FFmpeg's mp4 demuxer keeps about 70 bytes per claimed sample
# (index entry, expanded composition offsets, sizes), so this caps its index near 0.7 GB however
# the tables lie; and a file must also have at least one byte per sample it claims, so a small
# file claims little. Real clips are far below both (1 h of 30 FPS video with 48 kHz AAC audio
# has 108k + 169k samples).
MAX_SAMPLES = int(MAX_DURATION_S * 120)
# What the reference frames an H.264 SPS allows may take in all, frame size, chroma format and
# bit depth included: 8K (8192x4320) 4:2:0 8-bit video with the most reference frames H.264
# has (16) needs 0.84 GiB; a 4:4:4 10-bit SPS at MAX_PIXELS with 16 of them would need 3.8 GiB.
MAX_REFERENCE_BYTES = 1 << 30
# How much FFmpeg may read and decode to find the streams' parameters inside av.open (its
# defaults: 5 MB, 5 s of stream time, 2500 packets). For mp4 the header is read whatever these
# say; they bound the raw and packetised formats (H.264, MPEG-TS), where probing decodes packets
# until the parameters are known: a stream whose frames never decode is probed to these limits.
PROBE_OPTIONS = {"probesize": str(2 << 20), "analyzeduration": "2000000", "max_probe_packets": "200"}
# Decoding work is counted in pixels: each packet decoded costs the frame size it decodes at,
# whether or not a frame comes out (a skip frame before the first keyframe costs a full-size
# decode and shows nothing). A clip may decode as many full-HD frames as its frame cap, and at
# least MIN_PIXEL_BUDGET (32 frames of the largest size allowed); an eighth of that, and at least
# MIN_DRY_PIXEL_BUDGET (16 of the largest frames), may go to decoding that shows no frame at all:
# real streams show one at least every group of pictures (x264's default: 250 frames, within the
# cap for full HD), and a flood of frames that never show is refused after about a second of
# decoding here (bench/results/hostile_video.md). Videos up to full HD are bounded by the frame cap exactly as before; a
# 48 KB stream of 8192x4880 skip frames stops after ~40 of them (bench/results/hostile_video.md).
REFERENCE_PIXELS = 1920 * 1080
MIN_PIXEL_BUDGET = 32 * MAX_PIXELS
MIN_DRY_PIXEL_BUDGET = 16 * MAX_PIXELS

Source = str | os.PathLike | bytes | bytearray | memoryview


class WorkBound:
    """The work one clip may cost: ``max_items`` packets (and as many frames) per pass over the
    stream, ``max_pixels`` of decoding (``max_dry_pixels`` of it with no frame coming out) per
    opening (its frame walks together), and a wall-clock ``deadline`` (``time.monotonic()``; ``None``: none)
    for all passes. ``declared_pixels``: the largest frame the file's H.264 parameter sets
    declare (``check_declared``), 0 when unknown; it scales FFmpeg's own probing."""

    def __init__(self, name: str, max_items: int, deadline: float | None):
        self.name, self.max_items, self.deadline = name, max_items, deadline
        self.max_pixels = max(MIN_PIXEL_BUDGET, max_items * REFERENCE_PIXELS)
        self.max_dry_pixels = max(MIN_DRY_PIXEL_BUDGET, self.max_pixels // 8)
        self.declared_pixels = 0

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def check(self, count: int, doing: str) -> None:
        """Raise ``BadSample(TIMEOUT)`` once ``count`` passes the cap or the deadline has passed."""
        if count > self.max_items:
            raise BadSample(TIMEOUT, self.name, f"more than {self.max_items} packets or frames while {doing}")
        self.check_deadline(doing)

    def check_pixels(self, pixels: int, dry_pixels: int, doing: str) -> None:
        """Raise ``BadSample(TIMEOUT)`` once ``pixels`` decoded, or ``dry_pixels`` decoded since
        the last frame came out, pass their budgets."""
        if dry_pixels > self.max_dry_pixels:
            raise BadSample(TIMEOUT, self.name, f"decoded {dry_pixels / 1e6:.0f} megapixels without a frame coming "
                                                f"out (cap {self.max_dry_pixels / 1e6:.0f}) while {doing}")
        if pixels > self.max_pixels:
            raise BadSample(TIMEOUT, self.name, f"decoded more than {self.max_pixels / 1e6:.0f} megapixels while "
                                                f"{doing}")

    def probe_options(self) -> dict[str, str]:
        """PROBE_OPTIONS, with FFmpeg's analysis (which decodes frames) shortened in proportion for a
        file that declares frames larger than full HD: its probe then costs what a full-HD one does."""
        if self.declared_pixels <= REFERENCE_PIXELS:
            return dict(PROBE_OPTIONS)
        micros = int(PROBE_OPTIONS["analyzeduration"]) * REFERENCE_PIXELS // self.declared_pixels
        return {**PROBE_OPTIONS, "analyzeduration": str(max(micros, 100_000))}  # 0 would mean FFmpeg's default

    def check_deadline(self, doing: str) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise BadSample(TIMEOUT, self.name, f"wall-clock budget for one clip exceeded while {doing}")


def open_video(source: Source, name: str, *, time_budget_s: float = 60.0, max_packets: int = 3000):
    """``(container, first video stream)`` of a checked source (``checked_source``), opened with
    bounded probing: for callers that read headers only (``data shards``' probe, the clip cache's
    duration), so that they get the same protection as ``load_clip``. The caller closes it."""
    bound = WorkBound(name, max_packets, time.monotonic() + time_budget_s)
    container = open_checked(checked_source(source, name, bound), bound)
    try:
        return container, video_stream(container, name, 1)
    except BaseException:
        container.close()
        raise


# ---- the source: a regular file or bytes, checked before FFmpeg reads it -------------------------

def checked_source(source: Source, name: str, bound: WorkBound | None = None) -> str | bytes:
    """What ``av.open`` may be given for ``source`` (a path string, or bytes), once it has passed
    the checks of declared sizes (``check_declared``).

    Raises ``FileNotFoundError`` for a path that does not exist, and ``BadSample`` for empty
    input (EMPTY_FILE), a path that is not a regular file (NOT_A_FILE), and declarations that
    ``check_declared`` refuses.
    """
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        if not data:
            raise BadSample(EMPTY_FILE, name, "zero bytes")
        check_declared(data, name, bound)
        return data
    path = str(Path(source))
    info = regular_file_stat(path, name)
    with _mapped(path, info, name) as view:
        check_declared(view, name, bound)
    return path


def regular_file_stat(path: str, name: str) -> os.stat_result:
    """``os.stat`` of a path that must be a non-empty regular file (following symlinks).

    Only ``stat``: it has no side effect on a device and does not block on a FIFO, as opening
    them would. A missing path (or a dangling symlink) raises ``FileNotFoundError``.
    """
    info = check_regular_file(path, "video", name=name)
    if info.st_size == 0:
        raise BadSample(EMPTY_FILE, name, "zero bytes")
    return info


@contextmanager
def _mapped(path: str, info: os.stat_result, name: str) -> Iterator[mmap.mmap]:
    """The file's bytes, memory-mapped (only the pages the checks touch are read).

    Opened non-blocking, and checked again after opening to be the regular file that was
    stat'ed, so that a path swapped for a FIFO in between cannot block us.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        now = os.fstat(fd)
        if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (info.st_dev, info.st_ino):
            raise BadSample(NOT_A_FILE, name, "the path changed while it was being opened")
        if now.st_size == 0:
            raise BadSample(EMPTY_FILE, name, "zero bytes")
        view = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)
    try:
        yield view
    finally:
        view.close()


def check_declared(data, name: str, bound: WorkBound | None = None) -> None:
    """Refuse a file whose declarations would make FFmpeg allocate or work without bound.

    ``data`` is the whole file (bytes, or a memory map). ISO BMFF files: entry counts of the
    sample tables, and the H.264 parameter sets in ``avcC``; raw H.264 streams: every distinct
    sequence parameter set. Other formats pass unchecked here (FFmpeg's ``max_pixels`` and the
    work bound still apply to them).
    """
    def progress() -> None:
        if bound is not None:
            bound.check_deadline("reading what the file declares")

    summary = iso_bmff_summary(data, progress=progress)
    if summary is not None:
        if summary.overclaims:
            raise BadSample(INVALID_CONTAINER, name, summary.overclaims[0])
        claimed = summary.index_entries
        if claimed > MAX_SAMPLES:
            raise BadSample(ABSURD_SAMPLE_COUNT, name, f"sample tables claim {claimed} samples, more than "
                                                       f"{MAX_SAMPLES} (a day of video at 120 FPS)")
        if claimed > len(data):
            raise BadSample(ABSURD_SAMPLE_COUNT, name, f"sample tables claim {claimed} samples, more than the "
                                                       f"file's {len(data)} bytes can hold")
        sps_nals = summary.sps
    elif looks_like_annexb_h264(data):
        limit = None if bound is None else bound.max_items  # each distinct SPS costs a parse
        sps_nals = annexb_sps_nals(data, limit=limit, progress=progress)
        if limit is not None and len(sps_nals) > limit:
            raise BadSample(TIMEOUT, name, f"more than {limit} distinct H.264 sequence parameter sets")
    else:
        return
    for nal in sps_nals:
        try:
            sps = parse_h264_sps(nal)
        except ValueError:
            continue  # a malformed SPS: FFmpeg ignores it too
        check_resolution(sps.coded_width, sps.coded_height, name, "declared (H.264 SPS)")
        if bound is not None:
            bound.declared_pixels = max(bound.declared_pixels, sps.coded_width * sps.coded_height)
        if sps.reference_bytes > MAX_REFERENCE_BYTES:
            raise BadSample(ABSURD_RESOLUTION, name, f"H.264 SPS declares {sps.max_num_ref_frames} reference frames "
                                                     f"of {sps.frame_bytes} bytes, more than {MAX_REFERENCE_BYTES} "
                                                     f"bytes with the frame being decoded")


# ---- FFmpeg ---------------------------------------------------------------------------------------

def open_checked(target: str | bytes, bound: WorkBound) -> av.container.InputContainer:
    """Open a checked source with bounded probing, mapping FFmpeg's failures to ``BadSample``."""
    remaining = bound.remaining()
    if remaining is not None and remaining <= 0:
        bound.check_deadline("opening")
    # The open timeout applies to opening and to probing separately: half the budget to each.
    timeout = None if remaining is None else (remaining / 2, remaining)
    try:
        return av.open(io.BytesIO(target) if isinstance(target, bytes) else target, mode="r",
                       options={**bound.probe_options(), "max_pixels": str(MAX_PIXELS)}, timeout=timeout)
    except av.error.ExitError as error:  # only our timeout interrupts FFmpeg
        raise BadSample(TIMEOUT, bound.name, "wall-clock budget for one clip exceeded while FFmpeg "
                                             "opened and probed it") from error
    except av.error.FFmpegError as error:
        raise BadSample(INVALID_CONTAINER, bound.name, f"FFmpeg cannot open it: {error}") from error


def video_stream(container: av.container.InputContainer, name: str, threads: int) -> av.video.stream.VideoStream:
    """The first video stream, after checking its declared frame size, set up to decode."""
    if not container.streams.video:
        kinds = ", ".join(s.type for s in container.streams) or "none"
        raise BadSample(NO_VIDEO_STREAM, name, f"no video stream (streams: {kinds})")
    stream = container.streams.video[0]
    check_resolution(stream.codec_context.width, stream.codec_context.height, name, "declared")
    stream.thread_type = "AUTO"
    stream.codec_context.thread_count = threads
    # The decoder refuses (instead of allocating) any frame above MAX_PIXELS, even one that a
    # parameter set in mid-stream declares.
    stream.codec_context.options = {**stream.codec_context.options, "max_pixels": str(MAX_PIXELS)}
    return stream


def nominal_rate(stream) -> Fraction:
    return Fraction(stream.average_rate or stream.guessed_rate or 25)


def check_resolution(width: int, height: int, name: str, what: str) -> None:
    if width > MAX_SIDE or height > MAX_SIDE or width * height > MAX_PIXELS:
        raise BadSample(ABSURD_RESOLUTION, name, f"{what} frame size {width}x{height} exceeds "
                                                 f"{MAX_SIDE} per side or {MAX_PIXELS} pixels")
