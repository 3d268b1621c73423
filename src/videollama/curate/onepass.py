"""The per-video stage's one decoding pass: scene scores, clip encoding and model frames together.

``one_pass`` decodes a source once and, frame by frame,

* scores it for the shot detector (``scenes.ThumbScores``, the same thumbnails and scores as
  ``scenes.frame_scores``),
* decides cuts as soon as they are final (``CutStream``: the same decision as
  ``scenes.cuts_from_scores``, made as soon as no later frame can change it),
* keeps the frames of the scene that is not final yet in a bounded buffer (references to the
  decoded frames: FFmpeg's frame buffers are reference-counted, so a held frame is never
  overwritten by the decoder), and when a scene is final, feeds the frames of each of its clips
  (``scenes.scene_windows``) to the H.264 encoder (``cutting._ClipEncoder``, the same bytes as
  ``cutting.cut_clips``) and converts the frames each frame spec needs.

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

Bounds: one ``WorkBound`` for the pass (``max_frames`` packets or frames, ``time_budget_s`` of
wall clock), as ``frame_scores`` and ``cut_clips`` had one each; bad files raise the ``BadSample``
reasons that ``frame_scores`` raises, from the same checks in the same order.
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

from videollama.curate.cutting import Spec, _ClipEncoder
from videollama.curate.scenes import (
    DEFAULT_THRESHOLD,
    MIN_SHOT_S,
    RATIO,
    SCANNING,
    WINDOW,
    ThumbScores,
    clips_between,
    cuts_from_scores,
    decode_error,
    scene_windows,
)
from videollama.data.container import WorkBound, check_resolution, nominal_rate, open_and_time
from videollama.data.frames import resize_crop_frame

MAX_BUFFER_BYTES = 512 * 2**20  # decoded frames held for the scene not final yet, per worker
_EPS = 1e-6  # as cut_clips and load_clip


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
    """One clip fed its frames in order: the MP4 (``_ClipEncoder``) and each spec's frames."""

    def __init__(self, n_frames: int, rate: Fraction, crf: int, specs: list[Spec], cpu: dict, clock):
        self.rate, self.crf, self.specs, self.cpu, self.clock = rate, crf, specs, cpu, clock
        self.picks = {spec: sample_indices(n_frames, rate, spec) for spec in specs}
        self.sizes: dict[int, set[int]] = {}  # frame index -> sides wanted
        for (_f, _r, size), picks in self.picks.items():
            for j in picks:
                self.sizes.setdefault(j, set()).add(size)
        self.rgb: dict[tuple[int, int], np.ndarray] = {}
        self.reformatter = VideoReformatter()
        self.encoder: _ClipEncoder | None = None
        self.count = 0

    def add(self, frame: av.VideoFrame) -> None:
        t0 = self.clock()
        for size in self.sizes.get(self.count, ()):
            rgb = resize_crop_frame(frame, size, reformatter=self.reformatter)
            turns = round((frame.rotation or 0) / 90) % 4
            self.rgb[self.count, size] = np.ascontiguousarray(np.rot90(rgb, k=-turns)) if turns else rgb
        t1 = self.clock()
        if self.encoder is None:  # even sides, as cut_clips
            self.encoder = _ClipEncoder(frame.width // 2 * 2, frame.height // 2 * 2, self.rate, self.crf)
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


def one_pass(path: Path, probe: dict, *, min_clip_s: float, max_clip_s: float, specs: list[Spec],
             threshold: float = DEFAULT_THRESHOLD, crf: int = 18, max_frames: int = 200_000,
             time_budget_s: float | None = 600.0, max_buffer_bytes: int = MAX_BUFFER_BYTES,
             clock=time.perf_counter) -> dict[str, Any]:
    """Decode ``path`` once: its clips, their MP4s and their frames for every spec.

    Returns ``{"clips": [(start_s, end_s, mp4 bytes | None, {spec: uint8 [F, S, S, 3]})],
    "cuts": [s], "cpu": {"decode", "scenes", "encode", "sample", "second_pass": seconds of
    ``clock``}, "second_pass": bool}`` (``cpu["second_pass"]``: the second pass's demuxing and
    decoding; its encoding and sampling count in ``encode`` and ``sample``); ``clips`` are ``scene_clips``' spans, in time order (mp4
    None: no frame falls in the span). Raises ``BadSample`` as ``frame_scores`` does.
    """
    name = str(path)
    deadline = None if time_budget_s is None else time.monotonic() + time_budget_s
    cpu = dict.fromkeys(("decode", "scenes", "encode", "sample", "second_pass"), 0.0)
    container, stream, origin, duration, timeless = open_and_time(path, name, 1, max_frames, deadline)
    bound = WorkBound(name, max_frames, deadline)
    scorer = ThumbScores(probe, stream, origin, timeless)
    cuts = CutStream(duration, threshold=threshold, min_clip_s=min_clip_s, max_clip_s=max_clip_s)
    rate = nominal_rate(stream).limit_denominator(1001)
    step = 1 / float(rate)
    clip_times: list[float] = []  # cut_clips' time of every frame (which clip it goes in)
    buffer: deque[tuple[float, av.VideoFrame, int]] = deque()  # (time, frame, bytes)
    buffered = 0  # bytes of the frames in ``buffer``
    overflow = False
    done: list[tuple[float, float, bytes | None, dict]] = []

    def encode(spans, frames_of) -> None:
        for start, end in spans:
            frames = frames_of(start, end)
            builder = ClipBuilder(len(frames), rate, crf, specs, cpu, clock)
            for frame in frames:
                builder.add(frame)
            done.append((start, end, *builder.finish()))

    def from_buffer(start, end):
        return [f for t, f, _ in buffer if start - _EPS <= t < end - _EPS]

    packets = 0
    try:
        t0 = clock()
        for packet in container.demux(stream):
            packets += 1
            bound.check(max(packets, len(scorer.times)), SCANNING)
            decoded = stream.decode(packet)
            cpu["decode"] += clock() - t0
            for frame in decoded:
                bound.check(max(packets, len(scorer.times) + 1), SCANNING)
                check_resolution(frame.width, frame.height, name, "decoded")
                t1 = clock()
                scorer.add(frame)
                spans = cuts.update(scorer.times, scorer.scores)
                cpu["scenes"] += clock() - t1
                if frame.pts is not None:
                    t = float((frame.pts - origin) * stream.time_base)
                else:  # no timestamp: one nominal frame after the previous one (cut_clips)
                    t = 0.0 if not clip_times else clip_times[-1] + step
                clip_times.append(t)
                if not overflow:
                    size = sum(p.buffer_size for p in frame.planes)
                    buffer.append((t, frame, size))
                    buffered += size
                    if buffered > max_buffer_bytes:
                        overflow, buffered = True, 0
                        buffer.clear()
                if spans and not overflow:
                    encode(spans, from_buffer)
                    while buffer and buffer[0][0] < cuts.scene_start - _EPS:
                        buffered -= buffer.popleft()[2]
            t0 = clock()
    except av.error.FFmpegError as error:
        bound.check_deadline(SCANNING)
        raise decode_error(error, name, len(scorer.times)) from error
    finally:
        container.close()
    times, scores = scorer.result(name, duration)
    t0 = clock()
    final_cuts = cuts_from_scores(times, scores, threshold=threshold)
    spans = clips_between(final_cuts, duration, min_clip_s=min_clip_s, max_clip_s=max_clip_s)
    cpu["scenes"] += clock() - t0
    if [(a, b) for a, b, *_ in done] != spans[:len(done)]:
        done, overflow = [], True  # the streamed decision disagreed: redo every clip (never seen so far)
    rest = spans[len(done):]
    if rest and not overflow:
        encode(rest, from_buffer)
    elif rest:
        t0, converting = clock(), cpu["encode"] + cpu["sample"]
        _second_pass(path, rest, clip_times, encode, max_frames, deadline)
        cpu["second_pass"] += clock() - t0 - (cpu["encode"] + cpu["sample"] - converting)  # its decoding
    return {"clips": done, "cuts": final_cuts, "cpu": cpu, "second_pass": bool(rest and overflow)}


def _second_pass(path: Path, spans, clip_times: list[float], encode, max_frames: int, deadline) -> None:
    """Decode ``path`` again and encode ``spans`` from it (frames chosen by ``clip_times``, the
    first pass's times, so that each clip gets the frames the first pass counted for it)."""
    name = str(path)
    container, stream, *_ = open_and_time(path, name, 1, max_frames, deadline)
    bound = WorkBound(name, max_frames, deadline)
    first = min(i for i, t in enumerate(clip_times) if t >= spans[0][0] - _EPS) if clip_times else 0
    last_end = spans[-1][1]
    kept: dict[int, av.VideoFrame] = {}
    wanted = {i for i, t in enumerate(clip_times) if any(a - _EPS <= t < b - _EPS for a, b in spans)}
    index = 0
    try:
        for frame in container.decode(stream):
            bound.check(index + 1, "cutting clips")
            if index >= len(clip_times) or clip_times[index] >= last_end - _EPS:
                break
            if index >= first and index in wanted:
                kept[index] = frame
            index += 1
            # Encode each span as soon as its last frame is in (frames of one span at a time are held).
            while spans and (index >= len(clip_times) or clip_times[index] >= spans[0][1] - _EPS):
                start, end = spans[0]
                ids = [i for i in sorted(kept) if start - _EPS <= clip_times[i] < end - _EPS]
                encode([spans[0]], lambda a, b, ids=ids: [kept.pop(i) for i in ids])
                spans = spans[1:]
    except av.error.FFmpegError as error:
        bound.check_deadline("cutting clips")
        raise decode_error(error, name, index) from error
    finally:
        container.close()
    for span in spans:  # spans no frame reached
        encode([span], lambda a, b: [])
