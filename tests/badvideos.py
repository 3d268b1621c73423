"""Small synthetic videos for tests: well-formed ones with chosen quirks, and broken ones.

Every generator returns the bytes of a file, so that tests can use them as paths (write
them under ``tmp_path``) or as tar-shard members. ``BAD_VIDEOS`` maps a name to the
generator and the ``BadSample`` reason that ``load_clip`` must raise for it; the shard
pipeline's fuzz test reuses the same table.
"""

from __future__ import annotations

import io
import struct
import tempfile
from collections.abc import Callable, Sequence
from fractions import Fraction
from functools import cache
from pathlib import Path

import av
import numpy as np

from videollama.data import errors


def pattern_frame(index: int, width: int, height: int) -> np.ndarray:
    """A frame that differs from its neighbours and is asymmetric (to see rotations).

    uint8 ``(height, width, 3)``: a horizontal/vertical gradient that shifts with ``index``,
    plus a bright block in the top-left corner.
    """
    ys, xs = np.mgrid[0:height, 0:width]
    rgb = np.stack([(xs * 255 // max(width - 1, 1) + 7 * index) % 256,
                    (ys * 255 // max(height - 1, 1) + 3 * index) % 256,
                    np.full_like(xs, (40 * index) % 256)], axis=-1).astype(np.uint8)
    rgb[: max(height // 4, 1), : max(width // 4, 1)] = 255
    return rgb


def encode_video(
    *,
    width: int = 64,
    height: int = 48,
    num_frames: int = 25,
    rate: int = 25,
    pts: Sequence[int] | None = None,
    time_base: tuple[int, int] | None = None,
    fmt: str = "mp4",
    codec: str = "libx264",
    rotation: int | None = None,
    gop: int | None = None,
    movflags: str | None = None,
    frame_fn: Callable[[int, int, int], np.ndarray] = pattern_frame,
) -> bytes:
    """Encode ``num_frames`` pattern frames and return the file's bytes.

    ``pts`` (in units of ``time_base``, default ``1/rate``) gives each frame's presentation
    time, for variable frame rate or a non-zero start; ``rotation`` writes a display matrix
    (degrees counter-clockwise); ``gop`` sets the keyframe interval.
    """
    pts = list(range(num_frames)) if pts is None else list(pts)
    with tempfile.TemporaryDirectory() as tmp:
        # A real file, not BytesIO: the mp4 muxer needs to seek back (faststart, moov).
        path = Path(tmp) / f"video.{'mkv' if fmt == 'matroska' else fmt}"
        with av.open(str(path), "w", format=fmt, options={"movflags": movflags} if movflags else {}) as out:
            stream = out.add_stream(codec, rate=rate)
            stream.width, stream.height = width, height
            stream.pix_fmt = "rgb24" if codec == "png" else "yuv420p"
            stream.codec_context.thread_count = 1  # threaded x264 output differs from run to run
            if time_base is not None:
                stream.time_base = stream.codec_context.time_base = Fraction(*time_base)
            if gop is not None:
                stream.codec_context.gop_size = gop
                if codec == "libx264":
                    stream.codec_context.options = {"keyint_min": str(gop), "sc_threshold": "0"}
            if rotation is not None:
                stream.set_display_rotation(rotation)
            for index, frame_pts in enumerate(pts):
                frame = av.VideoFrame.from_ndarray(frame_fn(index, width, height), format="rgb24")
                frame.pts = frame_pts
                out.mux(stream.encode(frame))
            out.mux(stream.encode())
        return path.read_bytes()


def top_level_boxes(data: bytes) -> list[tuple[bytes, int, int]]:
    """The top-level ISO-BMFF boxes of an mp4 as ``(type, offset, size)``."""
    boxes, offset = [], 0
    while offset + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[offset:offset + 8])
        if size < 8:
            break
        boxes.append((kind, offset, size))
        offset += size
    return boxes


def _box(data: bytes, kind: bytes) -> tuple[int, int]:
    for found, offset, size in top_level_boxes(data):
        if found == kind:
            return offset, size
    raise ValueError(f"no {kind!r} box")


# ---- broken files, one per BadSample reason ------------------------------------------------

def empty_file() -> bytes:
    return b""


def garbage() -> bytes:
    return b"this is not a video, just text pretending to be one. " * 40


def mp4_without_moov() -> bytes:
    """An mp4 whose moov atom (written last by default) was lost with the file's tail."""
    data = encode_video(num_frames=20)
    moov_offset, _ = _box(data, b"moov")
    return data[:moov_offset]


def audio_only() -> bytes:
    """A valid mp4 holding one AAC audio stream and no video."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=16000)
        samples = (np.sin(np.arange(16000) * 2 * np.pi * 440 / 16000) * 0.3).astype(np.float32)
        frame = av.AudioFrame.from_ndarray(samples[None, :], format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 16000, 0
        out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return buffer.getvalue()


def zero_frames() -> bytes:
    """An mp4 with a valid header and index, whose every sample is zeros: nothing decodes."""
    data = bytearray(encode_video(num_frames=10))
    offset, size = _box(bytes(data), b"mdat")
    data[offset + 8:offset + size] = bytes(size - 8)
    return bytes(data)


def absurd_resolution() -> bytes:
    """A YUV4MPEG2 header declaring 9000x100 frames (the y4m demuxer trusts its header)."""
    return b"YUV4MPEG2 W9000 H100 F25:1 Ip A1:1 C420jpeg\nFRAME\n" + bytes(9000 * 100 * 3 // 2)


def absurd_duration() -> bytes:
    """Two frames 25 hours apart: a valid mp4 whose video lasts longer than a day."""
    return encode_video(num_frames=2, pts=[0, 25 * 3600 * 25])


def truncated_mp4() -> bytes:
    """A faststart mp4 (moov first) cut in the middle of its media data."""
    data = encode_video(num_frames=100, movflags="faststart")
    return data[: len(data) // 2]


def corrupt_mid_stream() -> bytes:
    """A PNG-in-mp4 video whose middle frames are overwritten: decoding fails part-way."""
    data = bytearray(encode_video(num_frames=10, codec="png"))
    offset, size = _box(bytes(data), b"mdat")
    middle, span = offset + size // 2, size // 8  # stay well inside mdat
    data[middle:middle + span] = bytes(span)
    return bytes(data)


@cache
def too_many_frames() -> bytes:
    """3100 frames at 800 FPS with a single keyframe: any window needs > 3000 decoded frames."""
    return encode_video(width=16, height=16, num_frames=3100, rate=800, gop=100000,
                        frame_fn=lambda i, w, h: np.full((h, w, 3), i % 256, np.uint8))


BAD_VIDEOS: dict[str, tuple[Callable[[], bytes], str]] = {
    "empty_file": (empty_file, errors.EMPTY_FILE),
    "garbage": (garbage, errors.INVALID_CONTAINER),
    "mp4_without_moov": (mp4_without_moov, errors.INVALID_CONTAINER),
    "audio_only": (audio_only, errors.NO_VIDEO_STREAM),
    "zero_frames": (zero_frames, errors.ZERO_FRAMES),
    "absurd_resolution": (absurd_resolution, errors.ABSURD_RESOLUTION),
    "absurd_duration": (absurd_duration, errors.ABSURD_DURATION),
    "truncated_mp4": (truncated_mp4, errors.DECODE_ERROR),
    "corrupt_mid_stream": (corrupt_mid_stream, errors.DECODE_ERROR),
    "too_many_frames": (too_many_frames, errors.TIMEOUT),
}
