"""The raw "web" Shapes corpus: long noisy uploads for curation to clean (docs/SHAPES.md, "Web mode").

Each raw video is several Shapes scenes (``shapes.sample_clip_spec``, drawn by ``shapes._draw``)
joined by hard cuts; each scene lasts a whole number of frames and its objects start at t = 0.
The texts of a video are a bag of candidate strings for the whole video, as on the web: per
scene, the scene's own caption (sometimes decorated with web boilerplate), no text at all, or
the caption of a scene of another video (a wrong text: it matches no scene of this video); plus
sometimes a text that describes nothing. Some videos are slideshows (every object still), some
re-upload a run of another video's scenes at another size and bitrate, some files are corrupt.

``videollama data web --out DIR`` writes ``DIR/manifest.jsonl`` (one line per raw video:
``{"id", "video", "texts", "source"}``, the path relative to ``DIR``), ``DIR/videos/*.mp4`` and,
apart from the manifest, ``DIR/truth.json``: per video its scenes (frames and seconds, caption,
spec, static or not), its cuts, each text's truth, its re-upload source, its corruption; the
duplicate groups (the same scene in several videos) and the corrupt files with the reason
``BadSample`` must give.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np

from videollama.data import errors
from videollama.data.shapes import FPS, HEIGHT, WIDTH, ClipSpec, _draw, caption, sample_clip_spec

SOURCE = "shapes-web-v1"
CRF = 18  # originals
REUPLOAD_SIZES = ((240, 180), (160, 120))
REUPLOAD_CRFS = (28, 32, 36)
PREFIXES = ("watch: ", "new video! ", "omg ", "HD | ", "must see: ")
SUFFIXES = (" #shapes #satisfying", " (full video)", " - like and subscribe", "!!!", " lol", " [4k]")
BOILERPLATE = ("like and subscribe for more videos", "my first upload", "untitled", "VID_20240117_0231.mp4",
               "best of 2024 compilation", "no description", "follow me for daily uploads")
# Corruptions and the BadSample reason that probe_video / find_cuts must give for each.
CORRUPTIONS = {
    "empty": errors.EMPTY_FILE,          # zero bytes
    "garbage": errors.INVALID_CONTAINER,  # random bytes
    "lost_moov": errors.INVALID_CONTAINER,  # mp4 whose tail (with the moov index) was lost
    "truncated": errors.DECODE_ERROR,     # faststart mp4 cut in the middle of its media data
    "zeroed": errors.ZERO_FRAMES,         # valid index, every sample zeroed: nothing decodes
}


@dataclasses.dataclass(frozen=True)
class WebConfig:
    """Size and noise knobs (shares are of raw videos, or of scenes for the text shares)."""

    videos: int = 80
    min_scenes: int = 3
    max_scenes: int = 5
    min_scene_s: float = 2.0
    max_scene_s: float = 4.0
    reupload_share: float = 0.1
    corrupt_share: float = 0.06
    slideshow_share: float = 0.1
    wrong_text_share: float = 0.15    # of scenes: described by another video's scene caption
    missing_text_share: float = 0.15  # of scenes: no text at all
    decorate_share: float = 0.3       # of correct texts: web boilerplate around the caption
    boilerplate_share: float = 0.3    # of videos: one extra text that describes nothing
    seed: int = 0

    def check(self) -> None:
        if self.videos < 1 or not 1 <= self.min_scenes <= self.max_scenes:
            raise ValueError(f"need videos >= 1 and 1 <= min_scenes <= max_scenes, got {self}")
        if not 1 / FPS <= self.min_scene_s <= self.max_scene_s <= 5.0:
            raise ValueError(f"scene lengths must lie in [{1 / FPS}, 5.0] s (a Shapes spec holds for 5 s)")
        shares = [self.reupload_share, self.corrupt_share, self.slideshow_share, self.wrong_text_share,
                  self.missing_text_share, self.decorate_share, self.boilerplate_share]
        if any(not 0 <= s <= 1 for s in shares) or self.reupload_share + self.corrupt_share + self.slideshow_share > 1:
            raise ValueError("shares must lie in [0, 1]; re-upload + corrupt + slideshow shares at most 1")
        if self.wrong_text_share + self.missing_text_share > 1:
            raise ValueError("wrong + missing text shares must be at most 1")


def _rng(seed: int, *parts) -> random.Random:
    digest = hashlib.sha256("/".join(map(str, (SOURCE, seed, *parts))).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def still_spec(spec: ClipSpec) -> ClipSpec:
    """The same objects at their t = 0 places, all still (a slideshow picture)."""
    objects = tuple(dataclasses.replace(o, motion="still", speed=0.0) for o in spec.objects)
    return ClipSpec(background=spec.background, objects=objects)


def plan_corpus(cfg: WebConfig) -> list[dict]:
    """Every raw video's plan (its truth, less what rendering adds), in id order; deterministic."""
    cfg.check()
    n = cfg.videos
    counts = {"corrupt": round(cfg.corrupt_share * n), "reupload": round(cfg.reupload_share * n),
              "slideshow": round(cfg.slideshow_share * n)}
    roles = [r for r, c in counts.items() for _ in range(c)]
    roles += ["original"] * (n - len(roles))
    _rng(cfg.seed, "roles").shuffle(roles)
    if "reupload" in roles and all(r in ("reupload", "corrupt") for r in roles):
        raise ValueError("re-uploads need at least one original or slideshow video")
    lo, hi = round(cfg.min_scene_s * FPS), round(cfg.max_scene_s * FPS)
    plans: list[dict] = []
    corrupt_kinds = sorted(CORRUPTIONS)
    for i, role in enumerate(roles):
        rng = _rng(cfg.seed, "video", i)
        plan = {"id": f"web-{i:06d}", "role": role, "width": WIDTH, "height": HEIGHT, "crf": CRF,
                "reupload_of": None, "corrupt": None}
        if role != "reupload":
            specs = [sample_clip_spec(rng) for _ in range(rng.randint(cfg.min_scenes, cfg.max_scenes))]
            if role == "slideshow":
                specs = [still_spec(s) for s in specs]
            plan["scenes"] = [{"spec": s, "frames": rng.randint(lo, hi)} for s in specs]
        if role == "corrupt":
            kind = corrupt_kinds[sum(p["role"] == "corrupt" for p in plans) % len(corrupt_kinds)]  # each in turn
            plan["corrupt"] = {"kind": kind, "reason": CORRUPTIONS[kind]}
        plans.append(plan)
    sources = [p for p in plans if p["role"] in ("original", "slideshow")]
    for plan in plans:
        if plan["role"] == "reupload":
            rng = _rng(cfg.seed, "reupload", plan["id"])
            source = rng.choice(sources)
            first = rng.randrange(len(source["scenes"]))
            last = rng.randint(first, len(source["scenes"]) - 1)
            plan["scenes"] = [dict(s) for s in source["scenes"][first:last + 1]]
            plan["reupload_of"] = {"video": source["id"], "first_scene": first}
            plan["width"], plan["height"] = rng.choice(REUPLOAD_SIZES)
            plan["crf"] = rng.choice(REUPLOAD_CRFS)
    for plan in plans:
        start = 0
        for scene in plan["scenes"]:
            spec = scene["spec"]
            scene.update(start_frame=start, end_frame=start + scene["frames"], start_s=start / FPS,
                         end_s=(start + scene["frames"]) / FPS, caption=caption(spec),
                         static=all(o.motion == "still" for o in spec.objects))
            start += scene["frames"]
        plan["num_frames"] = start
    _add_texts(plans, cfg)
    return plans


