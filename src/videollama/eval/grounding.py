"""Temporal grounding scores: an answer's time range against the reference segments (docs/SHAPES.md).

The model answers "when does the red circle move?" with a time range, e.g. "from 12.0 to 16.5
seconds". Scoring, as for Charades-STA:

- the answer's first time range is read: "from A to B seconds", "A to B", "A - B", each number
  optionally followed by "s" (or "sec", "second(s)"); a reversed range ("from 16 to 12") is read
  as the same interval;
- its temporal IoU with the reference segment: the overlap over the union of the two intervals.
  A line with several segments (e.g. an object that moves twice) scores its best IoU over them;
- R@0.3, R@0.5, R@0.7: the share of questions whose IoU is at least that (a 1e-9 tolerance keeps
  an IoU of exactly 0.5, computed from one-decimal times, at 0.5); mIoU: the mean IoU;
- an answer with no time range scores IoU 0 and is counted in ``parse_failures``.

Pure functions over strings, lists and dicts, for the evaluation harness and for tests.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

THRESHOLDS = (0.3, 0.5, 0.7)
_TOLERANCE = 1e-9

_NUMBER = r"(?<![\d.])(\d+(?:\.\d+)?|\.\d+)"
_UNIT = r"(?:\s*(?:seconds?|secs?|s)\b)?"
_RANGE = re.compile(rf"{_NUMBER}{_UNIT}\s*(?:to|-|–|—)\s*{_NUMBER}{_UNIT}", re.IGNORECASE)


def parse_time_range(text: str) -> tuple[float, float] | None:
    """The first time range in ``text`` as ``(start, end)`` with start <= end, or None.

    >>> parse_time_range("from 12.0 to 16.5 seconds")
    (12.0, 16.5)
    >>> parse_time_range("12s - 16s"), parse_time_range("it moves")
    ((12.0, 16.0), None)
    """
    match = _RANGE.search(text)
    if match is None:
        return None
    a, b = float(match.group(1)), float(match.group(2))
    return (a, b) if a <= b else (b, a)


def format_time_range(start: float, end: float) -> str:
    """The answer the model is taught for a segment (Shapes-Long's wording): "from 12.0 to 16.5 seconds".

    >>> parse_time_range(format_time_range(12, 16.5))
    (12.0, 16.5)
    """
    return f"from {start:.1f} to {end:.1f} seconds"


def temporal_iou(predicted: Sequence[float], segment: Sequence[float]) -> float:
    """IoU of two intervals ``(start, end)``: overlap / (sum of lengths - overlap)."""
    (p0, p1), (s0, s1) = sorted(predicted), sorted(segment)
    overlap = max(0.0, min(p1, s1) - max(p0, s0))
    union = (p1 - p0) + (s1 - s0) - overlap
    if union <= 0.0:  # two points: the same point, or nothing in common
        return 1.0 if (p0, p1) == (s0, s1) else 0.0
    return overlap / union


def grounding_iou(prediction: str, segments: Sequence[Sequence[float]]) -> float | None:
    """The answer's best IoU over ``segments``; None when the answer holds no time range."""
    predicted = parse_time_range(prediction)
    if predicted is None:
        return None
    if not segments:
        raise ValueError("a grounding line needs at least one segment")
    return max(temporal_iou(predicted, segment) for segment in segments)


def grounding_metrics(
    predictions: Sequence[str], segments: Sequence[Sequence[Sequence[float]]], *, thresholds=THRESHOLDS
) -> dict[str, Any]:
    """R@k for each threshold, mIoU, the parse failures and n over a set of answers.

    Args:
        predictions: one answer per question; segments: per question, its ``[[start, end], ...]``.
    Returns:
        ``{"R@0.3": float, "R@0.5": float, "R@0.7": float, "mIoU": float, "parse_failures": int,
        "n": int}`` (scores 0.0 for an empty set).
    """
    if len(predictions) != len(segments):
        raise ValueError(f"grounding_metrics: {len(predictions)} predictions but {len(segments)} segment lists")
    ious, failures = [], 0
    for prediction, segs in zip(predictions, segments):
        iou = grounding_iou(prediction, segs)
        failures += iou is None
        ious.append(0.0 if iou is None else iou)
    n = len(ious)
    metrics: dict[str, Any] = {
        f"R@{t:g}": (sum(iou >= t - _TOLERANCE for iou in ious) / n if n else 0.0) for t in thresholds
    }
    metrics.update({"mIoU": sum(ious) / n if n else 0.0, "parse_failures": failures, "n": n})
    return metrics


def field_key(value: Any) -> str:
    """A JSON key for a duration or depth: 30 -> "30", 0.25 -> "0.25", 1.0 -> "1"."""
    return format(float(value), "g") if isinstance(value, (int, float)) else str(value)


def group_by_field(records: Sequence[Mapping], field: str) -> dict[str, list[Mapping]]:
    """Records that carry ``field``, grouped by its value, in increasing (numeric) order."""
    groups: dict[Any, list[Mapping]] = defaultdict(list)
    for record in records:
        if record.get(field) is not None:
            groups[record[field]].append(record)
    ordered = sorted(groups, key=lambda v: (0, float(v), "") if isinstance(v, (int, float)) else (1, 0.0, str(v)))
    return {field_key(v): groups[v] for v in ordered}


def grounding_report(records: Sequence[Mapping], *, fields=("duration_s", "depth")) -> dict[str, Any]:
    """:func:`grounding_metrics` overall and by ``duration_s`` and ``depth`` where lines carry them.

    ``records``: dicts with ``prediction`` (the answer) and ``segments`` (the line's segments),
    e.g. a grounding line with the model's answer added.
    """
    def score(group: Sequence[Mapping]) -> dict[str, Any]:
        return grounding_metrics([r["prediction"] for r in group], [r["segments"] for r in group])

    report = score(records)
    for field in fields:
        groups = group_by_field(records, field)
        if groups:
            report[f"by_{field}"] = {key: score(group) for key, group in groups.items()}
    return report


__all__ = [
    "THRESHOLDS",
    "field_key",
    "format_time_range",
    "grounding_iou",
    "grounding_metrics",
    "grounding_report",
    "group_by_field",
    "parse_time_range",
    "temporal_iou",
]
