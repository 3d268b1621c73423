"""The per-video stage's one decoding pass: scene scores, clip encoding and model frames together.

``one_pass`` decodes a source once and, frame by frame,

* scores it for the shot detector (``scenes.ThumbScores``, the same thumbnails and scores as
  ``scenes.frame_scores``),
* decides cuts as soon as they are final (``CutStream``: the same decision as
  ``scenes.cuts_from_scores``, made as soon as no later frame can change it),
* keeps the frames of the scene that is not final yet in a bounded buffer (references to the
  decoded frames: FFmpeg's frame buffers are reference-counted, so a held frame is never
  overwritten by the decoder), and when a scene is final, feeds the frames of each of its clips
  (``scenes.scene_windows``) to the H.264 encoder (``clipfiles.ClipEncoder``; the same bytes as
  the separate cutting pass that tests/curate_reference.py keeps as the reference) and converts
  the frames each frame spec needs.

The frames of a spec are those ``load_clip`` in evaluation mode picks from the clip's MP4 (the
centred window of ``num_frames`` at ``fps``, the frame on screen at each sample time; the MP4
holds the clip's frames at the nominal rate, so its duration is ``frames / rate``), converted by
the loader's own ``resize_crop_frame`` (short side to ``size``, centre crop). The one difference:
the pixels come from the decoded source frame, not from its H.264 re-encoding (so they lack the
re-encode's compression noise; the clip MP4 has no rotation, so a rotation of the source is
undone; odd-sized or non-4:2:0 sources are converted from their own geometry, where the clip
crops to even sides and converts to 4:2:0 first).

At the end of the stream, the cuts and clips of the whole source are computed again by
``cuts_from_scores`` and ``clips_between`` from all the scores: the clips already encoded must be
the first of them (else everything is redone), and the rest come from the buffer. When the buffer
would exceed ``max_buffer_bytes`` (a scene longer than the memory allows) it is dropped and the
clips not encoded yet are made by a second decoding pass of the source (``second_pass`` in the
returned counts); curation then decodes that source twice, as before this module.

Bounds: the pass is one bounded walk over the frames (``data/decoding.py``: ``max_frames``
packets or frames, ``time_budget_s`` of wall clock), as ``frame_scores``' is; bad files raise the
``BadSample`` reasons that ``frame_scores`` raises, from the same checks in the same order.
"""

from __future__ import annotations

import math
import time
from collections import deque
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from videollama.curate.clipfiles import ClipEncoder, Spec
from videollama.curate.scenes import (
    DEFAULT_THRESHOLD,
    MIN_SHOT_S,
    RATIO,
    SCANNING,
    WINDOW,
    ThumbScores,
    clips_between,
    cuts_from_scores,
    scene_windows,
)
from videollama.data.container import nominal_rate
from videollama.data.decoding import OpenedVideo, open_and_time
from videollama.data.frames import resize_crop_frame

MAX_BUFFER_BYTES = 512 * 2**20  # decoded frames held for the scene not final yet, per worker
_EPS = 1e-6  # as load_clip
CUTTING = "cutting clips"


