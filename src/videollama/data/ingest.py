"""``videollama data shards``: a folder of videos or a JSONL manifest -> WebDataset shards.

Each video is read and probed (headers only) before it is written, so a shard never holds a
file FFmpeg cannot open; every skipped input is counted by reason and logged with its path.
"""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from videollama.data import errors
from videollama.data.errors import BadSample
from videollama.data.read_policy import DEFAULT_POLICY, ReadPolicy
from videollama.data.safe_io import iter_manifest, read_bounded, resolve_inside, written_beside
from videollama.data.sources import MAX_VIDEO_BYTES, VIDEO_EXTS, read_sidecar
from videollama.data.writer import parse_size, write_shards

log = logging.getLogger(__name__)


def probe_video(data: bytes, source: str) -> None:
    """Check that ``data`` opens as a container with a video stream (headers only).

    Raises BadSample(EMPTY_FILE | INVALID_CONTAINER | NO_VIDEO_STREAM).
    """
    if not data:
        raise BadSample(errors.EMPTY_FILE, source, "the file is empty")
    from videollama.data.container import open_video

    try:
        # The same declaration checks and bounded probing as load_clip: a hostile file must not
        # make `data shards` allocate gigabytes either.
        container, _ = open_video(data, source)
        container.close()
    except BadSample:
        raise
    except Exception as e:  # FFmpeg reports damage through many exception types
        raise BadSample(errors.INVALID_CONTAINER, source, f"FFmpeg cannot open it: {e}") from e


def _sanitise_key(rel: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-]", "_", rel) or "_"


def folder_samples(folder: Path, counts: dict[str, int]) -> Iterator[tuple[str, bytes, dict[str, Any]]]:
    """Videos under ``folder`` (recursively, sorted); caption from a sidecar ``.json``/``.txt``.

    Links are not followed out of the folder: a video or sidecar whose real path leaves it is skipped."""
    used: set[str] = set()
    videos = sorted(p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_EXTS and not p.is_dir())
    for path in videos:
        rel = path.relative_to(folder).as_posix()
        try:
            resolve_inside(folder, rel)
            meta = read_sidecar(path, root=folder)
        except BadSample as e:
            _report_skip(counts, e)
            continue
        except ValueError as e:
            _report_skip(counts, BadSample(errors.INVALID_JSON, str(path.with_suffix(".json")), str(e)))
            continue
        meta.setdefault("source", rel)
        key = _sanitise_key(str(Path(rel).with_suffix("")))
        while key in used:  # a/b.mp4 and a_b.mp4 would otherwise collide
            key += "_"
        used.add(key)
        yield from _validated(key, path, meta, counts)


def manifest_samples(manifest: Path, counts: dict[str, int], *, policy: ReadPolicy = DEFAULT_POLICY
                     ) -> Iterator[tuple[str, bytes, dict[str, Any]]]:
    """JSONL lines ``{"video": path, "caption": ..., "qa": [...], ...}``; paths relative to the
    file and inside its folder (unless ``policy.allow_outside_root``); each line bounded (safe_io)."""
    root = manifest.parent
    for lineno, where, row in iter_manifest(manifest):
        if isinstance(row, ValueError):
            _report_skip(counts, BadSample(errors.INVALID_JSON, where, str(row)))
            continue
        rel = row.pop("video")
        try:
            video = policy.resolve(root, rel)
        except BadSample as e:
            _report_skip(counts, BadSample(e.reason, where, str(e)))
            continue
        meta = {"caption": "", **row}
        meta.setdefault("source", video.relative_to(root.resolve()).as_posix()
                        if video.is_relative_to(root.resolve()) else str(video))
        key = f"{lineno:08d}_{_sanitise_key(video.stem)}"
        yield from _validated(key, video, meta, counts)


def _validated(key: str, path: Path, meta: dict[str, Any], counts: dict[str, int]):
    try:
        if not path.exists():
            raise BadSample(errors.MISSING_VIDEO, str(path), "the video file does not exist")
        data = read_bounded(path, MAX_VIDEO_BYTES, "video")
        probe_video(data, str(path))
    except BadSample as e:
        _report_skip(counts, e)
        return
    counts["written"] = counts.get("written", 0) + 1
    yield key, data, meta


def _report_skip(counts: dict[str, int], e: BadSample) -> None:
    log.warning("skipping %s", e)
    counts[e.reason] = counts.get(e.reason, 0) + 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="a folder of videos or a JSONL manifest")
    parser.add_argument("--out", required=True, help="output folder for the .tar shards")
    parser.add_argument("--shard-size", default="1GB", help="maximum shard size (default 1GB)")
    parser.add_argument("--max-count", type=int, default=None, help="maximum samples per shard")
    parser.add_argument("--prefix", default="shard", help="shard file name prefix (default shard)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the dataset already in --out (whole: written beside it, then swapped)")
    parser.add_argument("--allow-outside-root", action="store_true",
                        help="let manifest video paths leave the manifest's folder (absolute, '..', links out)")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    source, out = Path(args.input), Path(args.out)
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such folder or manifest")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not args.overwrite:
            raise ValueError(f"{out} is not empty: it may hold another dataset, and new shards would mix with "
                             "its old ones; give an empty folder, or --overwrite to replace it whole")
        others = [p.name for p in out.iterdir() if not (p.is_file() and p.suffix == ".tar")] if out.is_dir() else [out.name]
        if others:  # --overwrite replaces a dataset, never a folder that holds anything else
            raise ValueError(f"--overwrite: {out} holds more than .tar shards ({', '.join(sorted(others)[:5])}); "
                             "refusing to replace it")
    if out.resolve() == source.resolve() or source.resolve().is_relative_to(out.resolve()):
        raise ValueError(f"--out {out} holds the input {source}; write the shards somewhere else")
    counts: dict[str, int] = {}
    if source.is_dir():
        samples = folder_samples(source, counts)
    else:
        samples = manifest_samples(source, counts, policy=ReadPolicy(allow_outside_root=args.allow_outside_root))
    # Written beside --out and swapped in only when complete: an interrupted run, or one that
    # replaces an older dataset, never leaves a folder that mixes two.
    with written_beside(out) as staging:
        paths = write_shards(samples, staging, prefix=args.prefix, max_bytes=parse_size(args.shard_size),
                             max_count=args.max_count)
    written = counts.pop("written", 0)
    print(f"wrote {written} samples into {len(paths)} shards under {out}")
    if counts:
        print("skipped: " + ", ".join(f"{reason}={n}" for reason, n in sorted(counts.items())))
    return 0
