"""metrics.json of an evaluation run (the harness's last step): what was evaluated and skipped, then
the task's scores over every item, a skipped one scored as wrong.

- VideoQA: accuracy overall and by kind, and by ``duration_s`` / ``depth`` when the lines carry
  them (``long_video.qa_report``); when needle lines carry both, the V-NIAH table
  (``long_video.niah_table``: per duration x depth cell, the mean over cells) under ``"niah"``,
  drawn to ``OUT/niah.png``.
- Grounding: R@0.3 / R@0.5 / R@0.7, mIoU and parse failures, overall and by ``duration_s`` /
  ``depth`` (``grounding.grounding_report``).
- Multiple choice: accuracy by option likelihood and by letter, overall and by kind
  (``multiple_choice.mc_scores``).
- Captioning: BLEU-1..4, METEOR, ROUGE-L, CIDEr (``metrics.caption_scores``).

Beside every accuracy, R@k and mIoU, ``ci95``: its 95% bootstrap interval resampling videos
(``bootstrap.intervals_for``), overall and by kind.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from videollama.data import errors


def score(run: Any, items: Sequence[Any], bad_lines: list[tuple[int, str]], data: str, out_dir: Path, *,
          meteor: bool | None, resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """The metrics dict of a finished run (``harness._EvalRun``: its records and skips by item index)."""
    preprocess = run.model.config.preprocess
    skipped = run.skipped
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
        "max_windows": preprocess.max_windows,
        "max_new_tokens": run.max_new_tokens,
    }
    if not items:
        return metrics
    records = [run.records[it.index] for it in items]
    if run.task == "videoqa":
        metrics.update(videoqa_scores(records, out_dir))
    elif run.task == "grounding":
        metrics.update(grounding_scores(records))
    elif run.task == "mc":
        from videollama.eval.multiple_choice import mc_scores

        metrics.update(mc_scores(records))
    else:
        from videollama.eval.metrics import caption_scores

        # A skipped video's caption is empty: it matches nothing, as a wrong caption would.
        metrics.update(caption_scores([r["prediction"] for r in records], [r["references"] for r in records],
                                      meteor=meteor))
    if run.task != "caption":
        from videollama.eval.bootstrap import intervals_for

        metrics["ci95"] = intervals_for(run.task, records, resamples=resamples, seed=seed)
    return metrics


def videoqa_scores(records: Sequence[Mapping], out_dir: Path) -> dict[str, Any]:
    """Accuracy by kind (and duration, depth); the V-NIAH table and ``out_dir/niah.png`` when the
    needle questions carry ``duration_s`` and ``depth``."""
    from videollama.eval.long_video import niah_table, plot_niah_heatmap, qa_report

    report = qa_report(records)
    table = niah_table(records)
    if table["questions"]:
        report["niah"] = table
        plot_niah_heatmap(table, out_dir / "niah.png")
    return report


def grounding_scores(records: Sequence[Mapping]) -> dict[str, Any]:
    """``grounding_report`` over every item, a skipped one at IoU 0. Its ``parse_failures`` count
    only answers the model gave: a skipped item is counted among the skips, by reason, instead."""
    from videollama.eval.grounding import grounding_report, group_by_field, parse_time_range

    def parse_failures(group: Sequence[Mapping]) -> int:
        return sum("skip_reason" not in r and parse_time_range(r["prediction"]) is None for r in group)

    report = grounding_report(records)
    report["parse_failures"] = parse_failures(records)
    for field in ("duration_s", "depth"):
        for key, group in group_by_field(records, field).items():
            report[f"by_{field}"][key]["parse_failures"] = parse_failures(group)
    return report


__all__ = ["grounding_scores", "score", "videoqa_scores"]
