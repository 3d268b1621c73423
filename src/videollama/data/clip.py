"""Load one clip from a video: seek, decode, sample frames at a fixed rate, resize, crop, normalise.

``load_clip`` is the one place where a video file becomes the model's input, used alike by
training, evaluation and serving (through the preprocessing spec stored with every model).

What "the frame at time t" means here:
    * times are seconds from the video stream's first frame (its ``start_time``), whatever
      the container's own start time, and come from ``pts * time_base``, never from a frame
      index, so variable-frame-rate video is sampled by when frames are really shown (only a
      stream with no timestamps at all, e.g. raw H.264, is timed by frame count at its
      nominal rate);
    * the frame at time ``t`` is the frame on screen at ``t``: the last frame whose
      presentation time is ``<= t`` (with 1 us of slack for the float rounding of
      ``start + i / fps``);
    * a clip of ``num_frames`` frames at ``fps`` covers the window ``[start, start + num_frames / fps)``
      and samples it at ``start + i / fps``. ``start`` is drawn uniformly in training and centred
      in evaluation, among the starts whose window fits inside the video.

Policy for a video shorter than the window (and for any sample time past the end of the
video): the window starts at 0 and the samples past the end repeat the last frame; their
timestamps are clamped to the presentation time of that last frame, so the returned
timestamps always say which moment was really shown.

Resizing uses FFmpeg's swscale through PyAV (bilinear; when shrinking, swscale widens the
filter with the scale factor, so it is antialiased like ``torch`` interpolate with
``antialias=True``), converting YUV to RGB in the same pass: "short side to ``size``, then a
``size x size`` crop" (centred; at a random place in training), done as crop-then-scale so
that only kept pixels are scaled (see ``resize_crop_frame``). Rotation metadata (the display
matrix) is applied last, in multiples of 90 degrees; flips in the matrix are ignored.

Work is bounded: declared sizes and durations are checked before decoding, the decoder starts
at the keyframe before the window and stops at the first frame past it, and a cap on decoded
frames/packets and a wall-clock budget turn a pathological file into ``BadSample(TIMEOUT)``.
Every unusable input raises ``BadSample`` with one of the reason codes of ``errors.py``: an
FFmpeg error before any frame decodes is ZERO_FRAMES, after one is DECODE_ERROR, and so is a
stream that ends well before its declared duration inside the window (a truncated file).
"""

from __future__ import annotations

import io
import math
import os
import random
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from av.video.reformatter import VideoReformatter

