"""Evaluation: VideoQA accuracy, COCO caption metrics and the evaluation harness.

Attributes are imported lazily so that ``import videollama.eval`` stays cheap (no torch, no
pycocoevalcap) until a metric or the harness is actually used.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "caption_scores": "videollama.eval.metrics",
    "videoqa_accuracy": "videollama.eval.metrics",
    "normalize_answer": "videollama.eval.metrics",
    "is_correct": "videollama.eval.metrics",
    "evaluate": "videollama.eval.harness",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'videollama.eval' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


__all__ = sorted(_EXPORTS)
