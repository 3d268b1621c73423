"""Opening a video: the container, its first video stream, its time origin and duration, and
the checks of declared sizes that come before any decoding work.

Times are seconds from the video stream's first frame (its ``start_time``), whatever the
container's own start time. A stream with no timestamps at all (raw H.264) is timed by frame
count at its nominal rate.
"""

from __future__ import annotations

import io
import os
from fractions import Fraction
from pathlib import Path

import av

from videollama.data.errors import (
    ABSURD_RESOLUTION,
    EMPTY_FILE,
    INVALID_CONTAINER,
    NO_VIDEO_STREAM,
    TIMEOUT,
    ZERO_FRAMES,
    BadSample,
)

# Limits on what a declared video may be before we spend any work on it.
MAX_SIDE = 8192
MAX_PIXELS = 40_000_000
MAX_DURATION_S = 24 * 3600.0

Source = str | os.PathLike | bytes | bytearray | memoryview


def open_and_time(source: Source, name: str, threads: int, max_packets: int):
    """Open the video and find its time origin and duration.

    Returns ``(container, stream, origin, duration, timeless)``: ``origin`` is the pts of the
    first frame in presentation order, ``duration`` the seconds from it to the end of the last
    frame, and ``timeless`` says that the frames carry no timestamps at all (raw elementary
    streams), so that they are timed by frame count at the stream's nominal rate.
    """
    container = _open(source, name)
    try:
        stream = _video_stream(container, name, threads)
        if stream.start_time is not None:
            origin = stream.start_time
            return container, stream, origin, _duration(container, stream, origin, name, max_packets), False
        # No declared start: decode the first frame to find its pts, then rewind by reopening,
        # which works for every input (raw streams cannot seek).
        origin = _first_pts(container, stream, name)
        container.close()
        container = _open(source, name)
        stream = _video_stream(container, name, threads)
        if origin is not None:
            return container, stream, origin, _duration(container, stream, origin, name, max_packets), False
        if stream.duration:
            return container, stream, 0, float(stream.duration * stream.time_base), True
        duration = _count_packets(container, stream, name, max_packets) / nominal_rate(stream)
        container.close()
        container = _open(source, name)
        return container, _video_stream(container, name, threads), 0, float(duration), True
    except BaseException:
        container.close()
        raise


def _open(source: Source, name: str) -> av.container.InputContainer:
    """Open a container, mapping empty and unreadable input to ``BadSample``."""
    if isinstance(source, bytes | bytearray | memoryview):
        if len(source) == 0:
            raise BadSample(EMPTY_FILE, name, "zero bytes")
        target = io.BytesIO(bytes(source))
    else:
        path = Path(source)
        if path.stat().st_size == 0:  # raises FileNotFoundError, naming the path, when missing
            raise BadSample(EMPTY_FILE, name, "zero bytes")
        target = str(path)
    try:
        return av.open(target, mode="r")
    except av.error.FFmpegError as error:
        raise BadSample(INVALID_CONTAINER, name, f"FFmpeg cannot open it: {error}") from error


def _video_stream(container: av.container.InputContainer, name: str, threads: int) -> av.video.stream.VideoStream:
    """The first video stream, after checking its declared frame size, set up to decode."""
    if not container.streams.video:
        kinds = ", ".join(s.type for s in container.streams) or "none"
        raise BadSample(NO_VIDEO_STREAM, name, f"no video stream (streams: {kinds})")
    stream = container.streams.video[0]
    check_resolution(stream.codec_context.width, stream.codec_context.height, name, "declared")
    stream.thread_type = "AUTO"
    stream.codec_context.thread_count = threads
    return stream


def nominal_rate(stream) -> Fraction:
    return Fraction(stream.average_rate or stream.guessed_rate or 25)


def check_resolution(width: int, height: int, name: str, what: str) -> None:
    if width > MAX_SIDE or height > MAX_SIDE or width * height > MAX_PIXELS:
        raise BadSample(ABSURD_RESOLUTION, name, f"{what} frame size {width}x{height} exceeds "
                                                 f"{MAX_SIDE} per side or {MAX_PIXELS} pixels")


def _first_pts(container, stream, name: str) -> int | None:
    """The first frame's pts (None: it has none), for streams that declare no start time."""
    try:
        for frame in container.decode(stream):
            return frame.pts
    except av.error.FFmpegError as error:
        raise BadSample(ZERO_FRAMES, name, f"no frame decodes: {error}") from error
    raise BadSample(ZERO_FRAMES, name, "no frame decodes")


def _count_packets(container, stream, name: str, max_packets: int) -> int:
    """Video packets of a freshly opened container (frames, for a stream without timestamps)."""
    count = 0
    try:
        for packet in container.demux(stream):
            count += 1 if packet.size else 0
            if count > max_packets:
                raise BadSample(TIMEOUT, name, f"more than {max_packets} packets while counting frames")
    except av.error.FFmpegError as error:
        raise BadSample(INVALID_CONTAINER, name, f"cannot read packets: {error}") from error
    return count


def _duration(container, stream, origin: int, name: str, max_packets: int) -> float:
    """Seconds from the first frame to the end of the last one.

    The stream's own duration when declared (mp4, MPEG-TS); otherwise (e.g. Matroska, whose
    container duration is not relative to the first frame) the end of the last packet, found
    by seeking to the last keyframe and reading the packets after it without decoding them.
    """
    tb = stream.time_base
    if stream.duration:
        return float(stream.duration * tb)
    end = None
    try:
        container.seek(2**62, stream=stream, backward=True)
        end = _last_packet_end(container, stream, name, max_packets)
    except av.error.FFmpegError:
        end = None
    if end is None:  # seeking failed or found nothing: read every packet from the start
        try:
            container.seek(origin, stream=stream, backward=True)
            end = _last_packet_end(container, stream, name, max_packets)
        except av.error.FFmpegError as error:
            raise BadSample(INVALID_CONTAINER, name, f"cannot read packets: {error}") from error
    try:
        container.seek(origin, stream=stream, backward=True)
    except av.error.FFmpegError as error:
        raise BadSample(INVALID_CONTAINER, name, f"cannot seek back to the start: {error}") from error
    if end is None:
        raise BadSample(ZERO_FRAMES, name, "the video stream has no packets")
    return float((end - origin) * tb)


def _last_packet_end(container, stream, name: str, max_packets: int) -> int | None:
    end = None
    for count, packet in enumerate(container.demux(stream)):
        if count > max_packets:
            raise BadSample(TIMEOUT, name, f"more than {max_packets} packets while measuring the duration")
        if packet.pts is not None:
            end = max(end or packet.pts, packet.pts + (packet.duration or 0))
    return end
