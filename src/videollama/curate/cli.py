"""``videollama curate``: raw videos and candidate texts -> curated clips, shards and a table.

    videollama curate --input INPUT --out OUT [--overwrite] [--config configs/curate-*.yaml] [--engine local|ray]
                      [--workers N] [--clip HF_CLIP_DIR] [--scorer MODEL_DIR] [--captioner MODEL_DIR]
                      [key=value ...]

The same command resumes a killed run (see ``videollama.curate.pipeline``); what ``--out`` may
hold and replace is ``videollama.curate.outdir``'s rule.
"""

from __future__ import annotations

import argparse
import logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="a folder of videos (sidecar .txt/.json texts) or a "
                        "manifest JSONL ({id, video, texts, ...} a line)")
    parser.add_argument("--out", required=True, help="output folder: shards/, clips.parquet, stats.json, "
                        "stats.png (and .work/, the completion records a resumed run reuses)")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous curate output in --out "
                        "(whole: the new run is written beside it and swapped in when complete); a non-empty "
                        "--out that is not a curate output is always refused")
    parser.add_argument("--config", help="a curate config YAML (configs/curate-default.yaml, curate-web.yaml)")
    parser.add_argument("--engine", choices=["local", "ray"], help="local process pool (default) or Ray Data "
                        "(RAY_ADDRESS if set, else a local Ray instance)")
    parser.add_argument("--workers", type=int, help="processes (local) or tasks (Ray) for per-video work; "
                        "0: one per core")
    parser.add_argument("--clip", help="a Hugging Face CLIPModel folder: CLIP similarity scores")
    parser.add_argument("--scorer", help="a VideoLlama model directory: PMI alignment scores")
    parser.add_argument("--captioner", help="a VideoLlama model directory: captions for clips without a good text")
    parser.add_argument("--device", help="torch device of the model stages (cpu, cuda)")
    parser.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                        help="config overrides, e.g. filter.threshold=0.5 dedup.enabled=false")


def run(args: argparse.Namespace) -> int:
    from videollama.curate.config import load_config
    from videollama.curate.pipeline import curate

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    overrides = list(args.overrides)
    for flag, key in (("engine", "engine"), ("workers", "workers"), ("clip", "clip.model"),
                      ("scorer", "scorer.model"), ("captioner", "captioner.model"), ("device", "device")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    cfg = load_config(args.config, overrides)
    stats = curate(args.input, args.out, cfg, overwrite=args.overwrite)
    counts = stats["counts"]
    print(f"curated {counts['sources']} sources into {counts['clips']} clips; kept {counts['kept']} in "
          f"{stats['shards']} shards under {args.out}/shards")
    if stats["corrupt"]:
        print("skipped sources: " + ", ".join(f"{r}={n}" for r, n in stats["corrupt"].items()))
    if stats["dropped_scenes"]:
        print("dropped scenes: " + ", ".join(f"{r}={n}" for r, n in stats["dropped_scenes"].items()))
    if stats["dropped"]:
        print("dropped clips: " + ", ".join(f"{r}={n}" for r, n in stats["dropped"].items()))
    if stats["resumed_videos"] or any(stats["resumed_batches"].values()):
        print(f"resumed: {stats['resumed_videos']} videos, batches {stats['resumed_batches']}")
    for warning in stats["warnings"]:
        print(f"warning: {warning}")
    return 0
