"""Whole videos as windows: the sampling policy every model carries, and the one pass that decodes
the frames of the windows it chooses, a few windows at a time.

A window is the model's clip: ``num_frames`` frames ``1 / fps`` apart, spanning
``window_s = num_frames / fps`` seconds (``PreprocessConfig``). The policy (``window_starts``):

* a video of duration D needs ``n = ceil(D / window_s)`` windows to be covered (at least one);
* while ``n <= max_windows`` they **tile** it: starts 0, window_s, 2 window_s, ..., the last one
  moved back to end where the video ends (``D - window_s``), so that no sample lies past the end;
  a video shorter than one window is one window at 0 whose samples past the end repeat the last
  frame, as ``load_clip`` does;
* when ``n > max_windows`` the ``max_windows`` windows are **spread** evenly: starts equally
  spaced from 0 to ``D - window_s``.

A 4-second clip is one window at time 0. Times are seconds from the video's first frame, and the
frame at time t is the one on screen at t (``load_clip``'s rule, from presentation times).

Decoding (``WholeVideo.chunks``): the windows' sample times are walked in order through the one
bounded frame walk (``data/decoding.py``). Windows close together are decoded in one pass; before
a window far from the previous one the walk seeks instead, when the gap is longer than the
longest keyframe interval seen so far (seeking lands on the keyframe before the window, so it never
decodes more than a sequential pass would, give or take one interval). Windows come out a chunk
at a time (``windows_per_chunk``) and their frames are then dropped: a caller that encodes each
chunk before asking for the next holds latents, never the whole video's frames.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch
from av.video.reformatter import VideoReformatter

from videollama.config import PreprocessConfig
from videollama.data.container import Source
from videollama.data.decoding import OpenedVideo, open_and_time
from videollama.data.errors import DECODE_ERROR, ZERO_FRAMES, BadSample
from videollama.data.frames import resize_crop_frame
from videollama.data.read_policy import DEFAULT_MAX_DECODED_FRAMES, DEFAULT_WHOLE_VIDEO_BUDGET_S

# Frames per second of video that the frame cap allows (a 120 FPS video, twice over).
_FRAMES_PER_SECOND_CAP = 240
# Before any keyframe interval is seen, windows closer than this are decoded in one pass.
_DEFAULT_KEYFRAME_INTERVAL_S = 10.0
_TIME_EPS = 1e-6
_TRUNCATION_SLACK_S = 0.5


def window_starts(duration: float, window_s: float, max_windows: int) -> list[float]:
    """The policy (module docstring): each window's start, seconds from the video's start."""
    if window_s <= 0 or max_windows < 1:
        raise ValueError(f"need window_s > 0 and max_windows >= 1, got {window_s}, {max_windows}")
    if duration <= window_s:
        return [0.0]
    needed = math.ceil(duration / window_s - 1e-9)
    last = duration - window_s
    if needed <= max_windows:
        return [min(k * window_s, last) for k in range(needed)]
    if max_windows == 1:
        return [last / 2]  # one window for a long video: its middle, as a clip is taken
    return [last * k / (max_windows - 1) for k in range(max_windows)]


def sample_times(starts: list[float], num_frames: int, fps: float) -> np.ndarray:
    """[W, F] sample times: window w's frames at ``starts[w] + i / fps``."""
    return np.asarray(starts, dtype=np.float64)[:, None] + np.arange(num_frames, dtype=np.float64)[None] / fps


@dataclass
class WindowChunk:
    """Consecutive windows of a video: ``frames`` [w, F, 3, S, S] (float32, normalised as the model
    expects, or 0..1 RGB), ``times`` [w, F] float64 (the moment each frame shows: its sample time,
    or for a sample past the end of the video the last frame's time), ``first`` the index of its
    first window."""

    first: int
    frames: torch.Tensor
    times: torch.Tensor


