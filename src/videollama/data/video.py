"""Load one clip from a video (``load_clip``): seek, decode, sample frames at a fixed rate, resize, crop, normalise.

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

Work is bounded: the source must be a regular file or bytes, and declared sizes, sample
counts and durations are checked before FFmpeg allocates for them (container.py); the decoder
starts at the keyframe before the window and stops at the first frame past it; and every pass
over the stream (finding the first frame's time, counting frames, measuring the duration, the
window itself) is held to the cap on decoded frames/packets and to the clip's wall-clock budget,
which turn a pathological file into ``BadSample(TIMEOUT)``.
Every unusable input raises ``BadSample`` with one of the reason codes of ``errors.py``: an
FFmpeg error before any frame decodes is ZERO_FRAMES, after one is DECODE_ERROR, and so is a
stream that ends well before its declared duration inside the window (a truncated file).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from fractions import Fraction

import av
import numpy as np
import torch
from av.video.reformatter import VideoReformatter

from videollama.config import IMAGENET_MEAN, IMAGENET_STD
from videollama.data.container import Source
from videollama.data.decoding import OpenedVideo, open_and_time
from videollama.data.errors import DECODE_ERROR, ZERO_FRAMES, BadSample
from videollama.data.frames import resize_crop_frame
from videollama.data.read_policy import DEFAULT_MAX_DECODED_FRAMES, DEFAULT_TIME_BUDGET_S

# Slack when comparing a frame's time with a sample time: absorbs float rounding, far below
# any real frame interval.
_TIME_EPS = 1e-6
# A stream that ends this long before its declared duration is treated as truncated.
_TRUNCATION_SLACK_S = 0.5


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
    max_windows: int | None = None,
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
        max_decoded_frames: cap on packets read and frames decoded by each pass over the
            stream for this clip: the window's, and for a stream that declares no start time or
            duration, the passes that find them.
        time_budget_s: wall-clock cap for this clip, opening and probing included (``None``: no
            wall-clock cap).
        max_windows: the whole-video policy's window budget (``PreprocessConfig.max_windows``);
            one clip is one window and does not use it. Taken so that a model's preprocessing
            spec passes straight through (``load_clip(src, **asdict(model.config.preprocess))``);
            ``videollama.data.windows`` reads whole videos.

    Returns:
        ``(frames, timestamps)``: float32 ``[num_frames, 3, size, size]`` and float64
        ``[num_frames]`` seconds from the first frame of the video stream.

    Raises:
        BadSample: the video cannot be used; ``reason`` says why (NOT_A_FILE for a path to a
            directory, FIFO, device or socket, or a symlink loop).
        FileNotFoundError: ``source`` is a path that does not exist.
    """
    if num_frames < 1 or fps <= 0 or size < 1:
        raise ValueError(f"need num_frames >= 1, fps > 0, size >= 1; got {num_frames}, {fps}, {size}")
    if start is not None and start < 0:
        raise ValueError(f"start must be >= 0 seconds, got {start}")
    if name is None:
        name = f"<{len(source)} bytes>" if isinstance(source, bytes | bytearray | memoryview) else str(source)
    deadline = None if time_budget_s is None else time.monotonic() + time_budget_s

    with open_and_time(source, name, threads, max_decoded_frames, deadline) as video:
        video.check_duration()
        start, crop_fraction = _draw_window(video.duration, num_frames / fps, start, train, generator)
        times = start + np.arange(num_frames, dtype=np.float64) / fps
        # One swscale context for the whole clip: building one per frame (what
        # ``VideoFrame.to_ndarray(width=...)`` does) costs about as much as the scaling itself.
        reformatter = VideoReformatter()
        decoder = _WindowDecoder(video, times, convert=lambda frame: resize_crop_frame(
            frame, size, crop_fraction=crop_fraction, reformatter=reformatter))
        chosen, latest = decoder.run()
        decoder.check_complete(times[-1])
        pixels = _channels_first(chosen, size)  # uint8 (F, 3, S, S)

    timestamps = torch.from_numpy(np.minimum(times, latest))
    return _model_input(pixels, normalize, mean, std), timestamps


def _draw_window(duration: float, window: float, start: float | None, train: bool,
                 generator: torch.Generator | random.Random | None) -> tuple[float, tuple[float, float]]:
    """``(start, crop_fraction)`` of a clip. The random draws happen in a fixed order (start,
    then crop) so that a seeded generator reproduces the same clip."""
    if start is None:
        if duration <= window:
            start = 0.0
        else:
            start = (duration - window) * (_uniform(generator) if train else 0.5)
    crop_fraction = (_uniform(generator), _uniform(generator)) if train else (0.5, 0.5)
    return start, crop_fraction


