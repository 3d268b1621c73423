"""The per-video stage: probe -> one decoding pass (scene clips, each clip re-encoded to MP4, its
frames for every spec; onepass.py) -> motion.

:func:`process_video` is the unit of work that the local pool and Ray ``map`` both run, one
source video at a time. It writes each clip's MP4 and its sampled frames under the work folder
(clipfiles.py names them) and returns the clip rows (plain dicts) and what it cost. A source that
cannot be used returns no rows and the ``BadSample`` reason, counted in stats.json.

Clip times are seconds from the source's first frame (as everywhere in the project); a clip
``[start, end)`` holds the decoded frames whose presentation time falls in it, re-encoded at
the source's nominal rate (``clipfiles.ClipEncoder``). The source is decoded once, in one bounded
walk over its frames (``data/decoding.py``), whatever the number of clips and specs
(``onepass.py``; tests/curate_reference.py holds the same steps as separate passes, the reference
the tests and the curation benchmark compare with).
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import numpy as np

from videollama.curate.clipfiles import atomic_write, clip_path, frames_path
from videollama.curate.motion import motion_score
from videollama.curate.onepass import MAX_BUFFER_BYTES, one_pass
from videollama.curate.probe import MAX_PACKETS, probe_video
from videollama.data.errors import BadSample


def process_video(source: dict[str, Any], settings: dict[str, Any], work: str) -> dict[str, Any]:
    """Probe one source video, then decode it once (``onepass.one_pass``): scene cuts, each clip
    encoded, each clip's frames for every spec; then the motion score of each clip.

    ``settings``: ``min_clip_s``, ``max_clip_s``, ``threshold`` (scene cuts), ``crf``,
    ``max_frames``, ``specs`` (list of Spec, the first being the motion spec), optionally
    ``max_buffer_bytes`` (``onepass.MAX_BUFFER_BYTES``).
    Returns ``{"source_id", "rows": [clip rows], "error": None | [reason, message],
    "seconds": {stage: s}, "probe": {...}}``; the stages of the pass are ``decode`` (demuxing and
    decoding), ``scenes`` (thumbnails, scores, cut decisions), ``cut_encode`` (H.264 encoding and
    writing the MP4s), ``sample_frames`` (resizing and cropping the specs' frames, writing them)
    and ``second_pass`` (a source whose scene outgrew the frame buffer, decoded again).
    """
    work_dir = Path(work)
    seconds: dict[str, float] = {}
    result: dict[str, Any] = {"source_id": source["source_id"], "rows": [], "error": None, "seconds": seconds}

    def timed(name, fn, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0

    path = Path(source["path"])
    specs = [tuple(s) for s in settings["specs"]]
    try:
        probe = timed("probe", probe_video, path)
        scene_kwargs = {} if settings.get("threshold") is None else {"threshold": settings["threshold"]}
        t0 = time.perf_counter()
        decoded = one_pass(path, probe, min_clip_s=settings["min_clip_s"], max_clip_s=settings["max_clip_s"],
                           specs=specs, crf=settings["crf"], max_frames=min(MAX_PACKETS, settings["max_frames"]),
                           max_buffer_bytes=settings.get("max_buffer_bytes", MAX_BUFFER_BYTES), **scene_kwargs)
        cpu = decoded["cpu"]
        seconds["decode"] = cpu["decode"]
        seconds["cut_encode"] = cpu["encode"]
        seconds["sample_frames"] = cpu["sample"]
        seconds["second_pass"] = cpu["second_pass"]
        seconds["scenes"] = time.perf_counter() - t0 - cpu["decode"] - cpu["encode"] - cpu["sample"] - cpu["second_pass"]
        rows = []
        for index, (start, end, mp4, frames) in enumerate(decoded["clips"]):
            if mp4 is None:
                continue
            clip_id = f"{source['source_id']}-{index:04d}"
            timed("cut_encode", atomic_write, clip_path(work_dir, clip_id), mp4)
            for spec in specs:
                buf = io.BytesIO()
                np.save(buf, frames[spec], allow_pickle=False)
                timed("sample_frames", atomic_write, frames_path(work_dir, spec, clip_id), buf.getvalue())
            motion = float(timed("motion", motion_score, frames[specs[0]]))
            rows.append({
                "clip_id": clip_id, "source_id": source["source_id"],
                "start_s": round(start, 6), "end_s": round(end, 6), "duration_s": round(end - start, 6),
                "width": int(probe["width"]), "height": int(probe["height"]), "fps": float(probe["fps"]),
                "texts": list(source["texts"]), "motion": motion, "mp4_bytes": len(mp4),
            })
        result["rows"] = rows
        result["probe"] = {k: probe[k] for k in probe}
    except BadSample as e:
        result["error"] = [e.reason, str(e)]
    except FileNotFoundError as e:
        result["error"] = ["missing_video", f"{path}: {e}"]
    return result