class WholeVideo:
    """An opened video and the windows its model's policy picks (:func:`open_windows`).

    ``duration`` (s), ``starts`` (one per window), ``times`` [W, F] (sample times);
    :meth:`chunks` decodes them; use it as a context manager (it closes the file)."""

    def __init__(self, video: OpenedVideo, preprocess: PreprocessConfig, normalize: bool):
        self.video, self.pre, self.normalize = video, preprocess, normalize
        self.duration = video.duration
        self.starts = window_starts(video.duration, preprocess.window_s, preprocess.max_windows)
        self.times = sample_times(self.starts, preprocess.num_frames, preprocess.fps)

    @property
    def num_windows(self) -> int:
        return len(self.starts)

    def chunks(self, windows_per_chunk: int = 8) -> Iterator[WindowChunk]:
        """The windows in order, ``windows_per_chunk`` at a time (module docstring)."""
        if windows_per_chunk < 1:
            raise ValueError(f"windows_per_chunk must be >= 1, got {windows_per_chunk}")
        walker = _SampleWalker(self.video, self.times, self.pre.size)
        pixels: dict[int, np.ndarray] = {}  # flat sample index -> uint8 [S, S, 3], until its chunk leaves
        f, total = self.pre.num_frames, self.num_windows
        have = [0] * total  # samples decoded per window
        first = complete = 0  # the next window to hand out; every window before `complete` is whole
        for index, rgb in walker.run():
            pixels[index] = rgb
            have[index // f] += 1
            while complete < total and have[complete] == f:
                complete += 1
            while first < total and complete >= min(first + windows_per_chunk, total):
                last = min(first + windows_per_chunk, total)
                yield self._chunk(first, last, pixels, walker.latest)
                for k in range(first * f, last * f):
                    pixels.pop(k)
                first = last
        walker.check_complete()

    def _chunk(self, first: int, last: int, pixels: dict[int, np.ndarray], latest: np.ndarray) -> WindowChunk:
        f, size = self.pre.num_frames, self.pre.size
        out = np.empty(((last - first) * f, 3, size, size), dtype=np.uint8)
        for j, k in enumerate(range(first * f, last * f)):
            out[j] = pixels[k].transpose(2, 0, 1)
        frames = torch.from_numpy(out).float().view(last - first, f, 3, size, size)
        if self.normalize:
            std = torch.tensor(self.pre.std, dtype=torch.float32).view(3, 1, 1)
            mean = torch.tensor(self.pre.mean, dtype=torch.float32).view(3, 1, 1)
            frames.mul_(1.0 / (255.0 * std)).sub_(mean / std)  # (x / 255 - mean) / std, as load_clip
        else:
            frames.div_(255.0)
        times = np.minimum(self.times[first:last], latest.reshape(self.times.shape)[first:last])
        return WindowChunk(first=first, frames=frames, times=torch.from_numpy(times))

    def close(self) -> None:
        self.video.close()

    def __enter__(self) -> WholeVideo:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_windows(source: Source, preprocess: PreprocessConfig, *, name: str | None = None, normalize: bool = True,
                 threads: int = 1, max_decoded_frames: int | None = None,
                 time_budget_s: float | None = DEFAULT_WHOLE_VIDEO_BUDGET_S) -> WholeVideo:
    """Open a video (checked and bounded as ``load_clip`` opens one) and choose its windows.

    max_decoded_frames: cap on packets and frames decoded in all (None: ``_FRAMES_PER_SECOND_CAP``
    per second of the declared duration, and at least ``load_clip``'s cap); time_budget_s: the
    wall-clock budget of opening and every chunk (None: none)."""
    if name is None:
        name = f"<{len(source)} bytes>" if isinstance(source, bytes | bytearray | memoryview) else str(source)
    deadline = None if time_budget_s is None else time.monotonic() + time_budget_s
    video = open_and_time(source, name, threads, max_decoded_frames or DEFAULT_MAX_DECODED_FRAMES, deadline)
    try:
        video.check_duration()
        if max_decoded_frames is None:  # sized by the declared duration, now that it is known
            video.bound.max_items = max(DEFAULT_MAX_DECODED_FRAMES,
                                        math.ceil(video.duration * _FRAMES_PER_SECOND_CAP))
        return WholeVideo(video, preprocess, normalize)
    except BaseException:
        video.close()
        raise


def load_windows(source: Source, preprocess: PreprocessConfig, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Every window at once: ``(frames [W, F, 3, S, S], times [W, F])``. For short videos and tests;
    a long video should go through :meth:`WholeVideo.chunks` and be encoded chunk by chunk."""
    with open_windows(source, preprocess, **kwargs) as whole:
        chunks = list(whole.chunks(windows_per_chunk=whole.num_windows))
    return chunks[0].frames, chunks[0].times


class _SampleWalker:
    """The frame shown at each sample time, converted once, in the order of the times.

    Sample times (flat, all windows) are visited sorted; windows far apart are reached by a seek
    (module docstring). ``latest`` says, per sample, the latest time it may claim (infinity, or the
    last frame's time for samples past the end of the stream)."""

    def __init__(self, video: OpenedVideo, times: np.ndarray, size: int):
        self.video, self.size = video, size
        flat = times.reshape(-1)
        self.order = np.argsort(flat, kind="stable")
        tb = video.stream.time_base
        # Sample t shows the last frame with (pts - origin) * time_base <= t (integer bounds).
        self.bound_pts = [video.origin + math.floor(Fraction(float(flat[i]) + _TIME_EPS) / tb) for i in self.order]
        self.sorted_times = flat[self.order]
        self.latest = np.full(len(flat), np.inf)
        self.reformatter = VideoReformatter()
        self.keyframe_gap_s = 0.0  # the longest keyframe interval seen (0: none seen yet)
        self.last_keyframe: float | None = None
        # Raw streams cannot seek; nor, after it once seeked past its target, does a demuxer.
        self.can_seek = not video.timeless
        self.reached_end, self.last_time = False, 0.0

    def run(self) -> Iterator[tuple[int, np.ndarray]]:
        """(flat sample index, uint8 [S, S, 3]) for every sample, in time order."""
        done, first = 0, True
        while done < len(self.order):
            done = yield from self._walk(done, self._seek_target(done, first))
            first = False

    def check_complete(self) -> None:
        """A stream that ends well before what its declared duration covers lost its tail."""
        last = min(float(self.sorted_times[-1]), self.video.duration)
        if self.reached_end and self.last_time < last - _TRUNCATION_SLACK_S:
            raise BadSample(DECODE_ERROR, self.video.name, f"stream ends at {self.last_time:.2f} s, before its "
                                                           f"declared duration {self.video.duration:.2f} s (truncated file?)")

    def _convert(self, frame) -> np.ndarray:
        return resize_crop_frame(frame, self.size, crop_fraction=(0.5, 0.5), reformatter=self.reformatter)

    def _seek_target(self, done: int, first: bool) -> int | None:
        """Where a walk from sample ``done`` starts: None (the freshly opened file's start), or the
        pts to seek to (the sample's, or the origin once seeking has been given up)."""
        if first:
            target = self.bound_pts[0]
            return target if target > self.video.origin and self.can_seek else None
        return self.bound_pts[done] if self.can_seek else self.video.origin

    def _walk(self, done: int, start_pts: int | None):
        """One walk from sample ``done`` (seeking to ``start_pts`` first, if given); returns the number
        of samples done when it stops: at the end of the stream, or before a gap worth a seek."""
        overshoot_check = start_pts is not None
        n = len(self.bound_pts)
        previous, previous_pts, previous_rgb = None, None, None
        with self.video.frames("decoding the windows", start_pts=start_pts) as frames:
            for pts, frame in frames:
                if previous is None and overshoot_check and pts > self.bound_pts[done]:
                    return self._from_the_start(done)  # the demuxer seeked past the sample: walk from 0
                self._note_keyframe(frame, pts)
                while done < n and pts > self.bound_pts[done]:
                    if previous is None:  # a sample before the first frame: show the first
                        previous, previous_pts, previous_rgb = frame, pts, None
                    if previous_rgb is None:
                        previous_rgb = self._convert(previous)
                    yield int(self.order[done]), previous_rgb
                    done += 1
                    if done < n and self._worth_a_seek(done, pts):
                        return done
                if done == n:
                    return done
                previous, previous_pts, previous_rgb = frame, pts, None
        self.reached_end = True
        if previous is None:
            if overshoot_check:
                return self._from_the_start(done)
            raise BadSample(ZERO_FRAMES, self.video.name, "no frame decodes")
        self.last_time = self.video.seconds(previous_pts)
        rgb = previous_rgb if previous_rgb is not None else self._convert(previous)
        while done < n:  # past the end of the stream: the last frame, and its time
            self.latest[self.order[done]] = self.last_time
            yield int(self.order[done]), rgb
            done += 1
        return done

    def _from_the_start(self, done: int) -> int:
        """The demuxer seeked past its target: give seeking up; the next walk starts at the origin
        and passes the samples already done (bounded by the frame cap, as every walk is)."""
        self.can_seek = False
        return done

    def _note_keyframe(self, frame, pts: int) -> None:
        if frame.key_frame:
            t = self.video.seconds(pts)
            if self.last_keyframe is not None and t > self.last_keyframe:
                self.keyframe_gap_s = max(self.keyframe_gap_s, t - self.last_keyframe)
            self.last_keyframe = t

    def _worth_a_seek(self, done: int, pts: int) -> bool:
        """Seek to sample ``done`` rather than decode on to it: the gap is longer than a keyframe interval."""
        if not self.can_seek:
            return False
        gap = float(self.sorted_times[done]) - self.video.seconds(pts)
        interval = self.keyframe_gap_s or _DEFAULT_KEYFRAME_INTERVAL_S
        return gap > interval
