"""Near-duplicate removal: clips whose video embeddings have cosine similarity above a threshold
form a group (transitively: single linkage); the first clip of a group by ``clip_id`` is kept, the
others record which clip they duplicate.

Embeddings: any unit vectors per clip (CLIP's mean image embedding, the scorer's mean visual
latent) or :func:`pixel_embedding` of the clip's sampled frames, which needs no model.
"""

from __future__ import annotations

import numpy as np


def pixel_embedding(frames: np.ndarray) -> np.ndarray:
    """uint8 [F, S, S, 3] -> a unit float64 vector: the frames' luma with its mean removed.

    The mean removal makes a brightness shift or another background level of the same clip
    alike; different content (objects elsewhere, other motion) points elsewhere.
    """
    luma = frames.astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # [F, S, S]
    v = (luma - luma.mean()).ravel()
    norm = np.linalg.norm(v)
    return v / norm if norm > 0 else v


def near_duplicates(clip_ids: list[str], embeddings: np.ndarray, threshold: float,
                    block: int = 2048) -> dict[str, str]:
    """``{clip_id: kept clip_id}`` for every clip that duplicates another (kept clips are absent).

    ``clip_ids`` sorted, ``embeddings`` [N, D] unit rows in the same order. Pairs with cosine
    similarity ``> threshold`` are linked; each connected group keeps its first clip. Compared
    in blocks of ``block`` rows, so memory is ``block x N``.
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
    return {clip_ids[i]: clip_ids[find(i)] for i in range(n) if find(i) != i}