def _family(plan: dict) -> str:
    """Videos that show the same scenes share a family: the source and its re-uploads."""
    return plan["reupload_of"]["video"] if plan["reupload_of"] else plan["id"]


def _add_texts(plans: list[dict], cfg: WebConfig) -> None:
    """Each plan gets ``texts``: ``[{text, correct, scene, kind[, from]}]``, in manifest order."""
    for plan in plans:
        rng = _rng(cfg.seed, "texts", plan["id"])
        own = {s["caption"] for s in plan["scenes"]}
        others = [(p["id"], j, s["caption"]) for p in plans if _family(p) != _family(plan)
                  for j, s in enumerate(p["scenes"]) if s["caption"] not in own]
        texts = []
        for j, scene in enumerate(plan["scenes"]):
            r = rng.random()
            if r < cfg.missing_text_share:
                continue
            if r < cfg.missing_text_share + cfg.wrong_text_share and others:
                vid, k, text = rng.choice(others)
                texts.append({"text": text, "correct": False, "scene": None, "kind": "other_video",
                              "from": {"video": vid, "scene": k}})
            elif rng.random() < cfg.decorate_share:
                text = scene["caption"]
                choice = rng.randrange(3)
                if choice != 1:
                    text = rng.choice(PREFIXES) + text
                if choice != 0:
                    text = text.removesuffix(".") + rng.choice(SUFFIXES)
                texts.append({"text": text, "correct": True, "scene": j, "kind": "decorated"})
            else:
                texts.append({"text": scene["caption"], "correct": True, "scene": j, "kind": "caption"})
        if rng.random() < cfg.boilerplate_share:
            texts.append({"text": rng.choice(BOILERPLATE), "correct": False, "scene": None, "kind": "boilerplate"})
        rng.shuffle(texts)
        plan["texts"] = texts


