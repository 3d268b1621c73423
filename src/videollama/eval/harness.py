"""The evaluation harness: ``videollama eval`` and :func:`evaluate`.

Reads an evaluation set (DESIGN.md section 4: a JSONL file plus a video root; the rules are
``videollama.data.evalset``'s, the training loader's too), decodes each
video with the model's own preprocessing spec, generates answers or captions greedily in
left-padded batches, and writes

- ``OUT/predictions.jsonl``: one line per item, in the order of the input file, with the
  prediction, the reference(s), whether it is correct (VideoQA) and the frame timestamps the
  model saw;
- ``OUT/metrics.json``: accuracy overall and by kind (VideoQA) or BLEU / METEOR / ROUGE-L /
  CIDEr (captioning), plus how many items were skipped because their video failed to load.

``--frames 1`` feeds only the centre frame, repeated to fill the clip: the gap between that
score and the full-clip score is what the temporal path adds.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from videollama.data import errors
from videollama.data.errors import BadSample
from videollama.data.evalset import TASKS, EvalItem, read_eval_set
from videollama.data.safe_io import resolve_inside

log = logging.getLogger(__name__)

# Shapes answers are at most a few words, captions up to three clauses; both leave room for BPE.
DEFAULT_MAX_NEW_TOKENS = {"videoqa": 16, "caption": 48}


# ---- video loading --------------------------------------------------------------------------
@dataclass
class LoadedVideo:
    """A decoded clip ``frames`` [F, 3, S, S] with the timestamps (s) of the frames the model
    sees, or the reason it could not be loaded (``frames`` is None then)."""

    frames: Any = None
    timestamps: list[float] | None = None
    error: str | None = None
    reason: str | None = None  # a videollama.data.errors code, with error


def load_video(path: Path, preprocess: Any, *, single_frame: bool) -> LoadedVideo:
    """Decode one evaluation video with the model's preprocessing spec (centred window).

    With ``single_frame`` the centre frame is repeated ``num_frames`` times, so that the model
    gets its usual input shape but no motion. Never raises for a bad video: evaluation counts
    it and goes on.
    """
    from videollama.data import load_clip

    try:
        frames, timestamps = load_clip(
            path, num_frames=preprocess.num_frames, fps=preprocess.fps, size=preprocess.size,
            mean=preprocess.mean, std=preprocess.std, start=None, train=False,
        )
    except Exception as e:  # noqa: BLE001 - a broken file of any kind must not end a long evaluation
        reason = (e.reason if isinstance(e, BadSample) else errors.MISSING_VIDEO
                  if isinstance(e, FileNotFoundError) else errors.DECODE_ERROR)
        return LoadedVideo(error=f"{type(e).__name__}: {e}", reason=reason)
    timestamps = [round(float(t), 4) for t in timestamps]
    if single_frame:
        centre = frames.shape[0] // 2
        frames = frames[centre : centre + 1].expand_as(frames).contiguous()  # [F, 3, S, S], all equal
        timestamps = [timestamps[centre]]
    return LoadedVideo(frames=frames, timestamps=timestamps)


# ---- generation -----------------------------------------------------------------------------
def _prompt_ids(tokenizer: Any, item: EvalItem, task: str) -> list[int]:
    from videollama.data.tokenizer import caption_prompt, encode_prompt, videoqa_prompt

    prompt = videoqa_prompt(item.question, item.options) if task == "videoqa" else caption_prompt()
    return list(encode_prompt(tokenizer, prompt))


# ---- the harness ----------------------------------------------------------------------------
def evaluate(
    model: Any,
    tokenizer: Any,
    task: str,
    data_path: str | Path,
    video_root: str | Path | None,
    out_dir: str | Path,
    *,
    batch_size: int = 8,
    frames: int | None = None,
    limit: int | None = None,
    max_new_tokens: int | None = None,
    meteor: bool | None = None,
    progress: bool = True,
    allow_outside_root: bool = False,
) -> dict[str, Any]:
    """Evaluate ``model`` on a VideoQA or captioning set; write predictions and metrics.

    Args:
        model: a VideoLlama (its ``config.preprocess`` decides how videos are decoded).
        tokenizer: the model's tokenizer (``videollama.data.tokenizer.load_tokenizer``).
        task: "videoqa" or "caption".
        data_path: the JSONL evaluation set; ``video_root``: folder its ``video`` paths are
            relative to (default: the JSONL file's folder).
        out_dir: receives ``predictions.jsonl`` and ``metrics.json``.
        frames: None for the full clip, 1 for the centre frame only (repeated).
        limit: evaluate only the first ``limit`` items.
        meteor: caption METEOR (a Java process); default: when Java is installed.
        allow_outside_root: let ``video`` paths leave ``video_root`` (refused by default).
    A line that is not a valid item, a video that does not load or lies outside the root, a
    question that does not fit the context: each is counted in ``skipped_by_reason`` and the
    evaluation goes on; an item of a skipped video or question is scored as wrong.
    Returns:
        the metrics dict written to ``metrics.json``.
    """
    from tqdm import tqdm

    from videollama.eval.metrics import caption_scores, require_java, videoqa_accuracy
    from videollama.inference.generate import generate_batch

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    preprocess = model.config.preprocess
    if frames not in (None, 1, preprocess.num_frames):
        raise ValueError(f"frames must be 1 (centre frame only) or {preprocess.num_frames} (the full clip)")
    single_frame = frames == 1
    if task == "caption":
        require_java()  # before hours of generation, not after: the metrics' PTB tokenizer is Java
    data_path = Path(data_path)
    video_root = Path(video_root) if video_root is not None else data_path.parent
    items, bad_lines = read_eval_set(data_path, task, limit=limit)
    for _, message in bad_lines:
        log.warning("skipping %s", message)
    max_new_tokens = max_new_tokens or DEFAULT_MAX_NEW_TOKENS[task]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").unlink(missing_ok=True)  # an earlier run's, which would read as this one's
    model.eval()

    # Questions about the same video become neighbours, so that a video is decoded once even
    # when its questions are spread over the file; output keeps the file's order.
    first_seen: dict[str, int] = {}
    for item in items:
        first_seen.setdefault(item.video, item.index)
    order = sorted(items, key=lambda it: (first_seen[it.video], it.index))

    records: dict[int, dict] = {}
    skipped: dict[int, tuple[str, str]] = {}  # item index -> (reason, message)
    loaded: dict[str, LoadedVideo] = {}  # only the videos of the current batch (grouping makes that enough)
    # Written as they are made (in the order of work), so an interruption keeps what was done;
    # rewritten in the file's order at the end.
    partial = (out_dir / "predictions.jsonl").open("w", encoding="utf-8")
    bar = tqdm(total=len(order), desc=f"eval {task}", unit="item", disable=not progress)
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            loaded = {v: loaded[v] for v in {it.video for it in batch} if v in loaded}
            for item in batch:
                if item.video not in loaded:
                    loaded[item.video] = _load_item_video(video_root, item.video, preprocess, single_frame,
                                                          allow_outside_root)
                video = loaded[item.video]
                if video.error is not None:
                    skipped[item.index] = (video.reason, video.error)
            ready, prompts = [], []
            for it in batch:
                if it.index in skipped:
                    continue
                ids = _prompt_ids(tokenizer, it, task)
                if len(ids) >= model.config.decoder.max_seq_len:  # not even one new token would fit
                    skipped[it.index] = (errors.PROMPT_TOO_LONG, f"prompt of {len(ids)} tokens leaves no room in "
                                                                 f"max_seq_len={model.config.decoder.max_seq_len}")
                    continue
                ready.append(it)
                prompts.append(ids)
            texts: dict[int, str] = {}
            if ready:
                distinct = list(dict.fromkeys(it.video for it in ready))
                generated = generate_batch(model, tokenizer, prompts, [loaded[v].frames for v in distinct],
                                           [distinct.index(it.video) for it in ready], max_new_tokens=max_new_tokens)
                texts = {it.index: text for it, text in zip(ready, generated)}
            for it in batch:
                if it.index in skipped:
                    log.warning("skipping %s (scored as wrong): %s", it.video, skipped[it.index][1])
                rec = _record(it, task, texts.get(it.index, ""), loaded[it.video].timestamps, skipped.get(it.index))
                records[it.index] = rec
                partial.write(json.dumps({"line_index": it.index, **rec}) + "\n")
            partial.flush()
            bar.update(len(batch))
    finally:
        bar.close()
        partial.close()

    # ---- score and write ----------------------------------------------------------------
    preds = [records[it.index]["prediction"] for it in items]
    by_reason: dict[str, int] = {}
    for reason, _ in [*skipped.values(), *((errors.INVALID_LINE, m) for _, m in bad_lines)]:
        by_reason[reason] = by_reason.get(reason, 0) + 1
    metrics: dict[str, Any] = {
        "task": task,
        "data": str(data_path),
        "model": getattr(model.config, "name", None),
        "n": len(items),  # items read; a skipped one is scored as wrong
        "evaluated": len(items) - len(skipped),
        "skipped": len(skipped) + len(bad_lines),  # items and lines that could not be evaluated
        "skipped_by_reason": dict(sorted(by_reason.items())),
        "skipped_videos": {items[i].video: m for i, (r, m) in sorted(skipped.items()) if r != errors.PROMPT_TOO_LONG},
        "bad_lines": [{"line": n, "error": m} for n, m in bad_lines[:100]],
        "frames": 1 if single_frame else preprocess.num_frames,
        "num_frames": preprocess.num_frames,
        "fps": preprocess.fps,
        "max_new_tokens": max_new_tokens,
    }
    if items and task == "videoqa":
        metrics.update(videoqa_accuracy(preds, [it.answer for it in items], [it.kind for it in items],
                                        options=[it.options for it in items]))
    elif items:
        # A skipped video's caption is empty: it matches nothing, as a wrong caption would.
        metrics.update(caption_scores(preds, [it.captions for it in items], meteor=meteor))
    tmp = out_dir / "predictions.jsonl.tmp"
    with tmp.open("w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps(records[it.index]) + "\n")
    os.replace(tmp, out_dir / "predictions.jsonl")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _load_item_video(root: Path, video: str, preprocess: Any, single_frame: bool, allow_outside_root: bool
                     ) -> LoadedVideo:
    try:
        path = resolve_inside(root, video, allow_outside=allow_outside_root)
    except BadSample as e:
        return LoadedVideo(error=str(e), reason=e.reason)
    return load_video(path, preprocess, single_frame=single_frame)


def _record(it: EvalItem, task: str, prediction: str, timestamps: list[float] | None,
            skip: tuple[str, str] | None) -> dict:
    from videollama.eval.metrics import is_correct

    if task == "videoqa":
        rec = {"video": it.video, "question": it.question, "prediction": prediction, "answer": it.answer,
               "kind": it.kind, "correct": skip is None and is_correct(prediction, it.answer, it.options)}
        if it.options is not None:
            rec["options"] = it.options
    else:
        rec = {"video": it.video, "references": it.captions, "prediction": prediction}
    rec["timestamps"] = timestamps  # None: the video failed to load
    if skip is not None:
        rec["error"], rec["skip_reason"] = skip[1], skip[0]
    return rec


# ---- command line ---------------------------------------------------------------------------
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
                        help="1: feed only the centre frame (repeated), to measure what motion adds")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N items only")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help=f"default: {DEFAULT_MAX_NEW_TOKENS['videoqa']} (videoqa), "
                             f"{DEFAULT_MAX_NEW_TOKENS['caption']} (caption)")
    parser.add_argument("--no-meteor", action="store_true", help="skip METEOR (saves a Java start)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--allow-outside-root", action="store_true",
                        help="let the JSONL's video paths leave --video-root (absolute, '..', links out)")


def run(args: argparse.Namespace) -> int:
    import torch

    from videollama.inference.load import load_for_inference

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Everything that can be checked before the model is loaded, is.
    if not (Path(args.model) / "tokenizer.json").is_file():
        raise FileNotFoundError(f"eval: model directory {args.model} has no tokenizer.json (convert with "
                                "--tokenizer, or copy the tokenizer the model was trained with into it)")
    for name in ("batch_size", "max_new_tokens", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    from videollama.config import VideoLlamaConfig

    num_frames = VideoLlamaConfig.load(args.model).preprocess.num_frames  # config.json only: cheap
    if args.frames not in (None, 1, num_frames):
        raise ValueError(f"--frames must be 1 (centre frame only) or {num_frames} (the full clip), got {args.frames}")
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
        allow_outside_root=args.allow_outside_root,
    )
    summary = {k: v for k, v in metrics.items() if k not in ("skipped_videos", "bad_lines", "data")}
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out / 'predictions.jsonl'} and {args.out / 'metrics.json'}")
    if metrics["evaluated"] == 0:
        print(f"videollama: error: nothing in {args.data} could be evaluated (skipped: "
              f"{metrics['skipped_by_reason']})", file=sys.stderr)
        return 1
    return 0
