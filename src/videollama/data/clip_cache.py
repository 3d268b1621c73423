"""The decoded-clip cache: decode each video once onto a time grid, keep uint8 frames on disk,
and draw every later window from them (``data.cache_dir`` in a recipe)."""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import torch

from videollama.config import PreprocessConfig
from videollama.data.read_policy import DEFAULT_POLICY, ReadPolicy

# Most sample frames one video keeps in the cache: four windows' worth (a 4 s window of a 16 s clip).
CACHE_MAX_WINDOWS = 4
# A short video is cached on a grid up to this many times finer than 1 / fps, so that training
# windows start at many points (0.25 s apart at 1 FPS) rather than a few whole seconds apart.
CACHE_SUBSTEPS = 4


def entry_path(cache_dir: str, identity: tuple[str, str], spec: str) -> Path:
    """The cache file of one video: keyed by its file (path, size, mtime), its sample key and
    ``spec`` (the preprocessing that shaped the stored pixels), so that a regenerated corpus or
    another preprocessing never reads a stale entry."""
    source, key = identity
    stat = os.stat(source)
    ident = f"{os.path.abspath(source)}|{stat.st_size}|{stat.st_mtime_ns}|{key}|{spec}"
    return Path(cache_dir) / f"{hashlib.sha256(ident.encode()).hexdigest()[:32]}.npz"


def write_entry(path: Path, **arrays) -> None:
    """Write one ``.npz`` entry under a temporary name and rename it: a concurrent reader never
    sees half a file."""
    import numpy as np

    os.makedirs(path.parent, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def cached_clip(
    video_source: str | bytes, *, cache_dir: str, identity: tuple[str, str], preprocess: PreprocessConfig,
    train: bool, generator: torch.Generator, name: str, policy: ReadPolicy = DEFAULT_POLICY,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 8 with a clip cache: the clip ``load_clip`` would give, minus the decoding after the first time.

    Decoding H.264 costs a tiny model about as much CPU as training on the clip, and every epoch
    decodes every clip again. Here each video is decoded once onto the time grid ``k / (fps s)``
    (``s`` up to ``CACHE_SUBSTEPS`` sub-steps per frame interval for a short video, 1 for a long
    one; the grid covers the video up to ``CACHE_MAX_WINDOWS`` windows' worth of frames, centred
    in a longer video), centre-cropped, and kept as uint8 in ``cache_dir`` (one ``.npz`` per
    video, keyed by its file, size, mtime, sample key and the preprocessing spec). A window is
    every ``s``-th grid frame: training starts it at a grid point drawn from ``generator``;
    evaluation at ``load_clip``'s centred start, which the grid goes through. Compared with
    ``load_clip(train=True)`` the window start is drawn from the grid rather than from a
    continuum, and there is no random crop. Returns ``(frames [F, 3, S, S] float32 normalised,
    timestamps [F] float64)``; raises ``BadSample`` as ``load_clip`` does.
    """
    import numpy as np

    from videollama.data.video import load_clip

    pre = preprocess
    path = entry_path(cache_dir, identity, f"{pre.size}|{pre.fps}|{pre.num_frames}")
    try:
        with np.load(path, allow_pickle=False) as stored:
            # [G, 3, S, S] uint8, [G] seconds, grid steps per frame interval, evaluation's start
            pixels, grid_times = stored["pixels"], stored["timestamps"]
            sub, eval_start = int(stored["substeps"]), int(stored["eval_start"])
    except (OSError, ValueError, KeyError):  # not cached yet (or a damaged entry: decode again)
        from videollama.data.container import open_video

        try:
            c, stream = open_video(video_source, name)  # checked and bounded, as load_clip opens it
            with c:
                duration = (float(stream.duration * stream.time_base) if stream.duration is not None
                            else (c.duration or 0) / 1e6)
        except Exception:  # noqa: BLE001 - load_clip below names what is wrong with the file
            duration = 0.0
        most = CACHE_MAX_WINDOWS * pre.num_frames
        sub = max(1, min(CACHE_SUBSTEPS, most // max(1, math.ceil(duration * pre.fps - 1e-6))))
        rate = pre.fps * sub
        span = (pre.num_frames - 1) * sub + 1  # grid frames one window covers
        # The grid goes through load_clip's centred window start, so that evaluation sees exactly
        # load_clip's frames, and reaches back from it as far as the video (or the cap) allows.
        centre = max(0.0, (duration - pre.num_frames / pre.fps) / 2)
        eval_start = min(math.floor(centre * rate + 1e-6), max(0, (most * sub - span) // 2))
        first = centre - eval_start / rate
        grid = min(max(int((duration - first) * rate + 1e-6), span, eval_start + span), most * sub)
        frames, grid_times = load_clip(video_source, num_frames=grid, fps=rate, size=pre.size, start=first,
                                       train=False, normalize=False, name=name,
                                       **policy.clip_bounds())
        pixels = (frames * 255.0).round_().to(torch.uint8).numpy()
        grid_times = grid_times.numpy()
        write_entry(path, pixels=pixels, timestamps=grid_times, substeps=sub, eval_start=eval_start)
    span = (pre.num_frames - 1) * sub + 1
    starts = len(pixels) - span  # the last grid index a window may start at
    if train:
        start = int(torch.randint(0, starts + 1, (1,), generator=generator))
    else:
        start = min(eval_start, starts)
    window = torch.from_numpy(pixels[start:start + span:sub].astype(np.float32))  # [F, 3, S, S]
    std = torch.tensor(pre.std, dtype=torch.float32).view(3, 1, 1)
    mean = torch.tensor(pre.mean, dtype=torch.float32).view(3, 1, 1)
    window.mul_(1.0 / (255.0 * std)).sub_(mean / std)  # (x / 255 - mean) / std, as load_clip does
    return window, torch.from_numpy(np.asarray(grid_times[start:start + span:sub], dtype=np.float64))