# ---- rendering ------------------------------------------------------------------------------------

def render_plan(plan: dict):
    """The plan's frames, uint8 ``[240, 320, 3]`` (one buffer, repainted), scene after scene."""
    frame = np.empty((HEIGHT, WIDTH, 3), dtype=np.uint8)
    for scene in plan["scenes"]:
        for k in range(scene["frames"]):
            frame[:] = scene["spec"].background
            _draw(frame, scene["spec"], k / FPS)
            yield frame


def encode(frames, *, width: int, height: int, crf: int, faststart: bool = False) -> bytes:
    """H.264 (libx264 ultrafast, yuv420p, one thread) MP4 of 320x240 RGB frames, scaled by
    swscale (area filter) to ``width x height``; ``faststart`` puts the index first."""
    import av

    with tempfile.TemporaryDirectory() as tmp:  # a real file: the faststart pass seeks back
        path = os.path.join(tmp, "video.mp4")
        with av.open(path, "w", format="mp4", options={"movflags": "faststart"} if faststart else {}) as out:
            stream = out.add_stream("libx264", rate=FPS)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.codec_context.thread_count = 1
            stream.options = {"preset": "ultrafast", "crf": str(crf), "threads": "1"}
            for rgb in frames:
                frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
                if (width, height) != (rgb.shape[1], rgb.shape[0]):
                    frame = frame.reformat(width=width, height=height, format="yuv420p", interpolation="AREA")
                out.mux(stream.encode(frame))
            out.mux(stream.encode())
        return Path(path).read_bytes()