class CutStream:
    """``cuts_from_scores`` made incrementally: feed the growing ``times`` / ``scores`` lists after
    each new frame; ``update`` returns the clips of the scenes that became final.

    Frame ``k``'s candidacy needs the scores up to ``k + WINDOW``; the strongest-first suppression
    only links candidates closer than ``MIN_SHOT_S``, so a run of such candidates is settled once a
    frame ``MIN_SHOT_S`` after its last one has a known candidacy. The frames of the last
    ``WINDOW`` (padded at the end of the stream) are left to the final ``cuts_from_scores``.
    """

    def __init__(self, duration_s: float, *, threshold: float, min_clip_s: float, max_clip_s: float):
        self.duration_s, self.threshold = duration_s, threshold
        self.min_clip_s, self.max_clip_s = min_clip_s, max_clip_s
        self.run: list[int] = []  # candidates linked by the suppression, not settled yet
        self.cuts: list[float] = []  # settled cuts inside (0, duration)
        self.scene_start = 0.0  # start of the scene that is not final yet
        self.ordered = True  # times increasing so far (else only the final computation counts)

    def update(self, times: list[float], scores: list[float]) -> list[tuple[float, float]]:
        n = len(scores)
        if n >= 2 and times[-1] < times[-2]:
            self.ordered = False
        k = n - 1 - WINDOW
        if k < 1 or not self.ordered:
            return []
        spans: list[tuple[float, float]] = []
        if self.run and times[k] - times[self.run[-1]] >= MIN_SHOT_S:
            spans = self._settle(times, scores)
        score = scores[k]
        if score >= self.threshold:
            neighbours = [scores[max(j, 1)] for j in range(k - WINDOW, k)] + scores[k + 1:k + WINDOW + 1]
            if score >= RATIO * np.median(np.asarray(neighbours, dtype=np.float64)):
                self.run.append(k)
        return spans

    def _settle(self, times, scores) -> list[tuple[float, float]]:
        accepted: list[int] = []
        for k in sorted(self.run, key=lambda k: -scores[k]):
            if all(abs(times[k] - times[c]) >= MIN_SHOT_S for c in accepted):
                accepted.append(k)
        self.run = []
        spans = []
        for cut in (float(times[k]) for k in sorted(accepted)):
            if 0.0 < cut < self.duration_s:
                spans += scene_windows(self.scene_start, cut, min_clip_s=self.min_clip_s, max_clip_s=self.max_clip_s)
                self.cuts.append(cut)
                self.scene_start = cut
        return spans


def sample_indices(n_frames: int, rate: Fraction, spec: Spec) -> list[int]:
    """Indices (into a clip's ``n_frames`` frames at ``rate``) of the frames ``load_clip`` in
    evaluation mode shows at each sample time of ``spec`` in that clip's MP4 (video.py's rules)."""
    num_frames, fps, _size = spec
    duration = float(Fraction(n_frames) / rate)
    window = num_frames / fps
    start = 0.0 if duration <= window else (duration - window) * 0.5
    times = start + np.arange(num_frames, dtype=np.float64) / fps
    return [min(n_frames - 1, math.floor(Fraction(t + _EPS) * rate)) for t in times]


