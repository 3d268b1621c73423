"""``videollama data inspect PATH...``: look at what the loader will see.

Reads shards (``.tar``, folders of them, globs, brace patterns), evaluation-set ``.jsonl`` files
or loose video files through the same reader stages as training (``videollama.data.stages``),
decodes each sample with the preprocessing spec, and prints its key, caption, QA and sampled
timestamps. ``--json`` prints only ``{"samples": N, "skipped": {reason: count}}``;
``--sheet OUT.png`` saves a contact sheet of the first sample's frames.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from videollama.config import PreprocessConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH", help="shards, folders, globs, .jsonl or videos")
    parser.add_argument("--json", action="store_true", help='print only {"samples": N, "skipped": {...}}')
    parser.add_argument("--sheet", metavar="OUT.png", help="save a contact sheet of the first sample's frames")
    parser.add_argument("--limit", type=int, default=None, help="stop after N good samples")
    parser.add_argument("--video-root", default=None, help="video folder for .jsonl sources")
    parser.add_argument("--model", metavar="DIR", help="sample as this model directory does (its preprocessing "
                        "spec, preprocessor.json / config.json); --num-frames, --fps and --size then change it")
    parser.add_argument("--num-frames", type=int, default=None, help=f"default {PreprocessConfig.num_frames}")
    parser.add_argument("--fps", type=float, default=None, help=f"default {PreprocessConfig.fps}")
    parser.add_argument("--size", type=int, default=None, help=f"default {PreprocessConfig.size}")
    parser.add_argument("--workers", type=int, default=0, help="decoding processes (default 0: in-process)")


def inspect(
    paths: list[str], *, preprocess: PreprocessConfig, limit: int | None = None, video_root: str | None = None,
    num_workers: int = 0, sheet: str | None = None, echo=None,
) -> dict:
    """Decode the samples of ``paths``; return ``{"samples": good count, "skipped": {reason: count}}``.

    ``echo`` (e.g. ``print``) receives a human-readable description of each sample and skip.
    """
    from videollama.data.loader import iter_samples
    from videollama.data.stages import Skip

    good, skipped = 0, {}
    stream = iter_samples(paths, preprocess=preprocess, video_root=video_root, num_workers=num_workers)
    try:
        for item in stream:
            if isinstance(item, Skip):
                skipped[item.reason] = skipped.get(item.reason, 0) + 1
                if echo:
                    echo(f"SKIP {item.key} ({item.source}): {item.reason}: {item.message}")
                continue
            if good == 0 and sheet:
                save_contact_sheet(item.video, item.timestamps, preprocess, sheet)
            good += 1
            if echo:
                echo(describe(item))
            if limit is not None and good >= limit:
                break
    finally:
        stream.close()  # stops decoding workers when we stop early
    return {"samples": good, "skipped": dict(sorted(skipped.items()))}


def describe(sample) -> str:
    meta = sample.meta
    lines = [f"{sample.key}  ({sample.source})", f"  caption: {meta.get('caption', '')!r}"]
    for qa in meta.get("qa") or []:
        if isinstance(qa, dict):
            lines.append(f"  qa [{qa.get('kind', '')}]: {qa.get('question')!r} -> {qa.get('answer')!r}")
    lines.append("  timestamps: " + " ".join(f"{t:.2f}" for t in sample.timestamps.tolist()))
    return "\n".join(lines)


def save_contact_sheet(video, timestamps, preprocess: PreprocessConfig, out: str | Path) -> None:
    """Tile frames ``video [F, 3, S, S]`` (normalised) into a grid PNG; tiles of 64 px and more
    are labelled with their frame's time."""
    import torch
    from PIL import Image, ImageDraw

    mean = torch.tensor(preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.std).view(1, 3, 1, 1)
    pixels = ((video * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)  # [F, 3, S, S]
    pixels = pixels.permute(0, 2, 3, 1).numpy()  # [F, S, S, 3]
    frames, side = pixels.shape[0], pixels.shape[1]
    cols = math.ceil(math.sqrt(frames))
    rows = math.ceil(frames / cols)
    sheet = Image.new("RGB", (cols * side, rows * side))
    draw = ImageDraw.Draw(sheet)
    for i in range(frames):
        x, y = (i % cols) * side, (i // cols) * side
        sheet.paste(Image.fromarray(pixels[i]), (x, y))
        if side >= 64:  # a label would cover most of a smaller tile
            draw.text((x + 2, y + 2), f"{float(timestamps[i]):.2f}s", fill=(255, 255, 0))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, format="PNG")


def _preprocess(args: argparse.Namespace) -> PreprocessConfig:
    """The model's spec with --model (else the defaults), then the flags given."""
    from dataclasses import replace

    base = PreprocessConfig()
    if args.model is not None:
        from videollama.config import VideoLlamaConfig

        base = VideoLlamaConfig.load(args.model).preprocess
    given = {k: getattr(args, k) for k in ("num_frames", "fps", "size") if getattr(args, k) is not None}
    return replace(base, **given)


def run(args: argparse.Namespace) -> int:
    import logging

    # Skips are reported in the output itself; keep stderr for real warnings only.
    logging.getLogger("videollama.data.loader").setLevel(logging.ERROR)
    preprocess = _preprocess(args)
    result = inspect(
        args.paths, preprocess=preprocess, limit=args.limit, video_root=args.video_root,
        num_workers=args.workers, sheet=args.sheet, echo=None if args.json else print,
    )
    if args.json:
        print(json.dumps(result))
    else:
        skipped = ", ".join(f"{r}={n}" for r, n in result["skipped"].items()) or "none"
        print(f"{result['samples']} samples; skipped: {skipped}")
        if args.sheet:
            print(f"contact sheet: {args.sheet}")
    return 0
