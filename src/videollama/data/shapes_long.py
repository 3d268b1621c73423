"""Shapes-Long (version 1): minutes of Shapes video with timed events (docs/SHAPES.md, "Long mode").

A video lasts ``T`` whole seconds at 10 FPS. Its 1 to 3 objects are still, except that ``k`` of
them each make one event: they move at a constant speed in one direction during
``[start_s, end_s)`` and stay where they stopped. Events never overlap, are at least 2 s apart
and keep 2 s clear at each end of the video; the needle split has one event, placed at a given
depth. The questions ask which way, which object, which first or last, how many, and when.

Geometry and rasterisation are version 1's (``shapes._draw``): an object's position is the
top-left corner of its bounding box, frame ``k`` shows time ``k / 10`` s. Times are kept in
whole tenths of a second while they are drawn (so rounding and the gaps between events are
exact) and stored as seconds with one decimal.

Rendering is incremental: a still stretch is one picture repeated, and only the frames of an
event are drawn, over the picture of the objects that stay still meanwhile.
:func:`encode_video` hands each distinct picture to the encoder once, already in yuv420p.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from typing import NamedTuple

import numpy as np

from videollama.data.shapes import (
    BACKGROUND_RANGE,
    COLORS,
    COUNT_WORDS,
    DIRECTIONS,
    HEIGHT,
    REGION_X,
    REGION_Y,
    SHAPES,
    SIZE_RANGE,
    SPEED_RANGE,
    UNIT_VELOCITY,
    WIDTH,
    _draw,
    encode_mp4,
)

SOURCE = "shapes-long-v1"
FPS = 10
EVENT_TENTHS = (30, 60)  # an event lasts 3.0..6.0 s
EDGE_TENTHS = 20  # 2 s clear at each end of the video
GAP_TENTHS = 20  # at least 2 s between two events
# Below 20 s three events of 3-6 s with their gaps rarely fit, and redrawing the durations
# until they do would spin; an hour bounds what one video may cost to render.
MIN_DURATION_S, MAX_DURATION_S = 20, 3600


def round_tenths(value_in_tenths: float) -> int:
    """Round half up to a whole number of tenths ("rounded to 0.1 s": 8.55 s -> 8.6 s)."""
    return math.floor(value_in_tenths + 0.5)


@dataclass(frozen=True)
class LongObject:
    """One object: ``x, y`` its top-left corner at t = 0; ``motion`` its event's direction or "still"."""

    color: str
    shape: str
    size: int
    x: float
    y: float
    motion: str = "still"
    speed: float = 0.0  # px/s during the event
    start_s: float = 0.0  # the event is [start_s, end_s), one decimal
    end_s: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    def position(self, t: float | np.ndarray) -> tuple:
        """Top-left corner at ``t`` seconds (scalar or array): still, moving, then still again."""
        ux, uy = UNIT_VELOCITY[self.motion]
        moved = self.speed * np.clip(np.asarray(t, dtype=np.float64) - self.start_s, 0.0, self.end_s - self.start_s)
        return self.x + ux * moved, self.y + uy * moved

    def path(self) -> tuple[float, float]:
        """Displacement ``(dx, dy)`` over the whole event (zero for a still object)."""
        ux, uy = UNIT_VELOCITY[self.motion]
        travel = self.speed * (self.end_s - self.start_s)
        return ux * travel, uy * travel


