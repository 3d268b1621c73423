"""``videollama eval``: a model directory on a VideoQA, captioning or grounding set ->
predictions.jsonl and metrics.json (the harness: :func:`videollama.eval.harness.evaluate`). Every
video is seen whole, under the model's own window policy.

Everything that can be checked before the model is loaded is checked first, so a wrong flag or
path costs a one-line error, not a model load.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from videollama.data.evalset import TASKS
from videollama.eval.harness import DEFAULT_MAX_NEW_TOKENS, evaluate
from videollama.inference.whole_video import DEFAULT_WINDOWS_PER_CHUNK


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from videollama.inference.load import add_model_arguments

    add_model_arguments(parser)  # --model, --adapter, --quantize
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--data", required=True, type=Path, help="evaluation set (JSONL)")
    parser.add_argument("--video-root", type=Path, default=None,
                        help="folder the JSONL's video paths are relative to (default: the JSONL's folder)")
    parser.add_argument("--out", required=True, type=Path, help="writes predictions.jsonl and metrics.json here")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--frames", type=int, default=None,
                        help="1: one frame of each video (at half its duration) in every frame of every "
                             "window, to measure what motion adds")
    parser.add_argument("--windows-per-chunk", type=int, default=DEFAULT_WINDOWS_PER_CHUNK,
                        help="windows decoded and encoded at a time (memory holds one chunk of frames)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N items only")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help=f"default: {DEFAULT_MAX_NEW_TOKENS['videoqa']} (videoqa), "
                             f"{DEFAULT_MAX_NEW_TOKENS['caption']} (caption), "
                             f"{DEFAULT_MAX_NEW_TOKENS['grounding']} (grounding)")
    parser.add_argument("--no-meteor", action="store_true", help="skip METEOR (saves a Java start)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--allow-outside-root", action="store_true",
                        help="let the JSONL's video paths leave --video-root (absolute, '..', links out)")


def run(args: argparse.Namespace) -> int:
    import torch

    from videollama.inference.load import load_for_inference, refuse_run_dir

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Everything that can be checked before the model is loaded, is.
    refuse_run_dir(args.model)
    if not (Path(args.model) / "tokenizer.json").is_file():
        raise FileNotFoundError(f"eval: model directory {args.model} has no tokenizer.json (convert with "
                                "--tokenizer, or copy the tokenizer the model was trained with into it)")
    for name in ("batch_size", "max_new_tokens", "limit", "windows_per_chunk"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    from videollama.config import VideoLlamaConfig

    num_frames = VideoLlamaConfig.load(args.model).preprocess.num_frames  # config.json only: cheap
    if args.frames not in (None, 1, num_frames):
        raise ValueError(f"--frames must be 1 (one frame for the whole video) or {num_frames} (every frame), "
                         f"got {args.frames}")
    if args.task == "caption":  # the metrics' PTB tokenizer is Java, METEOR or not
        from videollama.eval.metrics import require_java

        require_java()
    if not args.data.exists():
        raise FileNotFoundError(f"{args.data}: evaluation set not found")
    if args.video_root is not None and not args.video_root.is_dir():
        raise FileNotFoundError(f"--video-root {args.video_root}: no such folder")
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} is a file; give a folder for predictions.jsonl and metrics.json")
    args.out.mkdir(parents=True, exist_ok=True)
    if not os.access(args.out, os.W_OK):
        raise PermissionError(f"--out {args.out}: the folder is not writable")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_for_inference(args.model, adapter=args.adapter, quantize=args.quantize, device=device)
    metrics = evaluate(
        model, tokenizer, args.task, args.data, args.video_root, args.out,
        batch_size=args.batch_size, frames=args.frames, limit=args.limit,
        max_new_tokens=args.max_new_tokens, meteor=False if args.no_meteor else None,
        allow_outside_root=args.allow_outside_root, windows_per_chunk=args.windows_per_chunk,
    )
    summary = {k: v for k, v in metrics.items() if k not in ("skipped_videos", "bad_lines", "data")}
    print(json.dumps(summary, indent=2))
    extra = f" and {args.out / 'niah.png'}" if "niah" in metrics else ""
    print(f"wrote {args.out / 'predictions.jsonl'}, {args.out / 'metrics.json'}{extra}")
    if metrics["evaluated"] == 0:
        print(f"videollama: error: nothing in {args.data} could be evaluated (skipped: "
              f"{metrics['skipped_by_reason']})", file=sys.stderr)
        return 1
    return 0
