"""Confidence intervals that respect videos: bootstrap resampling of whole videos, not questions.

Questions about one video are not independent (a model that misreads a clip misses all of its
questions), so an interval that resamples questions is too narrow. Here every resample draws V
videos with replacement out of the V videos of the items, and each drawn video brings ALL of its
items; a statistic is the mean of the per-item values over the drawn items (a ratio: sum of the
values of the drawn videos / number of their items). The interval is the percentile interval of
``resamples`` such means, drawn by a seeded generator, so a run is reproducible.

- :func:`cluster_interval`: the 95% interval of one mean (an accuracy, R@k, mIoU);
- :func:`paired_difference`: the paired bootstrap of the difference of two systems' means on the
  SAME items (the same videos drawn for both), with its interval and a two-sided p-value;
- :func:`intervals_for` adds ``ci95`` entries to a finished VideoQA / multiple-choice / grounding
  report, overall and per kind.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

DEFAULT_RESAMPLES = 2000
DEFAULT_SEED = 0
LEVEL = 0.95


def _video_totals(values: Sequence[float], videos: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per distinct video (in order of first appearance): the sum of its items' values and its item count."""
    index: dict[str, int] = {}
    ids = np.array([index.setdefault(v, len(index)) for v in videos], dtype=np.int64)
    sums = np.bincount(ids, weights=np.asarray(values, dtype=np.float64), minlength=len(index))
    counts = np.bincount(ids, minlength=len(index)).astype(np.float64)
    return sums, counts


def _draws(num_videos: int, resamples: int, seed: int) -> np.ndarray:
    """[resamples, num_videos]: how many times each video is drawn in each resample (each row sums
    to num_videos: V draws with replacement)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(num_videos, np.full(num_videos, 1.0 / num_videos), size=resamples).astype(np.float64)


def _percentiles(samples: np.ndarray, level: float) -> list[float]:
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return [float(low), float(high)]


def cluster_interval(values: Sequence[float], videos: Sequence[str], *, resamples: int = DEFAULT_RESAMPLES,
                     seed: int = DEFAULT_SEED, level: float = LEVEL) -> list[float] | None:
    """``[low, high]``: the percentile bootstrap interval of the mean of ``values`` (one per item),
    resampling the items' ``videos`` (one name per item) whole. None for no items."""
    if len(values) != len(videos):
        raise ValueError(f"{len(values)} values but {len(videos)} video names")
    if not values:
        return None
    sums, counts = _video_totals(values, videos)
    draws = _draws(len(sums), resamples, seed)  # [R, V]
    # A resample never draws zero items: each row draws V >= 1 videos of >= 1 item each.
    means = (draws @ sums) / (draws @ counts)  # [R]
    return _percentiles(means, level)


def paired_difference(a: Sequence[float], b: Sequence[float], videos: Sequence[str], *,
                      resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                      level: float = LEVEL) -> dict[str, Any]:
    """The paired bootstrap by video of ``mean(a) - mean(b)``: ``a[i]`` and ``b[i]`` are two systems'
    scores on the same item ``i``, about ``videos[i]``.

    Returns ``{"difference", "ci95", "p_value", "significant", "n", "videos"}``. The p-value is the
    two-sided bootstrap p-value of "no difference": the share of resampled differences, shifted to
    centre on zero, that are at least as far from zero as the observed one (``(1 + count) / (1 +
    resamples)``, never 0). ``significant``: the interval excludes zero.
    """
    if not len(a) == len(b) == len(videos):
        raise ValueError(f"{len(a)} and {len(b)} scores for {len(videos)} items")
    if not videos:
        raise ValueError("no items to compare")
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    sums, counts = _video_totals(diff, videos)
    observed = float(sums.sum() / counts.sum())
    draws = _draws(len(sums), resamples, seed)  # [R, V]
    samples = (draws @ sums) / (draws @ counts)  # [R]
    low, high = _percentiles(samples, level)
    beyond = int(np.sum(np.abs(samples - observed) >= abs(observed) - 1e-12))
    return {"difference": observed, "ci95": [low, high], "p_value": (1 + beyond) / (1 + resamples),
            "significant": bool(low > 0 or high < 0), "n": len(videos), "videos": len(sums)}


def _grouped_intervals(values: Sequence[float], records: Sequence[Mapping], **kw: Any) -> dict[str, Any]:
    videos = [r["video"] for r in records]
    out: dict[str, Any] = {"all": cluster_interval(values, videos, **kw), "by_kind": {}}
    kinds = sorted({str(r["kind"]) for r in records if r.get("kind") is not None})
    for kind in kinds:
        chosen = [i for i, r in enumerate(records) if str(r.get("kind")) == kind]
        out["by_kind"][kind] = cluster_interval([values[i] for i in chosen], [videos[i] for i in chosen], **kw)
    return out


def item_scores(records: Sequence[Mapping], field: str) -> list[float]:
    """One score per record: ``correct`` (and the multiple-choice ``correct_*``) as 0/1; ``iou`` as
    its value (None, an answer with no time range, as 0), or ``R@k`` as whether the IoU reaches k."""
    if field.startswith("R@"):
        k = float(field[2:])
        # The tolerance of grounding_report's R@k: an IoU computed as 0.4999999 still counts at 0.5.
        return [float((r.get("iou") or 0.0) >= k - 1e-9) for r in records]
    return [float(r.get(field) or 0.0) for r in records]


def intervals_for(task: str, records: Sequence[Mapping], *, resamples: int = DEFAULT_RESAMPLES,
                  seed: int = DEFAULT_SEED) -> dict[str, Any]:
    """metrics.json's ``ci95``: per scored figure, ``{"all": [low, high], "by_kind": {kind: [low, high]}}``,
    each a 95% interval resampling videos; with how it was made (``method``, ``resamples``, ``seed``)."""
    fields = {"videoqa": ("correct",), "mc": ("correct_likelihood", "correct_letter"),
              "grounding": ("R@0.3", "R@0.5", "R@0.7", "iou")}.get(task, ())
    names = {"correct": "accuracy", "correct_likelihood": "accuracy_likelihood",
             "correct_letter": "accuracy_letter", "iou": "mIoU"}
    out: dict[str, Any] = {"method": "percentile bootstrap, resampling videos (all items of a drawn video)",
                           "level": LEVEL, "resamples": resamples, "seed": seed}
    for field in fields:
        out[names.get(field, field)] = _grouped_intervals(item_scores(records, field), records,
                                                          resamples=resamples, seed=seed)
    return out


__all__ = ["cluster_interval", "intervals_for", "item_scores", "paired_difference"]
