"""A checked video opened for decoding (``open_and_time``: its time origin and duration), and the
one bounded walk over its frames (``OpenedVideo.frames``) that every reader of frames uses:
``load_clip``'s window (video.py), and curation's probe, shot detector and one-pass stage.

Times are seconds from the video stream's first frame (its ``start_time``), whatever the
container's own start time. A stream with no timestamps at all (raw H.264) is timed by frame
count at its nominal rate.

One walk over the frames::

    with open_and_time(source, name, threads, max_packets, deadline) as video:
        with video.frames("decoding the window", start_pts=pts) as frames:
            for pts, frame in frames:
                ...  # the caller's own work on each frame; ``break`` when done

* every packet read and every frame decoded is counted, and the opening's one ``WorkBound``
  (``video.bound``) is checked at each: TIMEOUT past ``max_packets`` packets or frames (the
  walks of one opening count together), or past the deadline;
* every decoded frame's size is checked (ABSURD_RESOLUTION) before the caller sees it;
* a frame's pts is its own or, when it has none, the previous frame's plus one nominal frame
  interval (``origin`` for the first);
* an FFmpeg error inside the ``with`` block, from the decoder or from the caller's own work on
  a frame (swscale, x264), is a TIMEOUT when the deadline interrupted FFmpeg, else ZERO_FRAMES
  while no frame has been decoded and DECODE_ERROR after.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import av

from videollama.data.container import (
    MAX_DURATION_S,
    Source,
    WorkBound,
    check_resolution,
    checked_source,
    nominal_rate,
    open_checked,
    video_stream,
)
from videollama.data.errors import ABSURD_DURATION, DECODE_ERROR, INVALID_CONTAINER, ZERO_FRAMES, BadSample


@dataclass
class OpenedVideo:
    """An open video stream and its timing (``open_and_time``); a context manager that closes it.

    ``origin``: the pts of the first frame in presentation order; ``duration``: seconds from it
    to the end of the last frame; ``timeless``: the frames carry no timestamps at all (raw
    elementary streams), so they are timed by frame count at the nominal rate; ``bound``: the
    work this opening may cost. ``packets`` and ``decoded`` count the work of its frame walks.
    """

    container: av.container.InputContainer
    stream: av.video.stream.VideoStream
    origin: int
    duration: float
    timeless: bool
    bound: WorkBound
    packets: int = 0
    decoded: int = 0

    @property
    def name(self) -> str:
        return self.bound.name

    def seconds(self, pts: int) -> float:
        """Seconds from the first frame of a pts (an exact rational, rounded once)."""
        return float((pts - self.origin) * self.stream.time_base)

    def check_duration(self) -> None:
        """``BadSample(ABSURD_DURATION)`` for a video longer than ``MAX_DURATION_S``."""
        if self.duration > MAX_DURATION_S:
            raise BadSample(ABSURD_DURATION, self.name, f"declared duration {self.duration:.0f} s exceeds "
                                                        f"{MAX_DURATION_S:.0f} s")

    def frames(self, doing: str, *, start_pts: int | None = None) -> FrameWalk:
        """One bounded walk over the frames, in decoding order, as ``(pts, frame)`` (module
        docstring); ``start_pts``: seek first to the keyframe at or before it. ``doing`` names
        the walk in TIMEOUT messages."""
        return FrameWalk(self, doing, start_pts)

    def first_frame(self, doing: str) -> av.VideoFrame:
        """The first frame that decodes (``BadSample(ZERO_FRAMES)`` when none does)."""
        with self.frames(doing) as frames:
            for _pts, frame in frames:
                return frame
        raise BadSample(ZERO_FRAMES, self.name, "no frame decodes")

    def close(self) -> None:
        self.container.close()

    def __enter__(self) -> OpenedVideo:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FrameWalk:
    """``OpenedVideo.frames``: iterate it for ``(pts, frame)``, inside its ``with`` block, which
    turns FFmpeg errors into ``BadSample`` (module docstring)."""

    def __init__(self, video: OpenedVideo, doing: str, start_pts: int | None):
        self.video, self.doing, self.start_pts = video, doing, start_pts
        self._walk = None

    def __enter__(self) -> FrameWalk:
        return self

    def __iter__(self) -> Iterator[tuple[int, av.VideoFrame]]:
        self._walk = self._frames()
        return self._walk

    def __exit__(self, kind, error, traceback) -> bool:
        if self._walk is not None:
            self._walk.close()  # a walk left early lets go of the demuxer (and its read timeout) now
        if isinstance(error, av.error.FFmpegError):
            self.video.bound.check_deadline(self.doing)  # FFmpeg interrupted at the deadline
            if self.video.decoded == 0:
                raise BadSample(ZERO_FRAMES, self.video.name, f"no frame decodes: {error}") from error
            raise BadSample(DECODE_ERROR, self.video.name, f"decoding failed after {self.video.decoded} frames: "
                                                           f"{error}") from error
        return False

    def _frames(self) -> Iterator[tuple[int, av.VideoFrame]]:
        video, stream = self.video, self.video.stream
        if self.start_pts is not None:
            self._seek(self.start_pts)
        # One nominal frame interval in time-base units: only to date a frame that has no pts.
        step = max(1, round(1 / (nominal_rate(stream) * stream.time_base)))
        previous = None
        for packet in video.container.demux(stream):
            video.packets += 1
            self._check()
            for frame in stream.decode(packet):
                video.decoded += 1
                self._check()
                check_resolution(frame.width, frame.height, video.name, "decoded")
                if frame.pts is not None:
                    pts = frame.pts
                else:
                    pts = video.origin if previous is None else previous + step
                previous = pts
                yield pts, frame

    def _seek(self, pts: int) -> None:
        try:
            self.video.container.seek(pts, stream=self.video.stream, backward=True)
        except av.error.FFmpegError as error:
            raise BadSample(DECODE_ERROR, self.video.name, f"cannot seek to pts {pts}: {error}") from error
        self.video.stream.codec_context.flush_buffers()

    def _check(self) -> None:
        self.video.bound.check(max(self.video.decoded, self.video.packets), self.doing)


def open_and_time(source: Source, name: str, threads: int, max_packets: int,
                  deadline: float | None = None) -> OpenedVideo:
    """Check the source, open the video and find its time origin and duration.

    Each pass over the stream (here: finding the first frame's pts, counting packets, measuring
    the duration; then the caller's frame walks) reads at most ``max_packets`` packets, and all
    stop at ``deadline`` (``time.monotonic()``; ``None``: none).
    """
    bound = WorkBound(name, max_packets, deadline)
    bound.check_deadline("opening")
    target = checked_source(source, name, bound)
    container = open_checked(target, bound)
    try:
        stream = video_stream(container, name, threads)
        if stream.start_time is not None:
            origin = stream.start_time
            return OpenedVideo(container, stream, origin, _duration(container, stream, origin, bound), False, bound)
        # No declared start: decode the first frame to find its pts, then rewind by reopening,
        # which works for every input (raw streams cannot seek). The origin is not known yet.
        searching = OpenedVideo(container, stream, 0, 0.0, True, bound)
        origin = searching.first_frame("looking for the first frame").pts
        container.close()
        container = open_checked(target, bound)
        stream = video_stream(container, name, threads)
        if origin is not None:
            return OpenedVideo(container, stream, origin, _duration(container, stream, origin, bound), False, bound)
        if stream.duration:
            return OpenedVideo(container, stream, 0, float(stream.duration * stream.time_base), True, bound)
        duration = _count_packets(container, stream, bound) / nominal_rate(stream)
        container.close()
        container = open_checked(target, bound)
        return OpenedVideo(container, video_stream(container, name, threads), 0, float(duration), True, bound)
    except BaseException:
        container.close()
        raise


# ---- the passes that time a stream: packets only, nothing decoded --------------------------------

def _count_packets(container, stream, bound: WorkBound) -> int:
    """Video packets of a freshly opened container (frames, for a stream without timestamps)."""
    count = 0
    try:
        for packet in container.demux(stream):
            count += 1 if packet.size else 0
            bound.check(count, "counting frames")
    except av.error.FFmpegError as error:
        bound.check_deadline("counting frames")
        raise BadSample(INVALID_CONTAINER, bound.name, f"cannot read packets: {error}") from error
    return count


def _duration(container, stream, origin: int, bound: WorkBound) -> float:
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
        end = _last_packet_end(container, stream, bound)
    except av.error.FFmpegError:
        bound.check_deadline("measuring the duration")
        end = None
    if end is None:  # seeking failed or found nothing: read every packet from the start
        try:
            container.seek(origin, stream=stream, backward=True)
            end = _last_packet_end(container, stream, bound)
        except av.error.FFmpegError as error:
            bound.check_deadline("measuring the duration")
            raise BadSample(INVALID_CONTAINER, bound.name, f"cannot read packets: {error}") from error
    try:
        container.seek(origin, stream=stream, backward=True)
    except av.error.FFmpegError as error:
        raise BadSample(INVALID_CONTAINER, bound.name, f"cannot seek back to the start: {error}") from error
    if end is None:
        raise BadSample(ZERO_FRAMES, bound.name, "the video stream has no packets")
    return float((end - origin) * tb)


def _last_packet_end(container, stream, bound: WorkBound) -> int | None:
    end = None
    for count, packet in enumerate(container.demux(stream), start=1):
        bound.check(count, "measuring the duration")
        if packet.pts is not None:
            end = max(end or packet.pts, packet.pts + (packet.duration or 0))
    return end
