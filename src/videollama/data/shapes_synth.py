"""``videollama data synth``: the Shapes corpus (shapes.py) written to disk.

The training split as WebDataset shards (``train/shapes-%06d.tar``, ``KEY.mp4`` + ``KEY.json``
with the caption, questions and spec) and the evaluation split as ``videoqa.jsonl`` +
``caption.jsonl`` beside a ``videos/`` folder (plus ``specs.jsonl``: the full spec of every eval
clip, for analysis). Every clip's spec comes from its own seed (:func:`clip_seed`), so the output
never depends on the number of worker processes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import time
from pathlib import Path

from videollama.data.shapes import (
    FPS,
    HEIGHT,
    NUM_FRAMES,
    SOURCE,
    WIDTH,
    ClipSpec,
    caption,
    encode_mp4,
    iter_frames,
    questions,
    sample_clip_spec,
)


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


def render_all(pool, jobs: list, desc: str, *, make=_make_sample, chunksize: int = 4):
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

    train_samples = render_all(pool, train_jobs, "train")
    shards = write_shards(train_samples, out / "train", prefix="shapes", max_bytes=2**62, max_count=shard_size)
    num_shards = len(shards)

    videos = out / "eval" / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    num_questions = 0
    with open(out / "eval" / "videoqa.jsonl", "w") as qa_file, open(out / "eval" / "caption.jsonl", "w") as cap_file:
        for key, mp4, meta in render_all(pool, eval_jobs, "eval"):
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
