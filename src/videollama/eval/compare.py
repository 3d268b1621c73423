"""``videollama eval --compare A B``: is the difference between two evaluations larger than its noise?

A and B are two runs' ``predictions.jsonl`` (or their ``metrics.json``, or their output folders:
the ``predictions.jsonl`` beside it / in it) on the same evaluation set. Their items are matched by
``(video, question)`` (and, for a pair asked twice, by order), never by line number, so the runs
may list them in any order; a set of items that differs between the two is an error. For every
per-item score both carry (``correct``: VideoQA; ``correct_likelihood`` and ``correct_letter``:
multiple choice; ``iou`` and R@0.3/0.5/0.7: grounding), a paired bootstrap by video
(``bootstrap.paired_difference``) gives the difference A - B, its 95% interval, a p-value, and
``significant`` when the interval excludes zero.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from videollama.constants import MAX_LINE_BYTES  # a predictions line is a few KiB (its timestamps)
from videollama.eval.bootstrap import DEFAULT_RESAMPLES, DEFAULT_SEED, item_scores, paired_difference

MAX_LINES = 10_000_000
_FIELDS = ("correct", "correct_likelihood", "correct_letter")
_GROUNDING = ("R@0.3", "R@0.5", "R@0.7", "iou")


def predictions_path(path: str | Path) -> Path:
    """The predictions.jsonl that ``path`` names: itself, the one beside a metrics.json, or the one in a folder."""
    path = Path(path)
    if path.is_dir():
        path = path / "predictions.jsonl"
    elif path.name == "metrics.json":
        path = path.with_name("predictions.jsonl")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no predictions to compare (give a predictions.jsonl, its metrics.json "
                                "or the evaluation's output folder)")
    return path


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The lines of a predictions.jsonl (each line and the count bounded)."""
    path = predictions_path(path)
    records = []
    with path.open("rb") as f:
        for number, line in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), start=1):
            if len(line) > MAX_LINE_BYTES or number > MAX_LINES:
                raise ValueError(f"{path}:{number}: longer than {MAX_LINE_BYTES} bytes, or too many lines")
            if line.strip():
                try:
                    record = json.loads(line)
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise ValueError(f"{path}:{number}: not a JSON line ({e})") from None
                if not isinstance(record, dict) or not isinstance(record.get("video"), str):
                    raise ValueError(f"{path}:{number}: not a predictions line (no video)")
                records.append(record)
    return records


def _keyed(records: list[Mapping]) -> dict[tuple, Mapping]:
    seen: dict[tuple, int] = {}
    out = {}
    for r in records:
        base = (r["video"], str(r.get("question", "")))
        seen[base] = seen.get(base, 0) + 1
        out[(*base, seen[base])] = r
    return out


def compare(a: str | Path, b: str | Path, *, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED
            ) -> dict[str, Any]:
    """``{"a", "b", "n", "videos", "by_metric": {name: paired_difference(...) + a, b means}}``."""
    ka, kb = _keyed(read_records(a)), _keyed(read_records(b))
    if set(ka) != set(kb):
        only_a, only_b = len(set(ka) - set(kb)), len(set(kb) - set(ka))
        raise ValueError(f"--compare: the two runs are not on the same items ({only_a} only in A, {only_b} only in B)")
    if not ka:
        raise ValueError("--compare: no items")
    keys = sorted(ka, key=lambda k: (k[0], k[1], k[2]))
    ra, rb = [ka[k] for k in keys], [kb[k] for k in keys]
    videos = [k[0] for k in keys]
    fields = [f for f in _FIELDS if f in ra[0] and f in rb[0]]
    if "iou" in ra[0] and "iou" in rb[0]:
        fields += list(_GROUNDING)
    if not fields:
        raise ValueError("--compare: the predictions carry no per-item score (correct, correct_likelihood, "
                         "correct_letter or iou)")
    out: dict[str, Any] = {"a": str(predictions_path(a)), "b": str(predictions_path(b)), "n": len(keys),
                           "videos": len(set(videos)), "resamples": resamples, "seed": seed, "by_metric": {}}
    for field in fields:
        sa, sb = item_scores(ra, field), item_scores(rb, field)
        result = paired_difference(sa, sb, videos, resamples=resamples, seed=seed)
        name = "mIoU" if field == "iou" else field
        out["by_metric"][name] = {"a": sum(sa) / len(sa), "b": sum(sb) / len(sb), **result}
    return out


def summary_lines(result: Mapping[str, Any]) -> list[str]:
    """One line per metric: A, B, the difference with its interval and p-value, and the verdict."""
    lines = [f"A: {result['a']}", f"B: {result['b']}",
             f"{result['n']} items about {result['videos']} videos; paired bootstrap by video, "
             f"{result['resamples']} resamples"]
    for name, r in result["by_metric"].items():
        verdict = "A differs from B" if r["significant"] else "no difference beyond noise"
        lines.append(f"{name}: A {r['a']:.4f}  B {r['b']:.4f}  A-B {r['difference']:+.4f} "
                     f"[{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}]  p={r['p_value']:.4f}  {verdict}")
    return lines


__all__ = ["compare", "predictions_path", "read_records", "summary_lines"]
