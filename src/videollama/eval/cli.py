"""``videollama eval``: a model directory on a VideoQA, multiple-choice, captioning or grounding set
-> predictions.jsonl and metrics.json (the harness: :func:`videollama.eval.harness.evaluate`). Every
video is seen whole, under the model's own window policy. Under torchrun each rank answers a share
of the videos and rank 0 writes the files (eval/ranks.py). ``--compare A B`` compares two finished
evaluations instead (eval/compare.py) and loads no model.

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

from videollama.data.read_policy import ReadPolicy
from videollama.eval.harness import DEFAULT_MAX_NEW_TOKENS, EVAL_TASKS, evaluate
from videollama.inference.whole_video import DEFAULT_WINDOWS_PER_CHUNK


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from videollama.inference.load import add_model_arguments

    add_model_arguments(parser, required=False)  # --model, --adapter, --quantize
    parser.add_argument("--task", choices=EVAL_TASKS,
                        help="mc: a VideoQA set as multiple choice, scored by option likelihood and by letter")
    parser.add_argument("--data", type=Path, help="evaluation set (JSONL)")
    parser.add_argument("--video-root", type=Path, default=None,
                        help="folder the JSONL's video paths are relative to (default: the JSONL's folder)")
    parser.add_argument("--out", type=Path, help="writes predictions.jsonl and metrics.json here")
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
    parser.add_argument("--num-options", type=int, default=4,
                        help="mc: options of a question that has none: its answer and up to N-1 distractors")
    parser.add_argument("--seed", type=int, default=0, help="draws the mc distractors and the bootstrap resamples")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples of the 95%% intervals")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"), default=None,
                        help="compare two evaluations (predictions.jsonl, metrics.json or output folders): "
                             "paired bootstrap by video of the difference; loads no model")


def run_compare(args: argparse.Namespace) -> int:
    """``--compare A B``: the comparison's lines on stdout, and as JSON in ``--out``/compare.json when given."""
    from videollama.eval.compare import compare, summary_lines

    if args.resamples < 1:
        raise ValueError(f"--resamples must be >= 1, got {args.resamples}")
    result = compare(*args.compare, resamples=args.resamples, seed=args.seed)
    print("\n".join(summary_lines(result)))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out / 'compare.json'}")
    return 0


def run(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.compare is not None:
        return run_compare(args)
    missing = [f"--{n}" for n in ("model", "task", "data", "out") if getattr(args, n) is None]
    if missing:
        raise ValueError(f"the following arguments are required: {', '.join(missing)} (or --compare A B)")
    from videollama.eval.ranks import init_from_env

    joined = init_from_env()  # under torchrun: this process is one rank of the evaluation
    try:
        return _run_eval(args)
    finally:
        if joined:
            import torch.distributed as dist

            dist.destroy_process_group()


def _run_eval(args: argparse.Namespace) -> int:
    import torch

    from videollama.eval.ranks import local_device, rank_and_world
    from videollama.inference.load import load_for_inference, refuse_run_dir

    # Everything that can be checked before the model is loaded, is.
    refuse_run_dir(args.model)
    if not (Path(args.model) / "tokenizer.json").is_file():
        raise FileNotFoundError(f"eval: model directory {args.model} has no tokenizer.json (convert with "
                                "--tokenizer, or copy the tokenizer the model was trained with into it)")
    for name in ("batch_size", "max_new_tokens", "limit", "windows_per_chunk", "resamples"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    from videollama.config import VideoLlamaConfig

    num_frames = VideoLlamaConfig.load(args.model).preprocess.num_frames  # config.json only: cheap
    if args.frames not in (None, 1, num_frames):
        raise ValueError(f"--frames must be 1 (one frame for the whole video) or {num_frames} (every frame), "
                         f"got {args.frames}")
    if args.task == "mc" and args.num_options < 2:
        raise ValueError(f"--num-options must be >= 2, got {args.num_options}")
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
    device = local_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tokenizer = load_for_inference(args.model, adapter=args.adapter, quantize=args.quantize, device=device)
    metrics = evaluate(
        model, tokenizer, args.task, args.data, args.video_root, args.out,
        batch_size=args.batch_size, frames=args.frames, limit=args.limit,
        max_new_tokens=args.max_new_tokens, meteor=False if args.no_meteor else None,
        policy=ReadPolicy(allow_outside_root=args.allow_outside_root), windows_per_chunk=args.windows_per_chunk,
        num_options=args.num_options, seed=args.seed, resamples=args.resamples,
        model_dir=args.model, adapter_dir=args.adapter,
    )
    if rank_and_world()[0] != 0:  # rank 0 wrote the files and reports
        return 0
    summary = {k: v for k, v in metrics.items()
               if k not in ("skipped_videos", "bad_lines", "data", "provenance", "ci95", "scoring")}
    print(json.dumps(summary, indent=2))
    extra = f" and {args.out / 'niah.png'}" if "niah" in metrics else ""
    print(f"wrote {args.out / 'predictions.jsonl'}, {args.out / 'metrics.json'}{extra}")
    if metrics["evaluated"] == 0:
        print(f"videollama: error: nothing in {args.data} could be evaluated (skipped: "
              f"{metrics['skipped_by_reason']})", file=sys.stderr)
        return 1
    return 0
