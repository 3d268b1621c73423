"""Long-video VideoQA scores: accuracy by duration and depth, and the needle-in-a-haystack table.

Shapes-Long lines (docs/SHAPES.md, "Long mode") carry ``duration_s`` and, in the needle split,
``depth``. Answers are scored by the VideoQA rule (``metrics.is_correct``). The V-NIAH table
(after LongVA) counts the questions about the needle event, read from the question and its
answer so that any generator's lines qualify: "which way does the {color} {shape} move?" when
the answer is a direction (the mover), and "which object moves {direction}?". The other
questions of the needle split (the still objects' "which way", the count) are reported beside it.

Pure functions over records: dicts with ``prediction``, ``answer``, ``question``, ``kind`` and the
line's ``duration_s`` / ``depth`` (``options`` too, for multiple choice).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from videollama.data.shapes import DIRECTIONS
from videollama.eval.grounding import field_key, group_by_field
from videollama.eval.metrics import is_correct, normalize_answer, videoqa_accuracy


def _correct(record: Mapping) -> bool:
    return is_correct(record["prediction"], record["answer"], record.get("options"))


def qa_report(records: Sequence[Mapping], *, fields=("duration_s", "depth")) -> dict[str, Any]:
    """Accuracy overall and by kind, then the same by each field the lines carry.

    Returns ``videoqa_accuracy``'s dict plus ``by_duration_s`` / ``by_depth``:
    ``{value: {"accuracy", "accuracy_by_kind", "n"}}`` in increasing order of the value.
    """
    def score(group: Sequence[Mapping]) -> dict[str, Any]:
        return videoqa_accuracy([r["prediction"] for r in group], [r["answer"] for r in group],
                                [r.get("kind") or "" for r in group], options=[r.get("options") for r in group])

    report = score(records)
    for field in fields:
        groups = group_by_field(records, field)
        if groups:
            report[f"by_{field}"] = {key: score(group) for key, group in groups.items()}
    return report


def is_needle_question(record: Mapping) -> bool:
    """Does the V-NIAH score count this question (a question about the needle event)?"""
    if record.get("kind") not in (None, "needle"):
        return False
    question = normalize_answer(record["question"])
    if question.startswith("which object moves "):
        return True
    return question.startswith("which way does ") and normalize_answer(record["answer"]) in DIRECTIONS


def niah_table(records: Sequence[Mapping]) -> dict[str, Any]:
    """Accuracy per (duration, depth) cell over the needle questions, the mean over cells, the rest.

    Only records that carry both ``duration_s`` and ``depth`` take part. Returns
    ``{"durations": [..], "depths": [..], "accuracy": [[..]], "n": [[..]], "mean": float | None,
    "min": float | None, "cells": int, "questions": int, "other": {accuracy of the other
    questions}}``; ``accuracy[i][j]`` is depth ``depths[i]`` at duration ``durations[j]`` (None
    for a cell without questions, which the mean leaves out).
    """
    grid = [r for r in records if r.get("duration_s") is not None and r.get("depth") is not None]
    needle = [r for r in grid if is_needle_question(r)]
    durations = sorted({float(r["duration_s"]) for r in grid})
    depths = sorted({float(r["depth"]) for r in grid})
    hits = {(d, t): [] for d in depths for t in durations}
    for r in needle:
        hits[(float(r["depth"]), float(r["duration_s"]))].append(_correct(r))
    accuracy = [[sum(hits[(d, t)]) / len(hits[(d, t)]) if hits[(d, t)] else None for t in durations]
                for d in depths]
    counts = [[len(hits[(d, t)]) for t in durations] for d in depths]
    filled = [a for row in accuracy for a in row if a is not None]
    return {
        "durations": [field_key(t) for t in durations],
        "depths": [field_key(d) for d in depths],
        "accuracy": accuracy,
        "n": counts,
        "mean": sum(filled) / len(filled) if filled else None,
        "min": min(filled) if filled else None,
        "cells": len(filled),
        "questions": len(needle),
        "other": qa_report([r for r in grid if not is_needle_question(r)], fields=()),
    }


def plot_niah_heatmap(table: Mapping[str, Any], out: str | Path, *, title: str = "needle in a haystack") -> Path:
    """Write the table as a heatmap PNG: durations across, depths down, each cell annotated."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    import numpy as np

    values = np.array([[np.nan if a is None else a for a in row] for row in table["accuracy"]], dtype=float)
    values = values.reshape(len(table["depths"]), len(table["durations"]))  # (depths, durations)
    fig, ax = plt.subplots(figsize=(1.2 * values.shape[1] + 2.5, 0.8 * values.shape[0] + 1.8))
    image = ax.imshow(np.ma.masked_invalid(values), cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            text = "-" if np.isnan(values[i, j]) else f"{values[i, j]:.2f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=9)
    ax.set_xticks(range(values.shape[1]), [f"{t} s" for t in table["durations"]])
    ax.set_yticks(range(values.shape[0]), table["depths"])
    ax.set_xlabel("video duration")
    ax.set_ylabel("needle depth")
    mean = table.get("mean")
    ax.set_title(title if mean is None else f"{title} (mean {mean:.3f})")
    fig.colorbar(image, ax=ax, label="accuracy")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


__all__ = ["is_needle_question", "niah_table", "plot_niah_heatmap", "qa_report"]