def _uniform(generator: torch.Generator | random.Random | None) -> float:
    """One draw in [0, 1) from whichever generator the caller uses."""
    if isinstance(generator, random.Random):
        return generator.random()
    return torch.rand((), generator=generator).item()


def _model_input(pixels: np.ndarray, normalize: bool, mean: tuple[float, float, float],
                 std: tuple[float, float, float]) -> torch.Tensor:
    """uint8 (F, 3, S, S) -> float32 (F, 3, S, S): normalised by ``mean`` and ``std`` of 0..1
    values, or plain 0..1 values."""
    frames = torch.from_numpy(pixels).float()  # (F, 3, S, S)
    if normalize:
        # (x / 255 - mean) / std  ==  x * (1 / (255 std)) - mean / std
        std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        frames.mul_(1.0 / (255.0 * std_t)).sub_(mean_t / std_t)
    else:
        frames.div_(255.0)
    return frames


def _channels_first(chosen: list[np.ndarray], size: int) -> np.ndarray:
    """(S, S, 3) per frame -> one contiguous uint8 (F, 3, S, S): channel-first copies of 150 KB
    each are cheap; converting a permuted uint8 view to float in torch is not."""
    pixels = np.empty((len(chosen), 3, size, size), dtype=np.uint8)
    for index, rgb in enumerate(chosen):
        pixels[index] = rgb.transpose(2, 0, 1)
    return pixels


class _WindowDecoder:
    """Seek to the keyframe before the window, decode forward, keep the frame shown at each time."""

    def __init__(self, video: OpenedVideo, times: np.ndarray, *, convert: Callable[[av.VideoFrame], np.ndarray]):
        self.video, self.convert = video, convert
        self.time_base = video.stream.time_base
        # Sample time t shows the last frame with (pts - origin) * time_base <= t: as an
        # integer bound per sample, so that the per-frame test is one integer comparison.
        self.last_pts = [video.origin + math.floor(Fraction(t + _TIME_EPS) / self.time_base) for t in times]
        self.reached_end = False
        self.last_time = 0.0

    def run(self) -> tuple[list[np.ndarray], np.ndarray]:
        """Returns the converted frame chosen for each sample time, and for each sample the latest time it
        may claim: infinity, or for samples past the end of the video, the last frame's time."""
        first_pts = self.last_pts[0]
        seeked = first_pts > self.video.origin and not self.video.timeless
        result = self._decode(start_pts=first_pts if seeked else None, check_overshoot=seeked)
        if result is None:
            # The seek landed after the first sample time (a demuxer that seeks imprecisely):
            # fall back to decoding from the start, still bounded by the frame cap (the frames
            # of both walks count together).
            result = self._decode(start_pts=self.video.origin, check_overshoot=False)
        return result

    def check_complete(self, last_sample: float) -> None:
        """Reaching the end of the stream well before a sample time that the declared duration
        covers means the file lost its tail: refuse it rather than repeat a stale frame."""
        duration = self.video.duration
        if self.reached_end and self.last_time < min(last_sample, duration) - _TRUNCATION_SLACK_S:
            raise BadSample(DECODE_ERROR, self.video.name, f"stream ends at {self.last_time:.2f} s, before its "
                                                           f"declared duration {duration:.2f} s (truncated file?)")

    def _decode(self, *, start_pts: int | None, check_overshoot: bool):
        last_pts, n = self.last_pts, len(self.last_pts)
        self.reached_end = False
        # Frames are converted as soon as they are chosen, once each (a slow or short video
        # repeats frames): holding decoded AVFrames while decoding on is not safe, since the
        # decoder may hand their buffers out again, and would cost memory at high resolutions.
        chosen: list[np.ndarray] = []
        previous_rgb = None
        previous, previous_pts = None, None
        with self.video.frames("decoding the window", start_pts=start_pts) as frames:
            for pts, frame in frames:
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
        # End of stream: the remaining sample times show the last frame.
        self.reached_end = True
        if previous is None and check_overshoot:
            return None  # the seek went past the last frame that exists: retry from the start
        if previous is None:
            raise BadSample(ZERO_FRAMES, self.video.name, "no frame decodes")
        self.last_time = self.video.seconds(previous_pts)
        latest = np.full(n, np.inf)
        latest[len(chosen):] = self.last_time
        if previous_rgb is None:
            previous_rgb = self.convert(previous)
        chosen.extend([previous_rgb] * (n - len(chosen)))
        return chosen, latest
