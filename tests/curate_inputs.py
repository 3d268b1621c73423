"""Inputs for the curation tests that build their own raw videos, and the per-video jobs that kill
their own worker (imported by the pool's worker processes: nothing heavy at import).

``shapes_video``: one Shapes scene after another (``videollama.data.shapes_web``'s drawing and
encoder), each a ``(seed, seconds)`` pair; ``still`` makes every object still (a slideshow).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path


def shapes_video(scenes: list[tuple[int, float]], *, width: int = 320, height: int = 240, crf: int = 18,
                 still: bool = False) -> bytes:
    """An MP4 of the Shapes scenes ``[(seed, seconds), ...]`` joined by hard cuts, at ``width x height``."""
    import random

    from videollama.data.shapes import FPS, sample_clip_spec
    from videollama.data.shapes_web import encode, render_plan, still_spec

    plan = {"scenes": []}
    for seed, seconds in scenes:
        spec = sample_clip_spec(random.Random(seed))
        plan["scenes"].append({"spec": still_spec(spec) if still else spec, "frames": round(seconds * FPS)})
    return encode(render_plan(plan), width=width, height=height, crf=crf)


def scene_caption(seed: int) -> str:
    """The caption of the Shapes scene ``seed`` draws (what a right text says)."""
    import random

    from videollama.data.shapes import caption, sample_clip_spec

    return caption(sample_clip_spec(random.Random(seed)))


def killing_job(source: dict, settings: dict, work: str) -> str:
    """``engines.video_job``, except that a source whose id starts with ``die_always`` kills its worker
    process every time, and one starting with ``die_once`` the first time only (a flag file in
    ``work`` remembers it across processes)."""
    from videollama.curate.engines import video_job

    sid = source["source_id"]
    flag = Path(work) / f"killed-{sid}"
    if sid.startswith("die_always") or (sid.startswith("die_once") and not flag.exists()):
        flag.touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return video_job(source, settings, work)
