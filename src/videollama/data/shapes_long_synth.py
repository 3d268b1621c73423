"""``videollama data synth-long``: the Shapes-Long corpus on disk (docs/SHAPES.md, "Long mode").

    OUT/train/shapes-long-%06d.tar   WebDataset shards: KEY.mp4 + KEY.json (caption, qa with the
                                     grounding questions, duration_s, events, spec)
    OUT/eval/needle/                 the V-NIAH grid: per-cell videos per (duration, depth), k = 1
    OUT/eval/whole/                  per-duration videos with k drawn as in training
        videos/KEY.mp4
        videoqa.jsonl                kinds needle, order, count; duration_s (and depth in needle/)
        grounding.jsonl              {"video", "question", "segments": [[s, e]], "duration_s", ...}
        caption.jsonl, specs.jsonl   the caption and the full spec of every video

Every video's spec comes from its own seed (``shapes.clip_seed`` of this corpus, its split and
index), so the output depends on ``--seed`` alone, never on ``--workers``. An evaluation spec
that equals a training spec, or one already taken, is skipped and the next index is drawn.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from functools import partial
from pathlib import Path

from videollama.data import shapes
from videollama.data.shapes_long import (
    FPS,
    SOURCE,
    LongSpec,
    caption,
    check_duration,
    encode_video,
    event_list,
    grounding_items,
    questions,
    sample_long_spec,
)

EVAL_DURATIONS = (30, 60, 120, 300, 600)
EVAL_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
QA_KINDS = ("needle", "order", "count")  # videoqa.jsonl; grounding questions go to grounding.jsonl


class TrainDurations:
    """Training durations: ``"LO:HI"`` draws a whole number uniformly in LO..HI, ``"A,B,C"`` one of them."""

    def __init__(self, text: str):
        self.text = text
        try:
            if ":" in text:
                lo, hi = (int(p) for p in text.split(":"))
                self.choices = None
                self.bounds = (lo, hi)
                values = [lo, hi]
            else:
                self.choices = parse_int_list(text)
                self.bounds = None
                values = self.choices
        except ValueError as e:
            raise ValueError(f"--duration {text!r}: write LO:HI (e.g. 30:600) or a list (e.g. 30,60,120)") from e
        for value in values:
            check_duration(value)
        if self.bounds is not None and self.bounds[0] > self.bounds[1]:
            raise ValueError(f"--duration {text!r}: LO must not exceed HI")

    def draw(self, rng: random.Random) -> int:
        return rng.randint(*self.bounds) if self.bounds is not None else rng.choice(self.choices)


def parse_int_list(text: str) -> list[int]:
    values = [int(p) for p in text.split(",") if p.strip()]
    if not values:
        raise ValueError(f"empty list {text!r}")
    return values


def parse_depths(text: str) -> list[float]:
    depths = [float(p) for p in text.split(",") if p.strip()]
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"--depths {text!r}: give numbers in [0, 1], e.g. 0,0.25,0.5,0.75,1")
    if len({_depth_tag(d) for d in depths}) != len(depths):
        raise ValueError(f"--depths {text!r}: depths must differ by at least 0.01")
    return depths


def _depth_tag(depth: float) -> str:
    return f"d{round(depth * 100):03d}"


# ---------------------------------------------------------------------------------------
# Specs per split (cheap: no rendering)
# ---------------------------------------------------------------------------------------


def _seeded(seed: int, split: str, index: int) -> random.Random:
    return random.Random(shapes.clip_seed(seed, split, index, source=SOURCE))


def train_specs(seed: int, count: int, durations: TrainDurations) -> list[tuple[str, LongSpec]]:
    jobs = []
    for i in range(count):
        rng = _seeded(seed, "train", i)
        jobs.append((f"long-train-{i:07d}", sample_long_spec(rng, durations.draw(rng))))
    return jobs


def _fresh_specs(seed: int, split: str, count: int, seen: set[str], make) -> list[tuple[int, LongSpec]]:
    """``count`` specs of ``split`` not in ``seen`` (which they join), with the index each was drawn at."""
    found, index = [], 0
    while len(found) < count:
        spec = make(_seeded(seed, split, index))
        if spec.key() not in seen:
            seen.add(spec.key())
            found.append((index, spec))
        index += 1
    return found


def needle_specs(seed: int, durations, depths, per_cell: int, seen: set[str]) -> list[tuple[str, LongSpec]]:
    jobs = []
    for duration in durations:
        for depth in depths:
            split = f"needle/{duration}/{depth!r}"
            made = _fresh_specs(seed, split, per_cell, seen, partial(sample_long_spec, duration_s=duration, depth=depth))
            jobs += [(f"needle-{duration:04d}s-{_depth_tag(depth)}-{i:04d}", spec) for i, spec in made]
    return jobs


def whole_specs(seed: int, durations, per_duration: int, seen: set[str]) -> list[tuple[str, LongSpec]]:
    jobs = []
    for duration in durations:
        made = _fresh_specs(seed, f"whole/{duration}", per_duration, seen, partial(sample_long_spec, duration_s=duration))
        jobs += [(f"whole-{duration:04d}s-{i:04d}", spec) for i, spec in made]
    return jobs


# ---------------------------------------------------------------------------------------
# Rendering and files
# ---------------------------------------------------------------------------------------


def make_sample(job: tuple[str, LongSpec]) -> tuple[str, bytes, dict]:
    """Worker: render + encode one video. Returns ``(key, mp4 bytes, metadata)``."""
    key, spec = job
    meta = {
        "caption": caption(spec),
        "qa": questions(spec),
        "source": SOURCE,
        "key": key,
        "width": shapes.WIDTH,
        "height": shapes.HEIGHT,
        "fps": FPS,
        "num_frames": spec.num_frames,
        "duration_s": spec.duration_s,
        "events": event_list(spec),
        "spec": spec.to_dict(),
    }
    if spec.depth is not None:
        meta["depth"] = spec.depth
    return key, encode_video(spec), meta


def _write_eval_split(folder: Path, samples, jobs: list[tuple[str, LongSpec]]) -> dict:
    """Write one evaluation split's videos and line files; return its counts."""
    (folder / "videos").mkdir(parents=True, exist_ok=True)
    counts = {"videos": 0, "questions": 0, "grounding": 0}
    names = ("videoqa.jsonl", "grounding.jsonl", "caption.jsonl")
    files = {name: open(folder / name, "w", encoding="utf-8") for name in names}
    try:
        for (key, mp4, meta), (_, spec) in zip(samples, jobs):
            rel = f"videos/{key}.mp4"
            (folder / rel).write_bytes(mp4)
            tags = {"duration_s": spec.duration_s} | ({} if spec.depth is None else {"depth": spec.depth})
            files["caption.jsonl"].write(json.dumps({"video": rel, "captions": [meta["caption"]], **tags}) + "\n")
            for item in meta["qa"]:
                if item["kind"] in QA_KINDS:
                    files["videoqa.jsonl"].write(json.dumps({"video": rel, **item, **tags}) + "\n")
                    counts["questions"] += 1
            for item in grounding_items(spec):
                files["grounding.jsonl"].write(json.dumps({"video": rel, **item, **tags}) + "\n")
                counts["grounding"] += 1
            counts["videos"] += 1
    finally:
        for f in files.values():
            f.close()
    (folder / "specs.jsonl").write_text(
        "".join(json.dumps({"video": f"videos/{k}.mp4", "spec": s.to_dict()}) + "\n" for k, s in jobs)
    )
    return counts


