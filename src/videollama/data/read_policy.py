"""What a reader may open and what one video may cost: one object, built once from the recipe or
the command line and handed to every reader (the loader's stages, the JSONL and manifest readers,
curation's inputs, evaluation), instead of a root flag and decode bounds threaded apart.

* ``allow_outside_root``: a video path from a data file (JSONL line, manifest row) may leave the
  file's folder (or ``video_root``). Off by default: such a path is refused as ``outside_root``.
* ``clip_time_budget_s`` / ``max_decoded_frames``: the wall clock and the packets/frames one clip
  may cost (``load_clip``'s bounds, also the decoded-clip cache's).
* ``video_time_budget_s``: the wall clock for one whole video (every window of it:
  ``open_windows``); its frame cap is sized by the declared duration.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from videollama.data.safe_io import resolve_inside

# Work bounds for one clip. A 4 s window of a 60 FPS video with a 10 s keyframe interval needs
# about 840 frames; 3000 leaves room for long GOPs while still capping a pathological file.
DEFAULT_MAX_DECODED_FRAMES = 3000
DEFAULT_TIME_BUDGET_S = 60.0
# One whole video: every window, decoded once in order or seeked window by window.
DEFAULT_WHOLE_VIDEO_BUDGET_S = 600.0


@dataclass(frozen=True)
class ReadPolicy:
    allow_outside_root: bool = False
    clip_time_budget_s: float | None = DEFAULT_TIME_BUDGET_S
    max_decoded_frames: int = DEFAULT_MAX_DECODED_FRAMES
    video_time_budget_s: float | None = DEFAULT_WHOLE_VIDEO_BUDGET_S

    def __post_init__(self) -> None:
        for name in ("clip_time_budget_s", "video_time_budget_s"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0 < value < float("inf")):
                raise ValueError(f"read policy: {name} must be a positive number of seconds (or None), not {value!r}")
        if not isinstance(self.max_decoded_frames, int) or self.max_decoded_frames < 1:
            raise ValueError(f"read policy: max_decoded_frames must be a positive integer, not {self.max_decoded_frames!r}")

    def resolve(self, root: str | os.PathLike, relative: str) -> Path:
        """``root / relative``, refused (BadSample OUTSIDE_ROOT) if it leaves ``root`` unless allowed."""
        return resolve_inside(root, relative, allow_outside=self.allow_outside_root)

    def clip_bounds(self) -> dict:
        """``load_clip``'s keyword bounds."""
        return {"time_budget_s": self.clip_time_budget_s, "max_decoded_frames": self.max_decoded_frames}


DEFAULT_POLICY = ReadPolicy()  # frozen: safe to share as every reader's default
