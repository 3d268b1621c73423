"""Stage 8 of whole-video training: every window of a sample's video under the model's policy, and
the decoded-window cache that makes later epochs read them instead of decoding again.

A whole video is the windows ``videollama.data.windows`` picks (tiled, or spread past
``max_windows``), decoded in one bounded pass, centre-cropped, at fixed times: nothing is drawn
at random, so every epoch sees the same pixels. That is what lets them be cached once as uint8
(``data.cache_dir``, one ``.npz`` per video, beside the clip cache's entries and keyed the same
way plus the whole-video policy), and what lets a frozen encoder's latents be reused
(``train/latents.py``).
"""

from __future__ import annotations

import numpy as np
import torch

from videollama.config import PreprocessConfig
from videollama.data import errors
from videollama.data.clip_cache import entry_path, write_entry
from videollama.data.errors import BadSample
from videollama.data.read_policy import DEFAULT_POLICY, ReadPolicy
from videollama.data.windows import open_windows


def whole_video(
    video_source: str | bytes, *, preprocess: PreprocessConfig, name: str, window_budget: int,
    cache_dir: str | None = None, identity: tuple[str, str] | None = None, policy: ReadPolicy = DEFAULT_POLICY,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ``(frames [W, F, 3, S, S] float32 normalised, times [W, F] float64)``: every window of the
    video, exactly what ``load_windows(video_source, preprocess)`` gives.

    A video with more than ``window_budget`` windows raises ``BadSample(OVER_WINDOW_BUDGET)``
    before anything is decoded (its duration says how many it has). With ``cache_dir`` (and the
    ``identity`` (file, sample key) that keys the entry) the windows are decoded once and kept as
    uint8; later calls normalise the stored pixels, which gives the same floats as decoding.
    """
    if cache_dir is None:
        with open_windows(video_source, preprocess, name=name, time_budget_s=policy.video_time_budget_s) as whole:
            _check_budget(whole.num_windows, window_budget, whole.duration, name)
            chunk, = list(whole.chunks(windows_per_chunk=whole.num_windows))  # list: the walk's end checks run
        return chunk.frames, chunk.times
    if identity is None:
        raise ValueError("a window cache entry needs the video's identity (file, sample key)")
    pre = preprocess
    path = entry_path(cache_dir, identity, f"whole-v1|{pre.size}|{pre.fps}|{pre.num_frames}|{pre.max_windows}")
    try:
        with np.load(path, allow_pickle=False) as stored:
            pixels, times = stored["pixels"], stored["times"]  # [W, F, 3, S, S] uint8, [W, F] seconds
            duration = float(stored["duration"])
    except (OSError, ValueError, KeyError):  # not cached yet (or a damaged entry: decode again)
        with open_windows(video_source, pre, name=name, normalize=False,
                          time_budget_s=policy.video_time_budget_s) as whole:
            _check_budget(whole.num_windows, window_budget, whole.duration, name)
            chunk, = list(whole.chunks(windows_per_chunk=whole.num_windows))
            duration = whole.duration
        # The walk made these floats as uint8 / 255: rounding back gives the decoded bytes exactly.
        pixels = (chunk.frames * 255.0).round_().to(torch.uint8).numpy()
        times = chunk.times.numpy()
        write_entry(path, pixels=pixels, times=times, duration=duration)
    _check_budget(len(pixels), window_budget, duration, name)
    return normalise(torch.from_numpy(pixels), pre), torch.from_numpy(np.asarray(times, dtype=np.float64))


def normalise(pixels: torch.Tensor, preprocess: PreprocessConfig) -> torch.Tensor:
    """uint8 [..., 3, S, S] -> float32 ``(x / 255 - mean) / std``, with the very operations the
    window walk uses (``WholeVideo._chunk``), so cached and decoded windows are bit-identical."""
    frames = pixels.float()
    std = torch.tensor(preprocess.std, dtype=torch.float32).view(3, 1, 1)
    mean = torch.tensor(preprocess.mean, dtype=torch.float32).view(3, 1, 1)
    return frames.mul_(1.0 / (255.0 * std)).sub_(mean / std)


def _check_budget(num_windows: int, window_budget: int, duration: float, name: str) -> None:
    if num_windows > window_budget:
        raise BadSample(errors.OVER_WINDOW_BUDGET, name,
                        f"{duration:.1f} s is {num_windows} windows under the model's policy, more than a "
                        f"micro-batch holds (data.window_budget {window_budget}); raise the budget to the "
                        "model's preprocess.max_windows to train on every video")