def corrupt(data: bytes, kind: str, rng: random.Random) -> bytes:
    """Damage an mp4 (``encode``'s bytes; ``truncated`` needs a faststart one) the ``kind`` way."""
    if kind == "empty":
        return b""
    if kind == "garbage":
        return rng.randbytes(max(len(data) // 4, 4096))
    boxes = _top_boxes(data)
    if kind == "lost_moov":
        return data[:boxes[b"moov"][0]]
    if kind == "truncated":
        offset, size = boxes[b"mdat"]
        return data[:offset + size // 2]
    if kind == "zeroed":
        offset, size = boxes[b"mdat"]
        return data[:offset + 8] + bytes(size - 8) + data[offset + size:]
    raise ValueError(f"unknown corruption {kind!r}; expected one of {sorted(CORRUPTIONS)}")


def _top_boxes(data: bytes) -> dict[bytes, tuple[int, int]]:
    """Top-level ISO BMFF boxes: ``type -> (offset, size)`` (the last of each type)."""
    boxes, offset = {}, 0
    while offset + 8 <= len(data):
        size, kind = int.from_bytes(data[offset:offset + 4], "big"), data[offset + 4:offset + 8]
        if size < 8:
            break
        boxes[kind] = (offset, size)
        offset += size
    return boxes


def render(job: tuple[dict, int]) -> bytes:
    """Worker: the file's bytes for one plan (corrupted when the plan says so)."""
    plan, seed = job
    kind = plan["corrupt"]["kind"] if plan["corrupt"] else None
    data = encode(render_plan(plan), width=plan["width"], height=plan["height"], crf=plan["crf"],
                  faststart=kind == "truncated")
    return corrupt(data, kind, _rng(seed, "corrupt", plan["id"])) if kind else data


# ---- files ----------------------------------------------------------------------------------------

def truth_of(plans: list[dict], cfg: WebConfig) -> dict:
    """The ground truth (JSON-ready), kept apart from the manifest."""
    videos = {}
    groups: dict[tuple[str, int], list[dict]] = {}
    for plan in plans:
        scenes = [{k: s[k] for k in ("start_frame", "end_frame", "start_s", "end_s", "caption", "static")}
                  | {"spec": s["spec"].to_dict()} for s in plan["scenes"]]
        videos[plan["id"]] = {
            "video": f"videos/{plan['id']}.mp4", "role": plan["role"], "width": plan["width"],
            "height": plan["height"], "crf": plan["crf"], "num_frames": plan["num_frames"],
            "duration_s": plan["num_frames"] / FPS, "scenes": scenes,
            "cut_frames": [s["start_frame"] for s in plan["scenes"][1:]],
            "cuts_s": [s["start_s"] for s in plan["scenes"][1:]],
            "texts": plan["texts"], "reupload_of": plan["reupload_of"], "corrupt": plan["corrupt"],
        }
        if plan["reupload_of"]:
            source, first = plan["reupload_of"]["video"], plan["reupload_of"]["first_scene"]
            for j in range(len(plan["scenes"])):
                members = groups.setdefault((source, first + j), [{"video": source, "scene": first + j}])
                members.append({"video": plan["id"], "scene": j})
    return {
        "source": SOURCE, "fps": FPS, "config": dataclasses.asdict(cfg), "videos": videos,
        "duplicate_groups": [groups[k] for k in sorted(groups)],
        "corrupt": {p["id"]: p["corrupt"]["reason"] for p in plans if p["corrupt"]},
    }


def synthesize_web(out: str | Path, cfg: WebConfig = WebConfig(), *, workers: int = 1) -> dict:
    """Write ``out/manifest.jsonl``, ``out/videos/``, ``out/truth.json``; returns counts and timing."""
    import multiprocessing

    from tqdm import tqdm

    out = Path(out)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    plans = plan_corpus(cfg)
    jobs = [(p, cfg.seed) for p in plans]
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        results = map(render, jobs) if pool is None else pool.imap(render, jobs, chunksize=2)
        with open(out / "manifest.jsonl", "w") as manifest:
            for plan, data in tqdm(zip(plans, results), total=len(plans), desc="web", unit="video"):
                (out / "videos" / f"{plan['id']}.mp4").write_bytes(data)
                line = {"id": plan["id"], "video": f"videos/{plan['id']}.mp4",
                        "texts": [t["text"] for t in plan["texts"]], "source": SOURCE}
                manifest.write(json.dumps(line) + "\n")
    finally:
        if pool is not None:
            pool.terminate()
    (out / "truth.json").write_text(json.dumps(truth_of(plans, cfg), indent=1) + "\n")
    seconds = time.perf_counter() - start
    return {"videos": len(plans), "scenes": sum(len(p["scenes"]) for p in plans),
            "frames": sum(p["num_frames"] for p in plans), "corrupt": sum(bool(p["corrupt"]) for p in plans),
            "seconds": seconds}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = WebConfig()
    parser.add_argument("--out", required=True, help="output folder (gets manifest.jsonl, videos/, truth.json)")
    parser.add_argument("--videos", type=int, default=d.videos, help="number of raw videos")
    parser.add_argument("--scenes", type=int, nargs=2, default=(d.min_scenes, d.max_scenes), metavar=("MIN", "MAX"),
                        help="scenes per video (uniform, inclusive)")
    parser.add_argument("--scene-seconds", type=float, nargs=2, default=(d.min_scene_s, d.max_scene_s),
                        metavar=("MIN", "MAX"), help="scene length in seconds (whole frames, uniform)")
    for name in ("reupload", "corrupt", "slideshow", "wrong_text", "missing_text", "decorate", "boilerplate"):
        parser.add_argument(f"--{name.replace('_', '-')}-share", type=float, default=getattr(d, f"{name}_share"),
                            help=f"share ({'of scenes' if 'text' in name else 'of videos'}); see docs/SHAPES.md")
    parser.add_argument("--seed", type=int, default=0, help="corpus seed")
    parser.add_argument("--workers", type=int, default=1, help="rendering processes")


def run(args: argparse.Namespace) -> int:
    cfg = WebConfig(videos=args.videos, min_scenes=args.scenes[0], max_scenes=args.scenes[1],
                    min_scene_s=args.scene_seconds[0], max_scene_s=args.scene_seconds[1],
                    reupload_share=args.reupload_share, corrupt_share=args.corrupt_share,
                    slideshow_share=args.slideshow_share, wrong_text_share=args.wrong_text_share,
                    missing_text_share=args.missing_text_share, decorate_share=args.decorate_share,
                    boilerplate_share=args.boilerplate_share, seed=args.seed)
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    stats = synthesize_web(args.out, cfg, workers=args.workers)
    print(f"wrote {stats['videos']} raw videos ({stats['scenes']} scenes, {stats['frames']} frames, "
          f"{stats['corrupt']} corrupt) to {args.out} with manifest.jsonl and truth.json "
          f"in {stats['seconds']:.1f} s")
    return 0
