"""``videollama data shards``: a folder of videos or a JSONL manifest -> WebDataset shards.

Each video is read and probed (headers only) before it is written, so a shard never holds a
file FFmpeg cannot open; every skipped input is counted by reason and logged with its path.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from videollama.data import errors
from videollama.data.errors import BadSample
from videollama.data.sources import VIDEO_EXTS
from videollama.data.writer import parse_size, write_shards

log = logging.getLogger(__name__)


def probe_video(data: bytes, source: str) -> None:
    """Check that ``data`` opens as a container with a video stream (headers only).

    Raises BadSample(EMPTY_FILE | INVALID_CONTAINER | NO_VIDEO_STREAM).
    """
    if not data:
        raise BadSample(errors.EMPTY_FILE, source, "the file is empty")
    import av

    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            has_video = bool(container.streams.video)
    except Exception as e:  # FFmpeg reports damage through many exception types
        raise BadSample(errors.INVALID_CONTAINER, source, f"FFmpeg cannot open it: {e}") from e
    if not has_video:
        raise BadSample(errors.NO_VIDEO_STREAM, source, "the container has no video stream")


def _sanitise_key(rel: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-]", "_", rel) or "_"


def folder_samples(folder: Path, counts: dict[str, int]) -> Iterator[tuple[str, bytes, dict[str, Any]]]:
    """Videos under ``folder`` (recursively, sorted); caption from a sidecar ``.json``/``.txt``."""
    used: set[str] = set()
    videos = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTS)
    for path in videos:
        rel = path.relative_to(folder).with_suffix("").as_posix()
        meta: dict[str, Any] = {"caption": ""}
        sidecar_json, sidecar_txt = path.with_suffix(".json"), path.with_suffix(".txt")
        try:
            if sidecar_json.exists():
                loaded = json.loads(sidecar_json.read_text())
                if not isinstance(loaded, dict):
                    raise ValueError("not a JSON object")
                meta.update(loaded)
            elif sidecar_txt.exists():
                meta["caption"] = sidecar_txt.read_text().strip()
        except (ValueError, UnicodeDecodeError) as e:
            _report_skip(counts, BadSample(errors.INVALID_JSON, str(sidecar_json), str(e)))
            continue
        meta.setdefault("source", path.relative_to(folder).as_posix())
        key = _sanitise_key(rel)
        while key in used:  # a/b.mp4 and a_b.mp4 would otherwise collide
            key += "_"
        used.add(key)
        yield from _validated(key, path, meta, counts)


def manifest_samples(manifest: Path, counts: dict[str, int]) -> Iterator[tuple[str, bytes, dict[str, Any]]]:
    """JSONL lines ``{"video": path, "caption": ..., "qa": [...], ...}``; paths relative to the file."""
    root = manifest.parent
    for lineno, line in enumerate(manifest.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{manifest}:{lineno}"
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("video"), str):
                raise ValueError('each line must be a JSON object with a "video" path')
        except ValueError as e:
            _report_skip(counts, BadSample(errors.INVALID_JSON, where, str(e)))
            continue
        video = root / row.pop("video")
        meta = {"caption": "", **row}
        meta.setdefault("source", video.relative_to(root).as_posix() if video.is_relative_to(root) else str(video))
        key = f"{lineno:08d}_{_sanitise_key(video.stem)}"
        yield from _validated(key, video, meta, counts)


def _validated(key: str, path: Path, meta: dict[str, Any], counts: dict[str, int]):
    try:
        if not path.exists():
            raise BadSample(errors.MISSING_VIDEO, str(path), "the video file does not exist")
        data = path.read_bytes()
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


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    source = Path(args.input)
    counts: dict[str, int] = {}
    if source.is_dir():
        samples = folder_samples(source, counts)
    elif source.is_file():
        samples = manifest_samples(source, counts)
    else:
        raise FileNotFoundError(f"{source}: no such folder or manifest")
    paths = write_shards(
        samples, args.out, prefix=args.prefix, max_bytes=parse_size(args.shard_size), max_count=args.max_count
    )
    written = counts.pop("written", 0)
    print(f"wrote {written} samples into {len(paths)} shards under {args.out}")
    if counts:
        print("skipped: " + ", ".join(f"{reason}={n}" for reason, n in sorted(counts.items())))
    return 0