@dataclass(frozen=True)
class LongSpec:
    """Everything that defines a long video. ``objects`` are ordered left to right by ``x`` at t = 0."""

    duration_s: int
    background: int
    objects: tuple[LongObject, ...]
    depth: float | None = None  # the needle split's depth; None elsewhere

    @property
    def num_frames(self) -> int:
        return self.duration_s * FPS

    def events(self) -> list[LongObject]:
        """The objects that move, in time order."""
        return sorted((o for o in self.objects if o.motion != "still"), key=lambda o: o.start_s)

    def to_dict(self) -> dict:
        return {"duration_s": self.duration_s, "background": self.background, "depth": self.depth,
                "objects": [asdict(o) for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict) -> LongSpec:
        return cls(duration_s=int(d["duration_s"]), background=int(d["background"]), depth=d.get("depth"),
                   objects=tuple(LongObject(**o) for o in d["objects"]))

    def key(self) -> str:
        """A canonical string of the full spec (used to keep evaluation videos out of training)."""
        return json.dumps(self.to_dict(), sort_keys=True)


def check_duration(duration_s: int) -> None:
    if not isinstance(duration_s, int) or not MIN_DURATION_S <= duration_s <= MAX_DURATION_S:
        raise ValueError(f"duration must be a whole number of seconds in {MIN_DURATION_S}..{MAX_DURATION_S}, "
                         f"got {duration_s!r}")


# ---------------------------------------------------------------------------------------
# Sampling, in the order SHAPES.md fixes: objects, events, timing, then positions
# ---------------------------------------------------------------------------------------


def sample_long_spec(rng: random.Random, duration_s: int, *, depth: float | None = None) -> LongSpec:
    """Draw one video of ``duration_s`` seconds; ``depth`` in [0, 1] makes it a needle video (k = 1)."""
    check_duration(duration_s)
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")
    count = rng.randint(1, 3)
    pairs = rng.sample([(c, s) for c in COLORS for s in SHAPES], count)
    sizes = [rng.randint(*SIZE_RANGE) for _ in range(count)]
    background = rng.randint(*BACKGROUND_RANGE)
    k = 1 if depth is not None else rng.randint(1, count)
    movers = rng.sample(range(count), k)  # event i (in drawing order) belongs to object movers[i]
    directions = [rng.choice(DIRECTIONS) for _ in range(k)]
    speeds = [rng.uniform(*SPEED_RANGE) for _ in range(k)]
    lengths, free = _draw_lengths(rng, k, duration_s)
    if depth is None:
        starts = _draw_starts(rng, lengths, free)
    else:
        starts = [EDGE_TENTHS + round_tenths(depth * free)]

    objects = [LongObject(color, shape, size, 0.0, 0.0) for (color, shape), size in zip(pairs, sizes)]
    for i, obj_index in enumerate(movers):
        objects[obj_index] = replace(objects[obj_index], motion=directions[i], speed=speeds[i],
                                     start_s=starts[i] / 10, end_s=(starts[i] + lengths[i]) / 10)
    objects = _draw_positions(rng, objects)
    objects.sort(key=lambda o: o.x)
    return LongSpec(duration_s=duration_s, background=background, objects=tuple(objects), depth=depth)


def _draw_lengths(rng: random.Random, k: int, duration_s: int) -> tuple[list[int], int]:
    """Event durations in tenths, redrawn until they fit; and the free time F in tenths."""
    while True:
        lengths = [round_tenths(rng.uniform(*EVENT_TENTHS)) for _ in range(k)]
        free = duration_s * 10 - sum(lengths) - 2 * EDGE_TENTHS - GAP_TENTHS * (k - 1)
        if free >= 0:
            return lengths, free


def _draw_starts(rng: random.Random, lengths: list[int], free: int) -> list[int]:
    """Start times in tenths: sorted uniform draws in [0, F] spread the events' slack.

    Rounding is monotone, so the rounded draws stay sorted and every gap stays >= 2 s.
    """
    slack = sorted(round_tenths(10 * rng.uniform(0.0, free / 10)) for _ in lengths)
    return [EDGE_TENTHS + u + sum(lengths[:i]) + GAP_TENTHS * i for i, u in enumerate(slack)]


def _start_range(size: int, travel: float, lo: float, hi: float) -> tuple[float, float]:
    """Start coordinates keeping ``[p, p + size]`` inside ``[lo, hi]`` along the whole path."""
    return lo - min(0.0, travel), hi - size - max(0.0, travel)


def _draw_positions(rng: random.Random, objects: list[LongObject]) -> list[LongObject]:
    """Start positions uniform over those that keep each path inside; all redrawn until no overlap."""
    check_times = _check_times(objects)
    while True:
        placed = []
        for obj in objects:
            dx, dy = obj.path()
            x = rng.uniform(*_start_range(obj.size, dx, *REGION_X))
            y = rng.uniform(*_start_range(obj.size, dy, *REGION_Y))
            placed.append(replace(obj, x=x, y=y))
        if not any(overlap_ever(a, b, check_times) for i, a in enumerate(placed) for b in placed[i + 1:]):
            return placed


def _check_times(objects: list[LongObject]) -> np.ndarray:
    """Frame times that show every arrangement: t = 0 and every frame of every event, its end included.

    Between events nothing moves, so the arrangement after an event's end frame holds until
    the next event starts.
    """
    times = [np.zeros(1)]
    for o in objects:
        if o.motion != "still":
            times.append(np.arange(round(o.start_s * FPS), round(o.end_s * FPS) + 1) / FPS)
    return np.concatenate(times)


def overlap_ever(a: LongObject, b: LongObject, times: np.ndarray) -> bool:
    """Do the two bounding boxes overlap (positive area) at any of ``times``?"""
    ax, ay = a.position(times)
    bx, by = b.position(times)
    # At most 24 px/s = 2.4 px per frame, far less than the smallest size (28 px): two boxes
    # cannot pass through each other between frames.
    overlap = (ax < bx + b.size) & (bx < ax + a.size) & (ay < by + b.size) & (by < ay + a.size)
    return bool(overlap.any())


# ---------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------


def segment_text(event: LongObject) -> str:
    return f"from {event.start_s:.1f} to {event.end_s:.1f} seconds"


def caption(spec: LongSpec) -> str:
    """E.g. ``"the red circle moves left from 12.0 to 16.5 seconds, then the blue square moves up ..."``."""
    return ", then ".join(f"the {e.name} moves {e.motion} {segment_text(e)}" for e in spec.events()) + "."


def questions(spec: LongSpec) -> list[dict]:
    """Every question of the Long-mode table that applies, as ``{question, answer, kind}``.

    Order: the table's rows top to bottom; objects left to right; directions left, right, up,
    down; grounding questions in time order.
    """
    events = spec.events()
    qa = [{"question": f"which way does the {o.name} move?", "answer": o.motion, "kind": "needle"}
          for o in spec.objects]
    for direction in DIRECTIONS:
        movers = [e for e in events if e.motion == direction]
        if len(movers) == 1:
            qa.append({"question": f"which object moves {direction}?", "answer": f"the {movers[0].name}",
                       "kind": "needle"})
    if len(events) >= 2:
        qa.append({"question": "which object moves first?", "answer": f"the {events[0].name}", "kind": "order"})
        qa.append({"question": "which object moves last?", "answer": f"the {events[-1].name}", "kind": "order"})
    qa.append({"question": "how many objects move?", "answer": COUNT_WORDS[len(events)], "kind": "count"})
    qa += [{"question": f"when does the {e.name} move?", "answer": segment_text(e), "kind": "grounding"}
           for e in events]
    return qa


def grounding_items(spec: LongSpec) -> list[dict]:
    """The grounding questions with their segments: ``{question, segments: [[start, end]]}``."""
    return [{"question": f"when does the {e.name} move?", "segments": [[e.start_s, e.end_s]]} for e in spec.events()]


def event_list(spec: LongSpec) -> list[dict]:
    """The events in time order, as metadata."""
    return [{"object": e.name, "direction": e.motion, "speed": e.speed, "start_s": e.start_s, "end_s": e.end_s}
            for e in spec.events()]


# ---------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------


class _Group(NamedTuple):
    """Some of a video's objects, in the form ``shapes._draw`` paints."""

    objects: tuple[LongObject, ...]


def render_frame(spec: LongSpec, t: float) -> np.ndarray:
    """The frame at ``t`` seconds, drawn from scratch: uint8 ``[240, 320, 3]``."""
    frame = np.full((HEIGHT, WIDTH, 3), spec.background, dtype=np.uint8)
    _draw(frame, spec, t)
    return frame


def iter_frames(spec: LongSpec) -> Iterator[tuple[np.ndarray, bool]]:
    """Yield ``(frame, changed)`` for frames ``k = 0 .. T * 10 - 1`` (time ``k / 10`` s).

    ``changed`` is False when the frame is the previous one again (nothing moved). Frames are
    uint8 ``[240, 320, 3]`` arrays that are reused: copy one to keep it. Each frame equals
    ``render_frame(spec, k / 10)``.
    """
    k = 0
    still = render_frame(spec, 0.0)
    for mover in spec.events():
        first, stop = round(mover.start_s * FPS), round(mover.end_s * FPS)
        yield from _repeat(still, first - k)
        # The others are still throughout the event: paint them once, then the mover per frame.
        base = np.full_like(still, spec.background)
        _draw(base, _Group(tuple(o for o in spec.objects if o is not mover)), mover.start_s)
        frame = np.empty_like(base)
        for k in range(first, stop):
            np.copyto(frame, base)
            _draw(frame, _Group((mover,)), k / FPS)
            yield frame, True
        k = stop
        still = render_frame(spec, stop / FPS)
    yield from _repeat(still, spec.num_frames - k)


def _repeat(frame: np.ndarray, n: int) -> Iterator[tuple[np.ndarray, bool]]:
    for i in range(n):
        yield frame, i == 0


def iter_encoder_frames(spec: LongSpec) -> Iterator:
    """The frames as yuv420p ``av.VideoFrame``: one conversion per distinct picture, repeated as is."""
    import av  # lazy: importing this module must stay cheap
    from av.video.reformatter import VideoReformatter

    # One reformatter keeps its scaler context; the conversion is the one the encoder applies
    # to an RGB frame, so the bytes equal those of encoding every RGB frame.
    reformatter = VideoReformatter()
    picture = None
    for rgb, changed in iter_frames(spec):
        if changed:
            picture = reformatter.reformat(av.VideoFrame.from_ndarray(rgb, format="rgb24"), format="yuv420p")
        yield picture


def encode_video(spec: LongSpec) -> bytes:
    """The video as H.264 yuv420p MP4 bytes (version 1's encoder settings, at 10 FPS)."""
    return encode_mp4(iter_encoder_frames(spec), fps=FPS)
