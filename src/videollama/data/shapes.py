"""The Shapes corpus (version 1): procedurally generated video-text clips, per /work/shared/SHAPES.md.

Each clip is 5 s of 320x240 video at 25 FPS on a uniform gray background, with 1 to 3
coloured shapes that stay still or move left/right/up/down at a constant speed. Captions
and questions are derived from the clip's :class:`ClipSpec`; half of the questions are
about motion, which no single frame can answer.

Geometry: an object's position is the top-left corner of its bounding box, in float pixels,
``x`` to the right and ``y`` down. At time ``t`` (frame ``k`` is at ``t = k / 25``) it is
``start + velocity * t``. A pixel ``(row i, column j)`` belongs to an object when its
centre ``(j + 0.5, i + 0.5)`` lies inside the shape, so rasterisation is deterministic.

``videollama data synth`` writes the training split as WebDataset shards and the evaluation
split as ``videoqa.jsonl`` + ``caption.jsonl`` beside a ``videos/`` folder (plus
``specs.jsonl``: the full spec of every eval clip, for analysis).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

SOURCE = "shapes-v1"
WIDTH, HEIGHT = 320, 240
FPS = 25
NUM_FRAMES = 125  # 5.0 s
DURATION = NUM_FRAMES / FPS
# Objects live in the central 240x240 square, so any centre crop keeps every object in view.
REGION_X = (40.0, 280.0)
REGION_Y = (0.0, 240.0)

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 230),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 200),
    "white": (235, 235, 235),
}
SHAPES = ("circle", "square", "triangle")
MOTIONS = ("still", "left", "right", "up", "down")
DIRECTIONS = ("left", "right", "up", "down")
# Unit velocity per motion, in (x, y) with y pointing down.
UNIT_VELOCITY = {"still": (0, 0), "left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
MOTION_PHRASE = {
    "still": "stays still",
    "left": "moves left",
    "right": "moves right",
    "up": "moves up",
    "down": "moves down",
}
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
SIZE_RANGE = (28, 44)  # integer bounding-box side, inclusive
SPEED_RANGE = (12.0, 24.0)  # px/s, uniform float
BACKGROUND_RANGE = (16, 64)  # integer gray level, inclusive
# Overlap is checked at every frame time and at t = 5.0 s (the end of the clip).
_CHECK_TIMES = np.arange(NUM_FRAMES + 1) / FPS


@dataclass(frozen=True)
class ObjectSpec:
    """One object: ``x, y`` is the bounding box's top-left corner at t = 0 (float pixels)."""

    color: str
    shape: str
    size: int
    motion: str
    speed: float  # px/s; 0.0 for a still object
    x: float
    y: float

    @property
    def velocity(self) -> tuple[float, float]:
        ux, uy = UNIT_VELOCITY[self.motion]
        return ux * self.speed, uy * self.speed

    def position(self, t: float | np.ndarray) -> tuple:
        """Top-left corner at time ``t`` seconds (scalar or array of times)."""
        vx, vy = self.velocity
        return self.x + vx * t, self.y + vy * t

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class ClipSpec:
    """Everything that defines a clip. ``objects`` are ordered left to right by ``x`` at t = 0."""

    background: int
    objects: tuple[ObjectSpec, ...]

    def to_dict(self) -> dict:
        return {"background": self.background, "objects": [asdict(o) for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict) -> ClipSpec:
        return cls(background=int(d["background"]), objects=tuple(ObjectSpec(**o) for o in d["objects"]))

    def key(self) -> str:
        """A canonical string of the full spec (used to dedupe eval against train)."""
        return json.dumps(self.to_dict(), sort_keys=True)


# ---------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------


def _start_range(size: int, velocity: float, lo: float, hi: float) -> tuple[float, float]:
    """Start coordinates keeping [p, p + size] inside [lo, hi] for all t in [0, 5 s]."""
    travel = velocity * DURATION
    return lo - min(0.0, travel), hi - size - max(0.0, travel)


def _overlap_ever(a: ObjectSpec, b: ObjectSpec) -> bool:
    """Do the two bounding boxes overlap (positive area) at any frame time or at t = 5 s?"""
    ax, ay = a.position(_CHECK_TIMES)
    bx, by = b.position(_CHECK_TIMES)
    # Objects move at most 24 px/s = ~1 px per frame, far less than the smallest size
    # (28 px), so two boxes cannot pass through each other between checked times.
    overlap = (ax < bx + b.size) & (bx < ax + a.size) & (ay < by + b.size) & (by < ay + a.size)
    return bool(overlap.any())


def sample_clip_spec(rng: random.Random) -> ClipSpec:
    """Draw one clip in the order SHAPES.md fixes, so motions keep their 1/5 shares.

    Count, (color, shape) pairs, sizes, motions and speeds first; then the background
    level; then start positions, redrawn (positions only) until no two objects overlap.
    """
    count = rng.randint(1, 3)
    pairs = rng.sample([(c, s) for c in COLORS for s in SHAPES], count)
    sizes = [rng.randint(*SIZE_RANGE) for _ in range(count)]
    motions = [rng.choice(MOTIONS) for _ in range(count)]
    speeds = [0.0 if m == "still" else rng.uniform(*SPEED_RANGE) for m in motions]
    background = rng.randint(*BACKGROUND_RANGE)

    while True:
        objects = []
        for (color, shape), size, motion, speed in zip(pairs, sizes, motions, speeds):
            ux, uy = UNIT_VELOCITY[motion]
            x = rng.uniform(*_start_range(size, ux * speed, *REGION_X))
            y = rng.uniform(*_start_range(size, uy * speed, *REGION_Y))
            objects.append(ObjectSpec(color, shape, size, motion, speed, x, y))
        if not any(_overlap_ever(a, b) for i, a in enumerate(objects) for b in objects[i + 1 :]):
            break
    objects.sort(key=lambda o: o.x)
    return ClipSpec(background=background, objects=tuple(objects))


# ---------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------


def _shape_mask(shape: str, x: float, y: float, size: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Boolean mask over the pixel grid ``rows x cols`` (pixel centres at +0.5)."""
    py = rows[:, None] + 0.5  # (R, 1)
    px = cols[None, :] + 0.5  # (1, C)
    if shape == "square":
        return (px >= x) & (px < x + size) & (py >= y) & (py < y + size)
    if shape == "circle":
        r = size / 2
        return (px - (x + r)) ** 2 + (py - (y + r)) ** 2 <= r * r
    if shape == "triangle":
        # Apex at the top centre, base along the bottom edge: half-width grows by 1/2 px per px down.
        depth = py - y
        return (depth >= 0) & (depth < size) & (np.abs(px - (x + size / 2)) <= depth / 2)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _draw(frame: np.ndarray, spec: ClipSpec, t: float) -> None:
    """Paint ``spec``'s objects at time ``t`` into ``frame`` (uint8 ``[240, 320, 3]``), in place."""
    for obj in spec.objects:
        x, y = obj.position(t)
        # Only the pixels of the bounding box (plus one for rounding) can be inside.
        r0, r1 = max(0, int(np.floor(y)) - 1), min(HEIGHT, int(np.ceil(y + obj.size)) + 1)
        c0, c1 = max(0, int(np.floor(x)) - 1), min(WIDTH, int(np.ceil(x + obj.size)) + 1)
        mask = _shape_mask(obj.shape, x, y, obj.size, np.arange(r0, r1), np.arange(c0, c1))
        frame[r0:r1, c0:c1][mask] = COLORS[obj.color]


def iter_frames(spec: ClipSpec):
    """Yield the 125 frames, uint8 ``[240, 320, 3]`` each, frame ``k`` at time ``k / 25`` s.

    The same buffer is repainted and yielded each time (copy it to keep it): the encoder
    copies every frame anyway, and a fresh 29 MB clip array costs more than drawing it.
    """
    frame = np.empty((HEIGHT, WIDTH, 3), dtype=np.uint8)
    for k in range(NUM_FRAMES):
        frame[:] = spec.background
        _draw(frame, spec, k / FPS)
        yield frame


def render_frames(spec: ClipSpec) -> np.ndarray:
    """All 125 frames: uint8 ``[125, 240, 320, 3]``; frame ``k`` shows time ``k / 25`` s."""
    frames = np.empty((NUM_FRAMES, HEIGHT, WIDTH, 3), dtype=np.uint8)
    for k, frame in enumerate(iter_frames(spec)):
        frames[k] = frame
    return frames


def encode_mp4(frames, *, fps: int = FPS, crf: int = 18) -> bytes:
    """H.264 (libx264, yuv420p) MP4 bytes from uint8 RGB frames.

    ``frames``: an array ``[T, H, W, 3]`` or an iterable of ``[H, W, 3]`` arrays (H, W even),
    or of ``av.VideoFrame`` already in yuv420p; the same VideoFrame may come again for a
    repeated picture, which spares the colour conversion of mostly still videos.
    One encoder thread: parallelism comes from encoding many clips at once, and a single
    thread keeps the bytes independent of the machine's core count.
    """
    import av  # lazy: importing this module must stay cheap

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = None
        for i, item in enumerate(frames):
            frame = _video_frame(av, item, i)
            if stream is None:
                stream = container.add_stream("libx264", rate=fps)
                stream.width, stream.height = frame.width, frame.height
                stream.pix_fmt = "yuv420p"
                stream.codec_context.thread_count = 1
                # ultrafast: 2x the bytes of `medium` at the same CRF but half the time,
                # and the files decode faster (no CABAC, no B-frames) in the loader too.
                stream.options = {"preset": "ultrafast", "crf": str(crf), "threads": "1"}
            frame.pts = i  # what the encoder would number it; a repeated VideoFrame needs it set
            for packet in stream.encode(frame):
                container.mux(packet)
        if stream is None:
            raise ValueError("encode_mp4: no frames")
        for packet in stream.encode():  # flush the encoder's delayed frames
            container.mux(packet)
    return buf.getvalue()


def _video_frame(av, item, i: int):
    """``item`` as an ``av.VideoFrame``: an RGB array is wrapped, a yuv420p frame passes."""
    if isinstance(item, av.VideoFrame):
        if item.format.name != "yuv420p":
            raise ValueError(f"frame {i}: expected a yuv420p VideoFrame, got {item.format.name}")
        return item
    if item.ndim != 3 or item.shape[-1] != 3 or item.dtype != np.uint8:
        raise ValueError(f"frame {i}: expected uint8 [H, W, 3], got {item.dtype} {tuple(item.shape)}")
    return av.VideoFrame.from_ndarray(item, format="rgb24")


# ---------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------


def _left_to_right(spec: ClipSpec) -> list[ObjectSpec]:
    return sorted(spec.objects, key=lambda o: o.x)


def caption(spec: ClipSpec) -> str:
    """E.g. ``"a red square moves left and a blue circle stays still."``."""
    parts = [f"a {o.color} {o.shape} {MOTION_PHRASE[o.motion]}" for o in _left_to_right(spec)]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text + "."


def questions(spec: ClipSpec) -> list[dict]:
    """Every question of the SHAPES.md table that applies, as ``{question, answer, kind}``.

    Order: the table's rows top to bottom; objects left to right; directions left, right, up, down.
    """
    objects = _left_to_right(spec)
    qa: list[dict] = []
    for o in objects:
        if sum(p.shape == o.shape for p in objects) == 1:
            qa.append({"question": f"what color is the {o.shape}?", "answer": o.color, "kind": "static"})
    for o in objects:
        if sum(p.color == o.color for p in objects) == 1:
            qa.append({"question": f"what shape is the {o.color} object?", "answer": o.shape, "kind": "static"})
    qa.append({"question": "how many objects are there?", "answer": COUNT_WORDS[len(objects)], "kind": "static"})
    for o in objects:
        qa.append({"question": f"which way does the {o.name} move?", "answer": o.motion, "kind": "temporal"})
    for direction in DIRECTIONS:
        movers = [o for o in objects if o.motion == direction]
        if len(movers) == 1:
            qa.append(
                {"question": f"which object moves {direction}?", "answer": f"the {movers[0].name}", "kind": "temporal"}
            )
    return qa


# ---------------------------------------------------------------------------------------
# The synth command: train shards + eval split
# ---------------------------------------------------------------------------------------


def clip_seed(seed: int, split: str, index: int, source: str = SOURCE) -> int:
    """Per-clip seed, so the output never depends on the number of workers (``source``: the corpus)."""
    digest = hashlib.sha256(f"{source}/{seed}/{split}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _spec_for(seed: int, split: str, index: int) -> ClipSpec:
    return sample_clip_spec(random.Random(clip_seed(seed, split, index)))


def _make_sample(job: tuple[str, ClipSpec]) -> tuple[str, bytes, dict]:
    """Worker: render + encode one clip. Returns ``(key, mp4 bytes, metadata)``."""
    key, spec = job
    mp4 = encode_mp4(iter_frames(spec))
    meta = {
        "caption": caption(spec),
        "qa": questions(spec),
        "source": SOURCE,
        "key": key,
        "width": WIDTH,
        "height": HEIGHT,
        "fps": FPS,
        "num_frames": NUM_FRAMES,
        "spec": spec.to_dict(),
    }
    return key, mp4, meta


def _render_all(pool, jobs: list, desc: str, *, make=_make_sample, chunksize: int = 4):
    """Yield ``make(job)`` for every job, in job order (ordered imap: the output is deterministic)."""
    from tqdm import tqdm

    results = map(make, jobs) if pool is None else pool.imap(make, jobs, chunksize=chunksize)
    yield from tqdm(results, total=len(jobs), desc=desc, unit="clip")


def synthesize(
    out: str | Path, *, train: int, eval: int, seed: int, workers: int = 1, shard_size: int = 1000
) -> dict:
    """Write ``out/train/shapes-%06d.tar`` and ``out/eval/{videos/, videoqa.jsonl, caption.jsonl}``.

    Returns counts and timing. Train and eval specs come from different per-split seeds; an
    eval spec equal to a training spec (or to an earlier eval spec) is skipped and replaced.
    """
    import multiprocessing

    out = Path(out)
    train_jobs = [(f"train-{i:07d}", _spec_for(seed, "train", i)) for i in range(train)]
    seen = {spec.key() for _, spec in train_jobs}
    eval_jobs: list[tuple[str, ClipSpec]] = []
    index = 0
    while len(eval_jobs) < eval:
        spec = _spec_for(seed, "eval", index)
        if spec.key() not in seen:
            seen.add(spec.key())
            eval_jobs.append((f"eval-{index:07d}", spec))
        index += 1

    start = time.perf_counter()
    # One pool for both splits; "spawn" because the caller may have imported torch (fork-unsafe).
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        num_shards, num_questions = _write_splits(out, train_jobs, eval_jobs, pool, shard_size)
    finally:
        if pool is not None:
            pool.terminate()
    seconds = time.perf_counter() - start
    return {
        "train_clips": len(train_jobs),
        "train_shards": num_shards,
        "eval_clips": len(eval_jobs),
        "eval_questions": num_questions,
        "seconds": seconds,
        "clips_per_second": (len(train_jobs) + len(eval_jobs)) / seconds if seconds > 0 else float("inf"),
    }


def _write_splits(out: Path, train_jobs, eval_jobs, pool, shard_size: int) -> tuple[int, int]:
    # The project's one shard writer (torch-free, so the generator never imports torch).
    from videollama.data.writer import write_shards

    train_samples = _render_all(pool, train_jobs, "train")
    shards = write_shards(train_samples, out / "train", prefix="shapes", max_bytes=2**62, max_count=shard_size)
    num_shards = len(shards)

    videos = out / "eval" / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    num_questions = 0
    with open(out / "eval" / "videoqa.jsonl", "w") as qa_file, open(out / "eval" / "caption.jsonl", "w") as cap_file:
        for key, mp4, meta in _render_all(pool, eval_jobs, "eval"):
            (videos / f"{key}.mp4").write_bytes(mp4)
            rel = f"videos/{key}.mp4"
            cap_file.write(json.dumps({"video": rel, "captions": [meta["caption"]]}) + "\n")
            for item in meta["qa"]:
                qa_file.write(json.dumps({"video": rel, **item}) + "\n")
                num_questions += 1
    (out / "eval" / "specs.jsonl").write_text(
        "".join(json.dumps({"video": f"videos/{k}.mp4", "spec": s.to_dict()}) + "\n" for k, s in eval_jobs)
    )
    return num_shards, num_questions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (gets train/ and eval/)")
    parser.add_argument("--train", type=int, default=2000, help="number of training clips")
    parser.add_argument("--eval", type=int, default=200, help="number of evaluation clips")
    parser.add_argument("--seed", type=int, default=0, help="corpus seed (train and eval seeds derive from it)")
    parser.add_argument("--workers", type=int, default=1, help="rendering processes")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per training shard")


def run(args: argparse.Namespace) -> int:
    for name in ("train", "eval"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {args.shard_size}")
    stats = synthesize(
        args.out, train=args.train, eval=args.eval, seed=args.seed, workers=args.workers, shard_size=args.shard_size
    )
    print(
        f"wrote {stats['train_clips']} training clips in {stats['train_shards']} shards to {args.out}/train, "
        f"{stats['eval_clips']} eval clips ({stats['eval_questions']} questions) to {args.out}/eval "
        f"in {stats['seconds']:.1f} s ({stats['clips_per_second']:.1f} clips/s)"
    )
    return 0
