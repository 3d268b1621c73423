"""``probe_video``: what a raw video is (duration, frame rate, size, codec, frame count).

The file goes through the same checks as ``load_clip`` (``data/container.py``, ``data/decoding.py``):
a regular file, declared sizes and sample counts checked before FFmpeg sees it, bounded probing,
one ``WorkBound`` (packets per pass, wall-clock deadline) for every pass; the first frame is
decoded (``OpenedVideo.first_frame``), so that a file whose header parses but whose frames do not is refused here. Every
unusable file raises ``BadSample`` with a reason code of ``data/errors.py``.
"""

from __future__ import annotations

import time
from pathlib import Path

from videollama.data.container import MAX_DURATION_S, nominal_rate
from videollama.data.decoding import open_and_time

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
    with open_and_time(path, name, 1, max_packets, deadline) as video:
        video.check_duration()
        stream, duration = video.stream, video.duration
        fps = float(nominal_rate(stream))
        info = {
            "duration_s": float(duration),
            "fps": fps,
            "width": int(stream.codec_context.width),
            "height": int(stream.codec_context.height),
            "codec": str(stream.codec_context.name),
            "n_frames": int(stream.frames) if stream.frames else int(round(duration * fps)),
        }
        video.first_frame("decoding the first frame")
    return info
