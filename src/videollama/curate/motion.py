"""``motion_score``: how much a clip moves, from frame differences (drops static slideshows)."""

from __future__ import annotations

import numpy as np

# Per-pixel gray-level changes at or below this are compression noise, not motion: H.264 at
# CRF 18..36 moves a static pixel by a few levels between frames.
NOISE_FLOOR = 6.0


def motion_score(frames: np.ndarray, *, noise_floor: float = NOISE_FLOOR) -> float:
    """Mean absolute difference of consecutive frames, in gray levels (0..255).

    ``frames``: uint8 ``[F, H, W, 3]`` RGB, in time order (any spacing: the score is per pair of
    consecutive frames as given, so sample at a fixed rate to compare clips). Each frame becomes
    luma (BT.601 weights); per pixel, ``max(|a - b| - noise_floor, 0)``; the score is the mean over
    pixels and over the ``F - 1`` pairs. A static slideshow (frames that differ only by
    compression noise) scores 0; fewer than 2 frames score 0. Scale: a Shapes object (28..44 px)
    moving 1 px per frame on a 320x240 canvas scores about 0.1..1, a hard cut about 10..100.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"motion_score: expected uint8 [F, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    if frames.shape[0] < 2:
        return 0.0
    luma = frames.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # [F, H, W]
    diff = np.abs(np.diff(luma, axis=0)) - noise_floor
    return float(np.maximum(diff, 0.0).mean())
