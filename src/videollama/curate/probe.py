"""``probe_video``: what a raw video is (duration, frame rate, size, codec, frame count).

The file goes through the same checks as ``load_clip`` (``data/container.py``): a regular file,
declared sizes and sample counts checked before FFmpeg sees it, bounded probing, one
``WorkBound`` (packets per pass, wall-clock deadline) for every pass; the first frame is
decoded, so that a file whose header parses but whose frames do not is refused here. Every
unusable file raises ``BadSample`` with a reason code of ``data/errors.py``.
"""

from __future__ import annotations

import time
from pathlib import Path

import av

from videollama.data.container import MAX_DURATION_S, WorkBound, nominal_rate, open_and_time
from videollama.data.errors import ABSURD_DURATION, ZERO_FRAMES, BadSample

# A day of 120 FPS video: the packet cap of one pass over a raw video (curation reads whole files).
MAX_PACKETS = int(MAX_DURATION_S * 120)
DEFAULT_TIME_BUDGET_S = 60.0


def probe_video(path: Path, *, time_budget_s: float | None = DEFAULT_TIME_BUDGET_S,
                max_packets: int = MAX_PACKETS) -> dict:
    """The first video stream's facts, as a dict of plain values.

    Returns ``{"duration_s": float, "fps": float, "width": int, "height": int, "codec": str,
    "n_frames": int}``: ``duration_s`` from the first frame to the end of the last (seconds),
    ``fps`` the stream's nominal rate (``average_rate``, else ``guessed_rate``), ``width`` x
    ``height`` the coded frame size in pixels, ``codec`` FFmpeg's decoder name (e.g. ``"h264"``),
    ``n_frames`` the frame count the container declares, or ``round(duration_s * fps)`` when
    it declares none.

    Raises ``BadSample`` (EMPTY_FILE, NOT_A_FILE, INVALID_CONTAINER, NO_VIDEO_STREAM,
    ZERO_FRAMES, ABSURD_RESOLUTION, ABSURD_DURATION, ABSURD_SAMPLE_COUNT, TIMEOUT) and
    ``FileNotFoundError`` for a missing path.
    """
    name = str(path)
    deadline = None if time_budget_s is None else time.monotonic() + time_budget_s
    container, stream, origin, duration, _timeless = open_and_time(path, name, 1, max_packets, deadline)
    try:
        if duration > MAX_DURATION_S:
            raise BadSample(ABSURD_DURATION, name, f"declared duration {duration:.0f} s exceeds {MAX_DURATION_S:.0f} s")
        fps = float(nominal_rate(stream))
        info = {
            "duration_s": float(duration),
            "fps": fps,
            "width": int(stream.codec_context.width),
            "height": int(stream.codec_context.height),
            "codec": str(stream.codec_context.name),
            "n_frames": int(stream.frames) if stream.frames else int(round(duration * fps)),
        }
        _first_frame(container, stream, WorkBound(name, max_packets, deadline))
    finally:
        container.close()
    return info


def _first_frame(container, stream, bound: WorkBound) -> None:
    """Decode until one frame comes out (``BadSample(ZERO_FRAMES)`` if none does)."""
    packets = 0
    try:
        for packet in container.demux(stream):
            packets += 1
            bound.check(packets, "decoding the first frame")
            for _frame in stream.decode(packet):
                return
    except av.error.FFmpegError as error:
        bound.check_deadline("decoding the first frame")
        raise BadSample(ZERO_FRAMES, bound.name, f"no frame decodes: {error}") from error
    raise BadSample(ZERO_FRAMES, bound.name, "no frame decodes")