def synthesize_long(out: str | Path, *, train: int, durations: TrainDurations, eval_durations, depths,
                    per_cell: int, per_duration: int, seed: int, workers: int = 1, shard_size: int = 100) -> dict:
    """Write the training shards and the two evaluation splits; return counts and timing."""
    import multiprocessing

    from videollama.data.writer import write_shards

    out = Path(out)
    train_jobs = train_specs(seed, train, durations)
    seen = {spec.key() for _, spec in train_jobs}
    needle_jobs = needle_specs(seed, eval_durations, depths, per_cell, seen)
    whole_jobs = whole_specs(seed, eval_durations, per_duration, seen)

    start = time.perf_counter()
    # One pool for every split; "spawn" because the caller may have imported torch (fork-unsafe).
    # Videos differ a lot in length, so each worker takes one at a time.
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    stats: dict = {"train_videos": len(train_jobs)}
    try:
        def render(jobs, desc):
            return shapes._render_all(pool, jobs, desc, make=make_sample, chunksize=1)

        shards = write_shards(render(train_jobs, "train"), out / "train", prefix="shapes-long",
                              max_bytes=2**62, max_count=shard_size) if train_jobs else []
        stats["train_shards"] = len(shards)
        for name, jobs in (("needle", needle_jobs), ("whole", whole_jobs)):
            if jobs:
                stats[name] = _write_eval_split(out / "eval" / name, render(jobs, name), jobs)
    finally:
        if pool is not None:
            pool.terminate()
    seconds = time.perf_counter() - start
    video_s = sum(spec.duration_s for _, spec in train_jobs + needle_jobs + whole_jobs)
    stats.update(seconds=seconds, video_seconds=video_s,
                 video_seconds_per_second=video_s / seconds if seconds > 0 else float("inf"))
    return stats


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (gets train/ and eval/{needle,whole}/)")
    parser.add_argument("--train", type=int, default=200, help="number of training videos")
    parser.add_argument("--duration", default="30:600",
                        help="training durations in whole seconds: LO:HI (uniform) or a list A,B,C (default 30:600)")
    parser.add_argument("--durations", default=",".join(map(str, EVAL_DURATIONS)),
                        help="evaluation durations in seconds, for both evaluation splits (default 30,60,120,300,600)")
    parser.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths in [0, 1]")
    parser.add_argument("--per-cell", type=int, default=1, help="needle videos per (duration, depth) cell")
    parser.add_argument("--per-duration", type=int, default=4,
                        help="whole-video QA/grounding videos per evaluation duration (k drawn as in training)")
    parser.add_argument("--seed", type=int, default=0, help="corpus seed (every split's seeds derive from it)")
    parser.add_argument("--workers", type=int, default=1, help="rendering processes")
    parser.add_argument("--shard-size", type=int, default=100, help="videos per training shard")


def run(args: argparse.Namespace) -> int:
    for name in ("train", "per_cell", "per_duration"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.shard_size < 1 or args.workers < 1:
        raise ValueError("--shard-size and --workers must be >= 1")
    eval_durations = parse_int_list(args.durations)
    for duration in eval_durations:
        check_duration(duration)
    stats = synthesize_long(
        args.out, train=args.train, durations=TrainDurations(args.duration), eval_durations=eval_durations,
        depths=parse_depths(args.depths), per_cell=args.per_cell, per_duration=args.per_duration,
        seed=args.seed, workers=args.workers, shard_size=args.shard_size,
    )
    parts = [f"{stats['train_videos']} training videos in {stats['train_shards']} shards"]
    for name in ("needle", "whole"):
        if name in stats:
            s = stats[name]
            parts.append(f"{name}: {s['videos']} videos, {s['questions']} questions, {s['grounding']} grounding")
    print(f"wrote {'; '.join(parts)} to {args.out} in {stats['seconds']:.1f} s "
          f"({stats['video_seconds_per_second']:.0f} video seconds/s)")
    return 0