from videollama.config import IMAGENET_MEAN, IMAGENET_STD
from videollama.data.errors import (
    ABSURD_DURATION,
    ABSURD_RESOLUTION,
    DECODE_ERROR,
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
# Work bounds for one clip. A 4 s window of a 60 FPS video with a 10 s keyframe interval needs
# about 840 frames; 3000 leaves room for long GOPs while still capping a pathological file.
DEFAULT_MAX_DECODED_FRAMES = 3000
DEFAULT_TIME_BUDGET_S = 60.0
# Slack when comparing a frame's time with a sample time: absorbs float rounding, far below
# any real frame interval.
_TIME_EPS = 1e-6
# A stream that ends this long before its declared duration is treated as truncated.
_TRUNCATION_SLACK_S = 0.5

Source = str | os.PathLike | bytes | bytearray | memoryview


def load_clip(
    source: Source,
    *,
    num_frames: int = 16,
    fps: float = 4.0,
    size: int = 224,
    start: float | None = None,
    train: bool = False,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    generator: torch.Generator | random.Random | None = None,
    normalize: bool = True,
    name: str | None = None,
    threads: int = 1,
    max_decoded_frames: int = DEFAULT_MAX_DECODED_FRAMES,
    time_budget_s: float | None = DEFAULT_TIME_BUDGET_S,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode ``num_frames`` frames at ``fps`` from a video and turn them into model input.

    Args:
        source: a path, or the bytes of a video file (e.g. an mp4 read from a tar shard).
        num_frames, fps: the sampling grid; the window is ``num_frames / fps`` seconds long.
        size: output side; the short side is resized to ``size``, then a square crop.
        start: window start in seconds from the first frame; ``None`` draws it (``train``)
            or centres it (evaluation). Must be ``>= 0``.
        train: random window start and random crop position (from ``generator``).
        mean, std: per-channel normalisation of 0..1 RGB values.
        generator: a ``torch.Generator`` or ``random.Random`` for reproducible draws;
            ``None`` uses torch's global generator.
        normalize: ``False`` returns plain 0..1 RGB floats (tests, contact sheets).
        name: how errors name the source (defaults to the path, or ``<N bytes>``).
        threads: decoder threads (FFmpeg frame/slice threading, ``thread_type="AUTO"``);
            1 is the most work-efficient when data-loader workers already use every core.
        max_decoded_frames: cap on packets read and frames decoded for this clip.
        time_budget_s: wall-clock cap for this clip (``None``: no wall-clock cap).

    Returns:
        ``(frames, timestamps)``: float32 ``[num_frames, 3, size, size]`` and float64
        ``[num_frames]`` seconds from the first frame of the video stream.

    Raises:
        BadSample: the video cannot be used; ``reason`` says why.
        FileNotFoundError: ``source`` is a path that does not exist.
    """
    if num_frames < 1 or fps <= 0 or size < 1:
        raise ValueError(f"need num_frames >= 1, fps > 0, size >= 1; got {num_frames}, {fps}, {size}")
    if start is not None and start < 0:
        raise ValueError(f"start must be >= 0 seconds, got {start}")
    if name is None:
        name = f"<{len(source)} bytes>" if isinstance(source, bytes | bytearray | memoryview) else str(source)
    deadline = None if time_budget_s is None else time.monotonic() + time_budget_s

    container, stream, origin, duration, timeless = _open_and_time(source, name, threads, max_decoded_frames)
    try:
        if duration > MAX_DURATION_S:
            raise BadSample(ABSURD_DURATION, name, f"declared duration {duration:.0f} s exceeds {MAX_DURATION_S:.0f} s")

        # The random draws happen in a fixed order (start, then crop) so that a seeded
        # generator reproduces the same clip.
        window = num_frames / fps
        if start is None:
            if duration <= window:
                start = 0.0
            else:
                start = (duration - window) * (_uniform(generator) if train else 0.5)
        crop_fraction = (_uniform(generator), _uniform(generator)) if train else (0.5, 0.5)
        times = start + np.arange(num_frames, dtype=np.float64) / fps

        # One swscale context for the whole clip: building one per frame (what
        # ``VideoFrame.to_ndarray(width=...)`` does) costs about as much as the scaling itself.
        reformatter = VideoReformatter()
        decoder = _WindowDecoder(
            container, stream, origin=origin, times=times, name=name, can_seek=not timeless,
            convert=lambda frame: resize_crop_frame(frame, size, crop_fraction=crop_fraction,
                                                    reformatter=reformatter),
            max_frames=max_decoded_frames, deadline=deadline,
        )
        chosen, latest = decoder.run()
        # Reaching the end of the stream well before a sample time that the declared duration
        # covers means the file lost its tail: refuse it rather than repeat a stale frame.
        if decoder.reached_end and decoder.last_time < min(times[-1], duration) - _TRUNCATION_SLACK_S:
            raise BadSample(DECODE_ERROR, name, f"stream ends at {decoder.last_time:.2f} s, before its "
                                                f"declared duration {duration:.2f} s (truncated file?)")

        # (S, S, 3) per frame -> one contiguous uint8 (F, 3, S, S): channel-first copies of
        # 150 KB each are cheap; converting a permuted uint8 view to float in torch is not.
        pixels = np.empty((num_frames, 3, size, size), dtype=np.uint8)
        for index, rgb in enumerate(chosen):
            pixels[index] = rgb.transpose(2, 0, 1)
    finally:
        container.close()

    frames = torch.from_numpy(pixels).float()  # (F, 3, S, S)
    if normalize:
        # (x / 255 - mean) / std  ==  x * (1 / (255 std)) - mean / std
        std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        frames.mul_(1.0 / (255.0 * std_t)).sub_(mean_t / std_t)
    else:
        frames.div_(255.0)
    timestamps = torch.from_numpy(np.minimum(times, latest))
    return frames, timestamps


def _open_and_time(source: Source, name: str, threads: int, max_packets: int):
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
        duration = _count_packets(container, stream, name, max_packets) / _nominal_rate(stream)
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
    _check_resolution(stream.codec_context.width, stream.codec_context.height, name, "declared")
    stream.thread_type = "AUTO"
    stream.codec_context.thread_count = threads
    return stream


def _nominal_rate(stream) -> Fraction:
    return Fraction(stream.average_rate or stream.guessed_rate or 25)


def _check_resolution(width: int, height: int, name: str, what: str) -> None:
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


def _uniform(generator: torch.Generator | random.Random | None) -> float:
    """One draw in [0, 1) from whichever generator the caller uses."""
    if isinstance(generator, random.Random):
        return generator.random()
    return torch.rand((), generator=generator).item()


class _WindowDecoder:
    """Seek to the keyframe before the window, decode forward, keep the frame shown at each time."""

    def __init__(self, container, stream, *, origin: int, times: np.ndarray, name: str, can_seek: bool,
                 convert: Callable[[av.VideoFrame], np.ndarray], max_frames: int, deadline: float | None):
        self.container, self.stream, self.origin = container, stream, origin
        self.convert, self.can_seek = convert, can_seek
        self.name = name
        self.max_frames, self.deadline = max_frames, deadline
        self.time_base = stream.time_base
        # In time-base units; only to date a frame that has no pts.
        self.frame_step = max(1, round(1 / (_nominal_rate(stream) * self.time_base)))
        # Sample time t shows the last frame with (pts - origin) * time_base <= t: as an
        # integer bound per sample, so that the per-frame test is one integer comparison.
        self.last_pts = [self.origin + math.floor(Fraction(t + _TIME_EPS) / self.time_base) for t in times]
        self.decoded = 0
        self.packets = 0
        self.reached_end = False
        self.last_time = 0.0

    def run(self) -> tuple[list[np.ndarray], np.ndarray]:
        """Returns the converted frame chosen for each sample time, and for each sample the latest time it
        may claim: infinity, or for samples past the end of the video, the last frame's time."""
        first_pts = self.last_pts[0]
        seeked = first_pts > self.origin and self.can_seek
        if seeked:
            self._seek(first_pts)
        result = self._decode(check_overshoot=seeked)
        if result is None:
            # The seek landed after the first sample time (a demuxer that seeks imprecisely):
            # fall back to decoding from the start, still bounded by the frame cap.
            self._seek(self.origin)
            result = self._decode(check_overshoot=False)
        return result

    def _seek(self, pts: int) -> None:
        try:
            self.container.seek(pts, stream=self.stream, backward=True)
        except av.error.FFmpegError as error:
            raise BadSample(DECODE_ERROR, self.name, f"cannot seek to pts {pts}: {error}") from error
        self.stream.codec_context.flush_buffers()

    def _seconds(self, pts: int) -> float:
        return float((pts - self.origin) * self.time_base)  # exact rational, then rounded once

    def _decode(self, *, check_overshoot: bool):
        last_pts, n = self.last_pts, len(self.last_pts)
        self.reached_end = False
        # Frames are converted as soon as they are chosen, once each (a slow or short video
        # repeats frames): holding decoded AVFrames while decoding on is not safe, since the
        # decoder may hand their buffers out again, and would cost memory at high resolutions.
        chosen: list[np.ndarray] = []
        previous_rgb = None
        previous, previous_pts = None, None
        try:
            for packet in self.container.demux(self.stream):
                self.packets += 1
                self._check_work()
                for frame in self.stream.decode(packet):
                    self.decoded += 1
                    self._check_work()
                    _check_resolution(frame.width, frame.height, self.name, "decoded")
                    if frame.pts is not None:
                        pts = frame.pts
                    else:  # no timestamp: one nominal frame interval after the previous frame
                        pts = self.origin if previous_pts is None else previous_pts + self.frame_step
                    if previous is None and check_overshoot and pts > last_pts[0]:
                        return None
                    # Every sample time before this frame was showing the previous frame.
                    while len(chosen) < n and pts > last_pts[len(chosen)]:
                        if previous is None:  # a sample before the first frame: show the first
                            previous, previous_pts, previous_rgb = frame, pts, None
                        if previous_rgb is None:
                            previous_rgb = self.convert(previous)
                        chosen.append(previous_rgb)
                    if len(chosen) == n:
                        return chosen, np.full(n, np.inf)
                    previous, previous_pts, previous_rgb = frame, pts, None
        except av.error.FFmpegError as error:
            if self.decoded == 0:
                raise BadSample(ZERO_FRAMES, self.name, f"no frame decodes: {error}") from error
            raise BadSample(DECODE_ERROR, self.name, f"decoding failed after {self.decoded} frames: "
                                                     f"{error}") from error
        # End of stream: the remaining sample times show the last frame.
        self.reached_end = True
        if previous is None and check_overshoot:
            return None  # the seek went past the last frame that exists: retry from the start
        if previous is None:
            raise BadSample(ZERO_FRAMES, self.name, "no frame decodes")
        self.last_time = self._seconds(previous_pts)
        latest = np.full(n, np.inf)
        latest[len(chosen):] = self.last_time
        if previous_rgb is None:
            previous_rgb = self.convert(previous)
        chosen.extend([previous_rgb] * (n - len(chosen)))
        return chosen, latest

    def _check_work(self) -> None:
        if self.decoded > self.max_frames or self.packets > self.max_frames:
            raise BadSample(TIMEOUT, self.name, f"more than {self.max_frames} frames or packets for one clip")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise BadSample(TIMEOUT, self.name, "wall-clock budget for one clip exceeded")


def resize_crop_frame(
    frame: av.VideoFrame,
    size: int,
    *,
    crop_fraction: tuple[float, float] = (0.5, 0.5),
    reformatter: VideoReformatter | None = None,
) -> np.ndarray:
    """One decoded frame -> uint8 RGB ``(size, size, 3)``: square crop, resize, rotate.

    The crop is the largest square of the coded frame (its side is the short side), placed
    along the long side by ``crop_fraction`` (x, y) in [0, 1] (0.5 centres it); swscale
    then scales it to ``size x size`` (bilinear, antialiased when shrinking) and converts
    YUV to RGB in the same pass; finally the display matrix's rotation is applied. This is
    "short side to ``size``, then crop", with the crop done first so that swscale scales only
    the pixels kept: for 4:2:0 video (nearly all video) the square is copied out of the
    decoded planes (offsets and side rounded to even, to keep chroma aligned). Other pixel
    formats take the plain route: scale the whole frame, then crop.
    """
    reformatter = reformatter or VideoReformatter()
    width, height = frame.width, frame.height
    quarter_turns = round((frame.rotation or 0) / 90) % 4
    # The crop position is drawn in display coordinates; on a frame shown turned by 90 or
    # 270 degrees the display's x runs along the coded frame's y.
    fraction_x, fraction_y = crop_fraction if quarter_turns % 2 == 0 else crop_fraction[::-1]
    if frame.format.name in ("yuv420p", "yuvj420p") and min(width, height) >= 2:
        side = min(width, height) // 2 * 2
        left = round(fraction_x * (width - side)) // 2 * 2
        top = round(fraction_y * (height - side)) // 2 * 2
        square = _crop_yuv420(frame, left, top, side)
        rgb = reformatter.reformat(square, width=size, height=size, format="rgb24",
                                   interpolation="BILINEAR", threads=1).to_ndarray()
    else:
        short = min(width, height)
        # Round the long side; the short side maps exactly to ``size``.
        new_width = size if width == short else max(size, round(width * size / short))
        new_height = size if height == short else max(size, round(height * size / short))
        # threads=1: swscale's own slice threads only add overhead when every core runs a loader.
        rgb = reformatter.reformat(frame, width=new_width, height=new_height, format="rgb24",
                                   interpolation="BILINEAR", threads=1).to_ndarray()
        top = round(fraction_y * (new_height - size))
        left = round(fraction_x * (new_width - size))
        rgb = rgb[top:top + size, left:left + size]
    if quarter_turns:
        rgb = np.rot90(rgb, k=quarter_turns)  # counter-clockwise, as the display matrix says
    return np.ascontiguousarray(rgb)


def _crop_yuv420(frame: av.VideoFrame, left: int, top: int, side: int) -> av.VideoFrame:
    """A ``side x side`` 4:2:0 frame copied from ``frame`` at (left, top), all even.

    The copy goes into a frame that FFmpeg allocates, so its rows are aligned the way
    swscale's SIMD paths want (a numpy-built frame with odd strides scales slower).
    """
    square = av.VideoFrame(side, side, frame.format.name)
    square.colorspace, square.color_range = frame.colorspace, frame.color_range
    chroma = (left // 2, top // 2, (side + 1) // 2)
    for plane_index, (x, y, extent) in enumerate([(left, top, side), chroma, chroma]):
        source, target = frame.planes[plane_index], square.planes[plane_index]
        source_rows = np.frombuffer(source, np.uint8).reshape(source.height, source.line_size)
        target_rows = np.frombuffer(target, np.uint8).reshape(target.height, target.line_size)
        target_rows[:extent, :extent] = source_rows[y:y + extent, x:x + extent]
    return square