class ClipBuilder:
    """One clip fed its frames in order: the MP4 (``ClipEncoder``) and each spec's frames."""

    def __init__(self, n_frames: int, rate: Fraction, crf: int, specs: list[Spec], cpu: dict, clock):
        self.rate, self.crf, self.specs, self.cpu, self.clock = rate, crf, specs, cpu, clock
        self.picks = {spec: sample_indices(n_frames, rate, spec) for spec in specs}
        self.sizes: dict[int, set[int]] = {}  # frame index -> sides wanted
        for (_f, _r, size), picks in self.picks.items():
            for j in picks:
                self.sizes.setdefault(j, set()).add(size)
        self.rgb: dict[tuple[int, int], np.ndarray] = {}
        self.reformatter = VideoReformatter()
        self.encoder: ClipEncoder | None = None
        self.count = 0

    def add(self, frame: av.VideoFrame) -> None:
        t0 = self.clock()
        for size in self.sizes.get(self.count, ()):
            rgb = resize_crop_frame(frame, size, reformatter=self.reformatter)
            turns = round((frame.rotation or 0) / 90) % 4
            self.rgb[self.count, size] = np.ascontiguousarray(np.rot90(rgb, k=-turns)) if turns else rgb
        t1 = self.clock()
        if self.encoder is None:  # even sides: 4:2:0 chroma needs them (an odd last row/column is dropped)
            self.encoder = ClipEncoder(frame.width // 2 * 2, frame.height // 2 * 2, self.rate, self.crf)
        self.encoder.add(frame)
        self.cpu["sample"] += t1 - t0
        self.cpu["encode"] += self.clock() - t1
        self.count += 1

    def finish(self) -> tuple[bytes | None, dict]:
        if self.encoder is None:
            return None, {}
        t0 = self.clock()
        mp4 = self.encoder.finish()
        self.cpu["encode"] += self.clock() - t0
        frames = {spec: np.stack([self.rgb[j, spec[2]] for j in picks]) for spec, picks in self.picks.items()}
        return mp4, frames


class _Clips:
    """The clips made so far, in time order: ``(start_s, end_s, mp4 | None, {spec: frames})``."""

    def __init__(self, rate: Fraction, crf: int, specs: list[Spec], cpu: dict, clock):
        self.rate, self.crf, self.specs, self.cpu, self.clock = rate, crf, specs, cpu, clock
        self.done: list[tuple[float, float, bytes | None, dict]] = []

    def make(self, spans: list[tuple[float, float]], frames_of) -> None:
        """Encode each span ``(start, end)`` from its frames, ``frames_of(start, end)``."""
        for start, end in spans:
            frames = frames_of(start, end)
            builder = ClipBuilder(len(frames), self.rate, self.crf, self.specs, self.cpu, self.clock)
            for frame in frames:
                builder.add(frame)
            self.done.append((start, end, *builder.finish()))


class _SceneBuffer:
    """The decoded frames of the scene that is not final yet, ``(time, frame, bytes)``, up to
    ``max_bytes``; past that they are dropped for good (``overflow``: a second pass makes the rest)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.frames: deque[tuple[float, av.VideoFrame, int]] = deque()
        self.bytes = 0
        self.overflow = False

    def add(self, t: float, frame: av.VideoFrame) -> None:
        if self.overflow:
            return
        size = sum(p.buffer_size for p in frame.planes)
        self.frames.append((t, frame, size))
        self.bytes += size
        if self.bytes > self.max_bytes:
            self.overflow, self.bytes = True, 0
            self.frames.clear()

    def between(self, start: float, end: float) -> list[av.VideoFrame]:
        return [f for t, f, _ in self.frames if start - _EPS <= t < end - _EPS]

    def drop_before(self, t: float) -> None:
        while self.frames and self.frames[0][0] < t - _EPS:
            self.bytes -= self.frames.popleft()[2]


class _Scan:
    """The pass's work on each frame: score it, settle the cuts, and encode the clips of the scenes
    that became final from the buffer."""

    def __init__(self, video: OpenedVideo, probe: dict, clips: _Clips, *, threshold: float, min_clip_s: float,
                 max_clip_s: float, max_buffer_bytes: int):
        self.scorer = ThumbScores(probe, video)
        self.cuts = CutStream(video.duration, threshold=threshold, min_clip_s=min_clip_s, max_clip_s=max_clip_s)
        self.buffer = _SceneBuffer(max_buffer_bytes)
        self.clips = clips
        self.clip_times: list[float] = []  # every frame's time (which clip it goes in)

    def add(self, t: float, frame: av.VideoFrame) -> None:
        cpu, clock = self.clips.cpu, self.clips.clock
        t1 = clock()
        self.scorer.add(frame)
        spans = self.cuts.update(self.scorer.times, self.scorer.scores)
        cpu["scenes"] += clock() - t1
        self.clip_times.append(t)
        self.buffer.add(t, frame)
        if spans and not self.buffer.overflow:
            self.clips.make(spans, self.buffer.between)
            self.buffer.drop_before(self.cuts.scene_start)


def one_pass(path: Path, probe: dict, *, min_clip_s: float, max_clip_s: float, specs: list[Spec],
             threshold: float = DEFAULT_THRESHOLD, crf: int = 18, max_frames: int = 200_000,
             time_budget_s: float | None = 600.0, max_buffer_bytes: int = MAX_BUFFER_BYTES,
             clock=time.perf_counter) -> dict[str, Any]:
    """Decode ``path`` once: its clips, their MP4s and their frames for every spec.

    Returns ``{"clips": [(start_s, end_s, mp4 bytes | None, {spec: uint8 [F, S, S, 3]})],
    "cuts": [s], "cpu": {"decode", "scenes", "encode", "sample", "second_pass": seconds of
    ``clock``}, "second_pass": bool}`` (``cpu["second_pass"]``: the second pass's demuxing and
    decoding; its encoding and sampling count in ``encode`` and ``sample``); ``clips`` are
    ``scene_clips``' spans, in time order (mp4 None: no frame falls in the span). Raises
    ``BadSample`` as ``frame_scores`` does.
    """
    name = str(path)
    deadline = None if time_budget_s is None else time.monotonic() + time_budget_s
    cpu = dict.fromkeys(("decode", "scenes", "encode", "sample", "second_pass"), 0.0)
    with open_and_time(path, name, 1, max_frames, deadline) as video:
        clips = _Clips(nominal_rate(video.stream).limit_denominator(1001), crf, specs, cpu, clock)
        scan = _Scan(video, probe, clips, threshold=threshold, min_clip_s=min_clip_s, max_clip_s=max_clip_s,
                     max_buffer_bytes=max_buffer_bytes)
        t0 = clock()
        with video.frames(SCANNING) as frames:
            for pts, frame in frames:
                cpu["decode"] += clock() - t0
                scan.add(video.seconds(pts), frame)
                t0 = clock()
    times, scores = scan.scorer.result(name, video.duration)
    t0 = clock()
    final_cuts = cuts_from_scores(times, scores, threshold=threshold)
    spans = clips_between(final_cuts, video.duration, min_clip_s=min_clip_s, max_clip_s=max_clip_s)
    cpu["scenes"] += clock() - t0
    overflow = scan.buffer.overflow
    if [(a, b) for a, b, *_ in clips.done] != spans[:len(clips.done)]:
        clips.done, overflow = [], True  # the streamed decision disagreed: redo every clip (never seen so far)
    rest = spans[len(clips.done):]
    if rest and not overflow:
        clips.make(rest, scan.buffer.between)
    elif rest:
        t0, converting = clock(), cpu["encode"] + cpu["sample"]
        _second_pass(path, rest, scan.clip_times, clips, max_frames, deadline)
        cpu["second_pass"] += clock() - t0 - (cpu["encode"] + cpu["sample"] - converting)  # its decoding
    return {"clips": clips.done, "cuts": final_cuts, "cpu": cpu, "second_pass": bool(rest and overflow)}


def _second_pass(path: Path, spans, clip_times: list[float], clips: _Clips, max_frames: int, deadline) -> None:
    """Decode ``path`` again and encode ``spans`` from it (frames chosen by ``clip_times``, the
    first pass's times, so that each clip gets the frames the first pass counted for it)."""
    name = str(path)
    first = min(i for i, t in enumerate(clip_times) if t >= spans[0][0] - _EPS) if clip_times else 0
    last_end = spans[-1][1]
    kept: dict[int, av.VideoFrame] = {}
    wanted = {i for i, t in enumerate(clip_times) if any(a - _EPS <= t < b - _EPS for a, b in spans)}
    index = 0
    with open_and_time(path, name, 1, max_frames, deadline) as video, video.frames(CUTTING) as frames:
        for _pts, frame in frames:
            if index >= len(clip_times) or clip_times[index] >= last_end - _EPS:
                break
            if index >= first and index in wanted:
                kept[index] = frame
            index += 1
            # Encode each span as soon as its last frame is in (frames of one span at a time are held).
            while spans and (index >= len(clip_times) or clip_times[index] >= spans[0][1] - _EPS):
                start, end = spans[0]
                ids = [i for i in sorted(kept) if start - _EPS <= clip_times[i] < end - _EPS]
                clips.make([spans[0]], lambda a, b, ids=ids: [kept.pop(i) for i in ids])
                spans = spans[1:]
    for span in spans:  # spans no frame reached
        clips.make([span], lambda a, b: [])
