"""The evaluation harness: :func:`evaluate` (``videollama eval``'s command line is eval/cli.py).

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

The steps: :func:`read_items` (the set), :func:`group_by_video` (one decode a video), then per
batch ``_load_batch_videos``, ``_batch_prompts``, ``_generate`` (the model), and at the end
``_score`` (metrics.json) and ``_write_outputs``; one ``_EvalRun`` carries what they share.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from videollama.data import errors
from videollama.data.errors import BadSample
from videollama.data.evalset import EvalItem, read_eval_set
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


def _load_item_video(root: Path, video: str, preprocess: Any, single_frame: bool, allow_outside_root: bool
                     ) -> LoadedVideo:
    try:
        path = resolve_inside(root, video, allow_outside=allow_outside_root)
    except BadSample as e:
        return LoadedVideo(error=str(e), reason=e.reason)
    return load_video(path, preprocess, single_frame=single_frame)


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
    from videollama.eval.metrics import require_java

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    preprocess = model.config.preprocess
    if frames not in (None, 1, preprocess.num_frames):
        raise ValueError(f"frames must be 1 (centre frame only) or {preprocess.num_frames} (the full clip)")
    if task == "caption":
        require_java()  # before hours of generation, not after: the metrics' PTB tokenizer is Java
    data_path = Path(data_path)
    run = _EvalRun(model=model, tokenizer=tokenizer, task=task,
                   video_root=Path(video_root) if video_root is not None else data_path.parent,
                   single_frame=frames == 1, allow_outside_root=allow_outside_root)
    items, bad_lines = read_items(data_path, task, limit=limit)
    run.max_new_tokens = max_new_tokens or DEFAULT_MAX_NEW_TOKENS[task]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").unlink(missing_ok=True)  # an earlier run's, which would read as this one's
    model.eval()
    _predict(run, items, batch_size, out_dir, progress=progress)
    metrics = _score(run, items, bad_lines, str(data_path), meteor=meteor)
    _write_outputs(out_dir, items, run.records, metrics)
    return metrics


@dataclass
class _EvalRun:
    """One evaluation: what every step reads (model, task, where videos are) and what the
    prediction steps fill in, by item index (each item's predictions.jsonl record, the skipped)."""

    model: Any
    tokenizer: Any
    task: str
    video_root: Path
    single_frame: bool
    allow_outside_root: bool
    max_new_tokens: int = 0
    records: dict[int, dict] = field(default_factory=dict)
    skipped: dict[int, tuple[str, str]] = field(default_factory=dict)  # (reason, message)


def read_items(data_path: Path, task: str, *, limit: int | None = None
               ) -> tuple[list[EvalItem], list[tuple[int, str]]]:
    """The evaluation set's items and its bad lines (``(line, message)``, each logged)."""
    items, bad_lines = read_eval_set(data_path, task, limit=limit)
    for _, message in bad_lines:
        log.warning("skipping %s", message)
    return items, bad_lines


def group_by_video(items: list[EvalItem]) -> list[EvalItem]:
    """Questions about the same video become neighbours (in the order each video first appears,
    then the file's), so that a video is decoded once even when its questions are spread out."""
    first_seen: dict[str, int] = {}
    for item in items:
        first_seen.setdefault(item.video, item.index)
    return sorted(items, key=lambda it: (first_seen[it.video], it.index))


def _predict(run: _EvalRun, items: list[EvalItem], batch_size: int, out_dir: Path, *, progress: bool) -> None:
    """Every item's prediction into ``run.records``, batch by batch in video order. Lines are also
    written as they are made (in the order of work, with their ``line_index``), so that an
    interruption keeps what was done; :func:`_write_outputs` rewrites them in the file's order."""
    from tqdm import tqdm

    order = group_by_video(items)
    loaded: dict[str, LoadedVideo] = {}  # only the videos of the current batch (grouping makes that enough)
    partial = (out_dir / "predictions.jsonl").open("w", encoding="utf-8")
    bar = tqdm(total=len(order), desc=f"eval {run.task}", unit="item", disable=not progress)
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            loaded = _load_batch_videos(run, batch, loaded)
            ready, prompts = _batch_prompts(run, batch)
            texts = _generate(run, ready, prompts, loaded)
            for it in batch:
                skip = run.skipped.get(it.index)
                if skip is not None:
                    log.warning("skipping %s (scored as wrong): %s", it.video, skip[1])
                rec = _record(it, run.task, texts.get(it.index, ""), loaded[it.video].timestamps, skip)
                run.records[it.index] = rec
                partial.write(json.dumps({"line_index": it.index, **rec}) + "\n")
            partial.flush()
            bar.update(len(batch))
    finally:
        bar.close()
        partial.close()


def _load_batch_videos(run: _EvalRun, batch: list[EvalItem], loaded: dict[str, LoadedVideo]
                       ) -> dict[str, LoadedVideo]:
    """The batch's videos by path: kept from the previous batch or decoded now. The items of a
    video that failed to load are marked skipped."""
    loaded = {v: loaded[v] for v in {it.video for it in batch} if v in loaded}
    for item in batch:
        if item.video not in loaded:
            loaded[item.video] = _load_item_video(run.video_root, item.video, run.model.config.preprocess,
                                                  run.single_frame, run.allow_outside_root)
        video = loaded[item.video]
        if video.error is not None:
            run.skipped[item.index] = (video.reason, video.error)
    return loaded


def _batch_prompts(run: _EvalRun, batch: list[EvalItem]) -> tuple[list[EvalItem], list[list[int]]]:
    """The batch's items that can be asked (not skipped, the prompt fits the context) and their
    prompt token ids; a prompt that leaves no room for one new token is marked skipped."""
    max_seq_len = run.model.config.decoder.max_seq_len
    ready, prompts = [], []
    for it in batch:
        if it.index in run.skipped:
            continue
        ids = _prompt_ids(run.tokenizer, it, run.task)
        if len(ids) >= max_seq_len:  # not even one new token would fit
            run.skipped[it.index] = (errors.PROMPT_TOO_LONG,
                                     f"prompt of {len(ids)} tokens leaves no room in max_seq_len={max_seq_len}")
            continue
        ready.append(it)
        prompts.append(ids)
    return ready, prompts


def _generate(run: _EvalRun, ready: list[EvalItem], prompts: list[list[int]],
              loaded: dict[str, LoadedVideo]) -> dict[int, str]:
    """Generated text by item index for the ready items, each distinct video encoded once."""
    if not ready:
        return {}
    distinct = list(dict.fromkeys(it.video for it in ready))
    from videollama.inference.generate import generate_batch

    generated = generate_batch(run.model, run.tokenizer, prompts, [loaded[v].frames for v in distinct],
                                [distinct.index(it.video) for it in ready], max_new_tokens=run.max_new_tokens)
    return {it.index: text for it, text in zip(ready, generated)}


def _record(it: EvalItem, task: str, prediction: str, timestamps: list[float] | None,
            skip: tuple[str, str] | None) -> dict:
    """One line of predictions.jsonl: the item, its prediction and, for a skipped item, why."""
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


def _score(run: _EvalRun, items: list[EvalItem], bad_lines: list[tuple[int, str]], data: str, *,
           meteor: bool | None) -> dict[str, Any]:
    """metrics.json: what was evaluated and skipped (by reason), then accuracy (VideoQA) or the
    caption metrics over every item (a skipped one scored as wrong)."""
    from videollama.eval.metrics import caption_scores, videoqa_accuracy

    preprocess = run.model.config.preprocess
    skipped = run.skipped
    preds = [run.records[it.index]["prediction"] for it in items]
    by_reason: dict[str, int] = {}
    for reason, _ in [*skipped.values(), *((errors.INVALID_LINE, m) for _, m in bad_lines)]:
        by_reason[reason] = by_reason.get(reason, 0) + 1
    metrics: dict[str, Any] = {
        "task": run.task,
        "data": data,
        "model": getattr(run.model.config, "name", None),
        "n": len(items),  # items read; a skipped one is scored as wrong
        "evaluated": len(items) - len(skipped),
        "skipped": len(skipped) + len(bad_lines),  # items and lines that could not be evaluated
        "skipped_by_reason": dict(sorted(by_reason.items())),
        "skipped_videos": {items[i].video: m for i, (r, m) in sorted(skipped.items()) if r != errors.PROMPT_TOO_LONG},
        "bad_lines": [{"line": n, "error": m} for n, m in bad_lines[:100]],
        "frames": 1 if run.single_frame else preprocess.num_frames,
        "num_frames": preprocess.num_frames,
        "fps": preprocess.fps,
        "max_new_tokens": run.max_new_tokens,
    }
    if items and run.task == "videoqa":
        metrics.update(videoqa_accuracy(preds, [it.answer for it in items], [it.kind for it in items],
                                        options=[it.options for it in items]))
    elif items:
        # A skipped video's caption is empty: it matches nothing, as a wrong caption would.
        metrics.update(caption_scores(preds, [it.captions for it in items], meteor=meteor))
    return metrics


def _write_outputs(out_dir: Path, items: list[EvalItem], records: dict[int, dict], metrics: dict[str, Any]) -> None:
    """predictions.jsonl in the file's order (replacing the partial one whole), then metrics.json."""
    tmp = out_dir / "predictions.jsonl.tmp"
    with tmp.open("w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps(records[it.index]) + "\n")
    os.replace(tmp, out_dir / "predictions.jsonl")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
