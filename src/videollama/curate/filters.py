"""Filters over clip rows (pure functions): duration, resolution, motion, alignment, and the
choice of each clip's caption.

A filter only reads a row's columns (``rows.ClipRow``) and returns a ``DropReason`` or a
caption, so a finished run's ``clips.parquet`` (read back with ``ClipRow.from_table``) can be
re-filtered with other thresholds without recomputing a score. The reasons (``rows.DropReason``,
stable strings, keys of stats.json): ``too_short``, ``low_resolution``, ``static``, ``misaligned``
(candidate texts, none passing, no captioner), ``no_text`` (no candidate and no captioner),
``empty_caption`` (the captioner gave nothing), ``duplicate``.
"""

from __future__ import annotations

import math

from videollama.curate.config import FilterSection
from videollama.curate.rows import ClipRow, DropReason


def cheap_filter(row: ClipRow, cfg: FilterSection) -> DropReason | None:
    """The reason a clip fails the filters that need no model (None: it passes)."""
    if row.duration_s < cfg.min_duration_s:
        return DropReason.TOO_SHORT
    if row.width < cfg.min_width or row.height < cfg.min_height:
        return DropReason.LOW_RESOLUTION
    if row.motion < cfg.min_motion:
        return DropReason.STATIC
    return None


def alignment_threshold(rows: list[ClipRow], metric: str, cfg: FilterSection) -> float:
    """The score a text needs: ``cfg.threshold``, or with ``keep_fraction`` the score that the top
    ``keep_fraction`` of all scored texts of the rows reach (the nearest-rank quantile)."""
    if cfg.keep_fraction is None:
        return cfg.threshold
    scores = sorted((s.value(metric) for r in rows for s in r.scores if s.value(metric) is not None), reverse=True)
    if not scores:
        return cfg.threshold
    k = max(1, math.ceil(cfg.keep_fraction * len(scores)))
    return scores[k - 1]


def best_clip_of_texts(rows: list[ClipRow], metric: str) -> dict[tuple[str, str], str]:
    """``{(source_id, text): clip_id}``: the clip of its video that each candidate text scores best on
    (ties: the first clip by id). Web texts come per video, and each describes (at most) one scene:
    a text is then a candidate only for the clip it fits best (``filter.assign: best_clip``)."""
    best: dict[tuple[str, str], tuple[float, str]] = {}
    for row in sorted(rows, key=lambda r: r.clip_id):
        for s in row.scores:
            score = s.value(metric)
            if score is None:
                continue
            key = (row.source_id, s.text)
            if key not in best or score > best[key][0]:
                best[key] = (score, row.clip_id)
    return {key: clip for key, (_, clip) in best.items()}


def choose_caption(row: ClipRow, metric: str | None, threshold: float,
                   assigned: dict[tuple[str, str], str] | None = None) -> str | None:
    """The best-scoring candidate text that passes ``threshold`` (ties: the first), or None.

    With ``assigned`` (from :func:`best_clip_of_texts`), only the texts assigned to this clip are
    candidates. Without a metric (no model scores) the first candidate text is taken as it is."""
    if metric is None:
        return row.texts[0] if row.texts else None
    passing = [(s.value(metric), -i, s.text) for i, s in enumerate(row.scores)
               if s.value(metric) is not None and s.value(metric) >= threshold
               and (assigned is None or assigned.get((row.source_id, s.text)) == row.clip_id)]
    return max(passing)[2] if passing else None
