"""The per-video stage as separate passes: the reference that curate/onepass.py is compared with
(tests/test_curate_onepass.py, tests/test_curate_units.py, bench/bench_curate.py).

``cut_clips`` decodes a source and re-encodes the frames of each span; ``sample_frames`` runs
``load_clip`` in evaluation mode on a clip's MP4. The one pass must give the same MP4 bytes, and
each spec's frames within the re-encoding's noise of these.
"""

from __future__ import annotations

import time

import numpy as np

from videollama.curate.clipfiles import ClipEncoder, Spec
from videollama.data.container import nominal_rate
from videollama.data.decoding import open_and_time
from videollama.data.video import load_clip


def cut_clips(path: str, spans: list[tuple[float, float]], *, crf: int = 18, max_frames: int = 200_000,
              time_budget_s: float | None = 600.0) -> list[bytes | None]:
    """Decode ``path`` once and re-encode the frames of each span ``[start, end)`` (seconds from the
    first frame) into an MP4. Spans must be sorted and disjoint. Returns one MP4 (bytes) per span,
    or None for a span that no frame falls in. Raises BadSample for a file that fails to decode."""
    deadline = None if time_budget_s is None else time.monotonic() + time_budget_s
    out: list[bytes | None] = [None] * len(spans)
    encoder: ClipEncoder | None = None
    current = 0
    with open_and_time(path, path, 1, max_frames, deadline) as video:
        rate = nominal_rate(video.stream).limit_denominator(1001)
        with video.frames("cutting clips") as frames:
            for pts, frame in frames:
                t = video.seconds(pts)
                while current < len(spans) and t >= spans[current][1] - 1e-6:
                    if encoder is not None:
                        out[current] = encoder.finish()
                        encoder = None
                    current += 1
                if current == len(spans):
                    break
                if t < spans[current][0] - 1e-6:
                    continue
                if encoder is None:
                    # Even sides: 4:2:0 chroma needs them (an odd last row/column is dropped).
                    encoder = ClipEncoder(frame.width // 2 * 2, frame.height // 2 * 2, rate, crf)
                encoder.add(frame)
        if encoder is not None and current < len(spans):
            out[current] = encoder.finish()
    return out


def sample_frames(mp4: bytes, spec: Spec, name: str) -> np.ndarray:
    """uint8 [F, S, S, 3] frames of a clip with ``spec`` = (num_frames, fps, size): the window
    centred in the clip, short side to ``size``, centre crop: ``load_clip`` in evaluation mode,
    so a model scores exactly the pixels it would see in evaluation."""
    num_frames, fps, size = spec
    frames, _ = load_clip(mp4, num_frames=num_frames, fps=fps, size=size, normalize=False, name=name)
    # load_clip returns uint8 / 255 as float32; rounding recovers the uint8 values exactly.
    pixels = np.rint(frames.numpy() * 255.0).astype(np.uint8)  # [F, 3, S, S]
    return np.ascontiguousarray(pixels.transpose(0, 2, 3, 1))  # [F, S, S, 3]
