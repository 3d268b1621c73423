"""Near-duplicate removal: clips whose video embeddings have cosine similarity above a threshold
form a group (transitively: single linkage); each group keeps its preferred clip (the pipeline
prefers the best alignment score of the clip's caption, then the larger frame, then the longer
clip: ``keep_preference``; ties, and no preference, keep the first by ``clip_id``), the others
record which clip they duplicate.

Embeddings: any unit vectors per clip (CLIP's mean image embedding, the scorer's mean visual
latent) or :func:`pixel_embedding` of the clip's sampled frames, which needs no model.
"""

from __future__ import annotations

import math

import numpy as np

from videollama.curate.rows import ClipRow


def pixel_embedding(frames: np.ndarray) -> np.ndarray:
    """uint8 [F, S, S, 3] -> a unit float64 vector: the frames' luma with its mean removed.

    The mean removal makes a brightness shift or another background level of the same clip
    alike; different content (objects elsewhere, other motion) points elsewhere.
    """
    luma = frames.astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # [F, S, S]
    v = (luma - luma.mean()).ravel()
    norm = np.linalg.norm(v)
    return v / norm if norm > 0 else v


def keep_preference(row: ClipRow, score_column: str | None, score_step: float = 0.1) -> tuple[float, int, float]:
    """Which member of a near-duplicate group to keep, as a key (higher is better): the alignment
    score of the row's caption in ``score_column`` (the run's metric), rounded to ``score_step``
    (re-encodes of one clip score a text a few hundredths apart: noise, not a better caption), then
    its frame area, then its duration. A generated caption, or an input one without a score,
    ranks below every scored one; without a metric (no model scored a text) every caption ties
    and resolution decides."""
    score = 0.0 if score_column is None else -math.inf
    if score_column is not None and row.caption_source == "input":
        value = next((s.value(score_column) for s in row.scores if s.text == row.caption), None)
        score = -math.inf if value is None else round(float(value) / score_step) * score_step
    return score, row.width * row.height, row.duration_s


def near_duplicates(clip_ids: list[str], embeddings: np.ndarray, threshold: float, block: int = 2048,
                    preference: list[tuple] | None = None) -> dict[str, str]:
    """``{clip_id: kept clip_id}`` for every clip that duplicates another (kept clips are absent).

    ``clip_ids`` sorted, ``embeddings`` [N, D] unit rows in the same order. Pairs with cosine
    similarity ``> threshold`` are linked; each connected group keeps the clip with the highest
    ``preference`` (one comparable key per clip, in the same order; ties and ``None``: its first
    clip). Compared in blocks of ``block`` rows, so memory is ``block x N``.
    """
    n = len(clip_ids)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    x = np.asarray(embeddings, dtype=np.float64)
    for lo in range(0, n, block):
        sims = x[lo:lo + block] @ x.T  # [b, N]
        rows, cols = np.nonzero(sims > threshold)
        for r, c in zip(rows.tolist(), cols.tolist()):
            i, j = lo + r, c
            if j <= i:
                continue
            a, b = find(i), find(j)
            if a != b:
                parent[max(a, b)] = min(a, b)  # the root is always the group's smallest index
    keep: dict[int, int] = {}  # group root -> the member kept
    for i in range(n):  # in index order: a later member replaces the kept one only when strictly preferred
        root = find(i)
        if root not in keep or (preference is not None and preference[i] > preference[keep[root]]):
            keep[root] = i
    return {clip_ids[i]: clip_ids[keep[find(i)]] for i in range(n) if keep[find(i)] != i}
