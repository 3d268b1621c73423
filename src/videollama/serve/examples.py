"""The example videos the chat page offers (ui.py): a folder's videos copied into the one folder
the page may serve them from, or a few fresh Shapes clips."""

from __future__ import annotations

import random
from pathlib import Path

from videollama.serve.uploads import read_video

# How many Shapes clips `videollama chat` offers as examples when given no --examples folder.
NUM_SHAPES_EXAMPLES = 3
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi")


def shapes_examples(directory: Path, n: int = NUM_SHAPES_EXAMPLES, seed: int = 0) -> list[Path]:
    """Write ``n`` Shapes clips (5 s, 320x240) into ``directory``; return their paths."""
    from videollama.data import shapes

    rng = random.Random(seed)
    paths = []
    for i in range(n):
        spec = shapes.sample_clip_spec(rng)
        path = directory / f"shapes-{i}.mp4"
        path.write_bytes(shapes.encode_mp4(shapes.render_frames(spec)))
        paths.append(path)
    return paths


def example_videos(folder: Path | None, scratch: Path, cap: int) -> list[Path]:
    """The example videos, in ``scratch`` (the only folder the page may serve them from): copies
    of ``folder``'s videos (sorted, at most 12, each at most ``cap`` bytes), or fresh Shapes clips."""
    if folder is None:
        return shapes_examples(scratch)
    if not folder.is_dir():
        raise NotADirectoryError(f"--examples {folder}: not a folder")
    found = sorted(p for p in folder.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
    if not found:
        raise ValueError(f"--examples {folder}: no video files ({', '.join(VIDEO_SUFFIXES)})")
    copies = []
    for path in found[:12]:
        copy = scratch / path.name
        copy.write_bytes(read_video(path, cap))
        copies.append(copy)
    return copies
