"""The evaluation harness: :func:`evaluate` (``videollama eval``'s command line is eval/cli.py).

Reads an evaluation set (DESIGN.md section 4: a JSONL file plus a video root; the rules are
``videollama.data.evalset``'s, the training loader's too), sees each video WHOLE under the
model's own policy (``model.config.preprocess``: the windows that tile or spread over it,
``videollama.data.windows``), decoded and encoded a chunk of windows at a time so that memory is
bounded by latents, never by frames (``inference/whole_video.py``), generates answers or captions
greedily in left-padded batches (the questions about one video share its latents), and writes

- ``OUT/predictions.jsonl``: one line per item, in the order of the input file, with the
  prediction, the reference(s), whether it is correct (VideoQA) or its IoU (grounding), and
  ``timestamps``: every frame the model saw, per window (seconds from the video's start);
- ``OUT/metrics.json``: accuracy overall, by kind and by ``duration_s`` / ``depth`` when the
  lines carry them (VideoQA), with the needle-in-a-haystack table when needle lines carry both
  (and ``OUT/niah.png``); R@0.3/0.5/0.7, mIoU and parse failures (grounding, by duration too);
  BLEU / METEOR / ROUGE-L / CIDEr (captioning); how many items were skipped, by reason.

``--frames 1`` feeds ONE frame for the whole video (the one at half its duration) in every frame
of every window: the gap between that score and the full score is what motion adds.

The steps: :func:`read_items` (the set), :func:`group_by_video` (one encoding a video), then per
batch :func:`encode_batch_videos`, ``_batch_prompts``, ``_generate`` (the model), and at the end
:func:`score` (metrics.json, eval/scoring.py) and ``_write_outputs``; one ``_EvalRun`` carries
what they share.
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
from videollama.data.read_policy import DEFAULT_POLICY, ReadPolicy
from videollama.eval.ranks import gather_to_first, rank_and_world, shard_by_video
from videollama.inference.whole_video import DEFAULT_WINDOWS_PER_CHUNK, EncodedVideo

log = logging.getLogger(__name__)

# Shapes answers are at most a few words, captions up to three clauses, time ranges
# ("from 123.4 to 130.0 seconds") about a dozen tokens; all leave room for BPE.
DEFAULT_MAX_NEW_TOKENS = {"videoqa": 16, "mc": 16, "caption": 48, "grounding": 24}
# The tasks of ``evaluate``: the evaluation-set tasks, and multiple choice over a VideoQA set.
EVAL_TASKS = ("videoqa", "mc", "caption", "grounding")


# ---- videos -----------------------------------------------------------------------------------
@dataclass
class LoadedVideo:
    """A whole video encoded under the model's policy, or the reason it could not be loaded
    (``encoded`` is None then)."""

    encoded: EncodedVideo | None = None
    error: str | None = None
    reason: str | None = None  # a videollama.data.errors code, with error

    @property
    def timestamps(self) -> list[list[float]] | None:
        """Every frame time the model saw, per window (None: the video failed to load)."""
        return None if self.encoded is None else self.encoded.frame_times_list()


def load_video(path: Path, model: Any, *, single_frame: bool, windows_per_chunk: int = DEFAULT_WINDOWS_PER_CHUNK,
               policy: ReadPolicy = DEFAULT_POLICY) -> LoadedVideo:
    """Decode and encode one evaluation video whole (``inference.whole_video.encode_whole_video``).

    With ``single_frame`` one frame (at half the duration) fills every frame of every window, so
    that the model gets its usual input but no motion. A bad video never raises: evaluation counts
    it and goes on (the model's own errors do raise).
    """
    from videollama.inference.whole_video import encode_whole_video

    try:
        encoded = encode_whole_video(model, path, single_frame=single_frame, windows_per_chunk=windows_per_chunk,
                                     time_budget_s=policy.video_time_budget_s)
    except BadSample as e:
        return LoadedVideo(error=f"{type(e).__name__}: {e}", reason=e.reason)
    except FileNotFoundError as e:
        return LoadedVideo(error=f"{type(e).__name__}: {e}", reason=errors.MISSING_VIDEO)
    return LoadedVideo(encoded=encoded)


def _load_item_video(run: _EvalRun, video: str) -> LoadedVideo:
    try:
        path = run.policy.resolve(run.video_root, video)
    except BadSample as e:
        return LoadedVideo(error=str(e), reason=e.reason)
    return load_video(path, run.model, single_frame=run.single_frame, windows_per_chunk=run.windows_per_chunk,
                      policy=run.policy)


# ---- generation -----------------------------------------------------------------------------
def _prompt_ids(tokenizer: Any, item: EvalItem, task: str) -> list[int]:
    from videollama.data.tokenizer import caption_prompt, encode_prompt, videoqa_prompt

    # A grounding question is asked as any question is; its answer is a time range.
    prompt = caption_prompt() if task == "caption" else videoqa_prompt(item.question, item.options)
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
    policy: ReadPolicy | None = None,
    windows_per_chunk: int = DEFAULT_WINDOWS_PER_CHUNK,
    num_options: int = 4,
    seed: int = 0,
    resamples: int = 2000,
    model_dir: str | Path | None = None,
    adapter_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` on a VideoQA, multiple-choice, captioning or grounding set; write predictions
    and metrics.

    Args:
        model: a VideoLlama (its ``config.preprocess`` decides how videos are windowed and decoded).
        tokenizer: the model's tokenizer (``videollama.data.tokenizer.load_tokenizer``).
        task: "videoqa", "caption", "grounding", or "mc": a VideoQA set as multiple choice, answered
            by option likelihood and by letter (``eval/multiple_choice.py``; ``num_options`` and
            ``seed`` draw the options of a line that has none).
        data_path: the JSONL evaluation set; ``video_root``: folder its ``video`` paths are
            relative to (default: the JSONL file's folder).
        out_dir: receives ``predictions.jsonl``, ``metrics.json`` (and ``niah.png``).
        frames: None for every frame, 1 for one frame of the whole video (repeated everywhere).
        limit: evaluate only the first ``limit`` items.
        meteor: caption METEOR (a Java process); default: when Java is installed.
        policy: where ``video`` paths may point (inside ``video_root`` unless it allows more) and what one
            video may cost to decode (:class:`videollama.data.read_policy.ReadPolicy`; default its defaults).
        windows_per_chunk: windows decoded and encoded at a time (memory: one chunk of frames).
        resamples: bootstrap resamples of the 95% intervals (``ci95``; videos resampled, seeded by ``seed``).
        model_dir, adapter_dir: the directories the model was loaded from, hashed into ``provenance``.
    Under ``torch.distributed`` (torchrun) each rank answers its share of the videos and rank 0
    writes the files (eval/ranks.py); the other ranks return ``{"rank": r}``.
    A line that is not a valid item, a video that does not load or lies outside the root, a
    question that does not fit the context: each is counted in ``skipped_by_reason`` and the
    evaluation goes on; an item of a skipped video or question is scored as wrong.
    Returns:
        the metrics dict written to ``metrics.json``.
    """
    from videollama.eval.provenance import provenance
    from videollama.eval.scoring import score

    _check_arguments(task, batch_size, frames, model.config.preprocess.num_frames)
    data_path = Path(data_path)
    run = _EvalRun(model=model, tokenizer=tokenizer, task=task,
                   video_root=Path(video_root) if video_root is not None else data_path.parent,
                   single_frame=frames == 1, policy=policy or ReadPolicy(),
                   windows_per_chunk=windows_per_chunk)
    items, bad_lines = read_items(data_path, "videoqa" if task == "mc" else task, limit=limit)
    if task == "mc":
        from videollama.eval.multiple_choice import mc_items

        items = mc_items(items, num_options=num_options, seed=seed)
    run.max_new_tokens = max_new_tokens or DEFAULT_MAX_NEW_TOKENS[task]
    out_dir = Path(out_dir)
    rank = _predict_on_ranks(run, items, batch_size, out_dir, progress=progress)
    if rank != 0:
        return {"rank": rank}
    metrics = score(run, items, bad_lines, str(data_path), out_dir, meteor=meteor, resamples=resamples, seed=seed)
    metrics["provenance"] = provenance(model, data_path, model_dir=model_dir, adapter_dir=adapter_dir,
                                       seeds={"options": seed, "bootstrap": seed})
    _write_outputs(out_dir, items, run.records, metrics)
    return metrics


def _check_arguments(task: str, batch_size: int, frames: int | None, num_frames: int) -> None:
    """:func:`evaluate`'s arguments, refused before anything is read or generated."""
    from videollama.eval.metrics import require_java

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if frames not in (None, 1, num_frames):
        raise ValueError(f"frames must be 1 (one frame for the whole video) or {num_frames} (every frame)")
    if task == "caption":
        require_java()  # before hours of generation, not after: the metrics' PTB tokenizer is Java
    if task not in EVAL_TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {EVAL_TASKS}")


def _predict_on_ranks(run: _EvalRun, items: list[EvalItem], batch_size: int, out_dir: Path, *,
                      progress: bool) -> int:
    """This rank's share of ``items`` answered (eval/ranks.py); rank 0 ends with every rank's
    records and skips in ``run``. Returns the rank."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rank, world = rank_and_world()
    if rank == 0:
        for stale in ("metrics.json", "niah.png"):  # an earlier run's, which would read as this one's
            (out_dir / stale).unlink(missing_ok=True)
    run.model.eval()
    partial = "predictions.jsonl" if world == 1 else f"predictions.rank{rank}.partial.jsonl"
    share = shard_by_video(items, rank, world)
    if world > 1:
        log.info("rank %d of %d: %d of the %d items, %d videos", rank, world, len(share), len(items),
                 len({it.video for it in share}))
    _predict(run, share, batch_size, out_dir / partial, progress=progress and rank == 0)
    gathered = gather_to_first(run.records, run.skipped, world)
    if world > 1:
        (out_dir / partial).unlink(missing_ok=True)
    if gathered is not None:
        run.records, run.skipped = gathered
    return rank


@dataclass
class _EvalRun:
    """One evaluation: what every step reads (model, task, where videos are) and what the
    prediction steps fill in, by item index (each item's predictions.jsonl record, the skipped)."""

    model: Any
    tokenizer: Any
    task: str
    video_root: Path
    single_frame: bool
    policy: ReadPolicy
    windows_per_chunk: int = DEFAULT_WINDOWS_PER_CHUNK
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
    then the file's), so that a video is encoded once even when its questions are spread out."""
    first_seen: dict[str, int] = {}
    for item in items:
        first_seen.setdefault(item.video, item.index)
    return sorted(items, key=lambda it: (first_seen[it.video], it.index))


def _predict(run: _EvalRun, items: list[EvalItem], batch_size: int, partial_path: Path, *, progress: bool) -> None:
    """Every item's prediction into ``run.records``, batch by batch in video order. Lines are also
    written as they are made (in the order of work, with their ``line_index``), so that an
    interruption keeps what was done; :func:`_write_outputs` rewrites them in the file's order."""
    from tqdm import tqdm

    order = group_by_video(items)
    loaded: dict[str, LoadedVideo] = {}  # only the videos of the current batch (grouping makes that enough)
    partial = partial_path.open("w", encoding="utf-8")
    bar = tqdm(total=len(order), desc=f"eval {run.task}", unit="item", disable=not progress)
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            loaded = encode_batch_videos(run, batch, loaded)
            answers = _answer_batch(run, batch, loaded, batch_size)
            for it in batch:
                skip = run.skipped.get(it.index)
                if skip is not None:
                    log.warning("skipping %s (scored as wrong): %s", it.video, skip[1])
                rec = _record(it, run.task, answers.get(it.index), loaded[it.video].timestamps, skip)
                run.records[it.index] = rec
                partial.write(json.dumps({"line_index": it.index, **rec}) + "\n")
            partial.flush()
            bar.update(len(batch))
    finally:
        bar.close()
        partial.close()


def encode_batch_videos(run: _EvalRun, batch: list[EvalItem], loaded: dict[str, LoadedVideo]
                        ) -> dict[str, LoadedVideo]:
    """The batch's videos by path, each encoded whole: kept from the previous batch (only the last
    video of a batch can continue into the next, since grouping keeps a video's questions together)
    or encoded now. The items of a video that failed to load are marked skipped."""
    loaded = {v: loaded[v] for v in {it.video for it in batch} if v in loaded}
    for item in batch:
        if item.video not in loaded:
            loaded[item.video] = _load_item_video(run, item.video)
        video = loaded[item.video]
        if video.error is not None:
            run.skipped[item.index] = (video.reason, video.error)
    return loaded


def _answer_batch(run: _EvalRun, batch: list[EvalItem], loaded: dict[str, LoadedVideo], batch_size: int
                  ) -> dict[int, Any]:
    """By item index: the generated text, or for multiple choice both answers (``multiple_choice``)."""
    if run.task == "mc":
        from videollama.eval.multiple_choice import answer_mc_batch

        return answer_mc_batch(run, batch, loaded, batch_size)
    ready, prompts = _batch_prompts(run, batch)
    return _generate(run, ready, prompts, loaded)


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
    """Generated text by item index for the ready items; each distinct video's latents are read
    by all of its questions (shared by index, not copied per question)."""
    if not ready:
        return {}
    distinct = list(dict.fromkeys(it.video for it in ready))
    from videollama.inference.generate import generate_batch

    generated = generate_batch(run.model, run.tokenizer, prompts, [loaded[v].encoded for v in distinct],
                               [distinct.index(it.video) for it in ready], max_new_tokens=run.max_new_tokens)
    return {it.index: text for it, text in zip(ready, generated)}


# Line fields the scores group by (eval/long_video.py, eval/grounding.py): copied into predictions.
_GROUP_FIELDS = ("duration_s", "depth")


def _record(it: EvalItem, task: str, prediction: Any, timestamps: list[list[float]] | None,
            skip: tuple[str, str] | None) -> dict:
    """One line of predictions.jsonl: the item, its prediction (None: none was made) and, for a
    skipped item, why."""
    from videollama.eval.grounding import grounding_iou
    from videollama.eval.metrics import is_correct
    from videollama.eval.multiple_choice import mc_record

    if task == "mc":
        rec = mc_record(it, None if skip is not None else prediction)
    elif task == "videoqa":
        prediction = prediction or ""
        rec = {"video": it.video, "question": it.question, "prediction": prediction, "answer": it.answer,
               "kind": it.kind, "correct": skip is None and is_correct(prediction, it.answer, it.options)}
        if it.options is not None:
            rec["options"] = it.options
    elif task == "grounding":
        prediction = prediction or ""
        rec = {"video": it.video, "question": it.question, "prediction": prediction, "segments": it.segments,
               "iou": grounding_iou(prediction, it.segments)}  # None: the answer holds no time range
    else:
        rec = {"video": it.video, "references": it.captions, "prediction": prediction or ""}
    rec.update({k: it.extra[k] for k in _GROUP_FIELDS if k in it.extra})
    rec["timestamps"] = timestamps  # per window, every frame's time; None: the video failed to load
    if skip is not None:
        rec["error"], rec["skip_reason"] = skip[1], skip[0]
    return rec


def _write_outputs(out_dir: Path, items: list[EvalItem], records: dict[int, dict], metrics: dict[str, Any]) -> None:
    """predictions.jsonl in the file's order (replacing the partial one whole), then metrics.json."""
    tmp = out_dir / "predictions.jsonl.tmp"
    with tmp.open("w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps(records[it.index]) + "\n")
    os.replace(tmp, out_dir / "predictions.jsonl")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
