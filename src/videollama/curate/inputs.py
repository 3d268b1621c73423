"""What ``videollama curate`` reads: a folder of videos or a manifest JSONL -> source records.

A source record is a plain dict (JSON-able, so both engines can ship it):
``{"source_id", "path" (absolute), "texts": [candidate texts], "meta": {other keys}}``.

* Folder: every video under it (recursively, sorted); candidate texts from a sidecar
  ``NAME.txt`` (the whole text is one candidate) or ``NAME.json`` (its ``texts`` list, else
  its ``caption``), read as ``data shards`` reads them (bounded, inside the folder).
* Manifest: one JSON object a line, ``{"id", "video", "texts": [...], ...}``; the video path is
  relative to the manifest's folder and must stay inside it; other keys are kept as ``meta``.

A line or sidecar that cannot be used is returned as a skip ``(reason, where, message)``,
counted in stats.json like a corrupt video.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from videollama.data import errors
from videollama.data.errors import BadSample
from videollama.data.read_policy import DEFAULT_POLICY, ReadPolicy
from videollama.data.safe_io import MAX_TEXT_CHARS, iter_manifest, resolve_inside
from videollama.data.sources import VIDEO_EXTS, read_sidecar

MAX_TEXTS = 64  # candidate texts of one video; more is a broken manifest
# A source id's length: its clips' files are named SOURCE_ID-NNNN.mp4 / .npy / .json (and temp names
# around them), far below the 255 bytes a file name may have.
MAX_ID_CHARS = 96


def source_id(text: str) -> str:
    """A key-safe id: letters, digits, '_' and '-' only (shard keys allow no dots), and at most
    ``MAX_ID_CHARS`` long. Clip ids, record and clip file names are made of it, so a longer id is
    cut and given a hash of the whole id (distinct ids stay distinct; shorter ids are unchanged)."""
    safe = re.sub(r"[^A-Za-z0-9_\-]", "_", text) or "_"
    if len(safe) <= MAX_ID_CHARS:
        return safe
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{safe[:MAX_ID_CHARS - len(digest) - 1]}_{digest}"


def _texts(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise ValueError(f"{where}: texts must be a list of strings")
    if len(value) > MAX_TEXTS:
        raise ValueError(f"{where}: {len(value)} texts, more than {MAX_TEXTS}")
    if any(len(t) > MAX_TEXT_CHARS for t in value):
        raise ValueError(f"{where}: a text is over {MAX_TEXT_CHARS} characters")
    return [t.strip() for t in value if t.strip()]


def read_inputs(input_path: str | Path, *, policy: ReadPolicy = DEFAULT_POLICY
                ) -> tuple[list[dict[str, Any]], list[tuple[str, str, str]]]:
    """``(sources sorted by source_id, skips)`` for a folder or a manifest JSONL."""
    path = Path(input_path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such folder or manifest")
    sources, skips = (_folder(path) if path.is_dir() else _manifest(path, policy))
    seen: set[str] = set()
    for s in sources:
        if s["source_id"] in seen:
            raise ValueError(f"{path}: source id {s['source_id']!r} appears twice (ids must be unique "
                             "after replacing characters other than letters, digits, '_' and '-')")
        seen.add(s["source_id"])
    return sorted(sources, key=lambda s: s["source_id"]), skips


def _folder(folder: Path):
    sources, skips = [], []
    videos = sorted(p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_EXTS and not p.is_dir())
    for video in videos:
        rel = video.relative_to(folder).as_posix()
        try:
            resolved = resolve_inside(folder, rel)
            meta = read_sidecar(video, root=folder)
            texts = _texts(meta.pop("texts", None), str(video)) or _texts(meta.pop("caption", None), str(video))
            meta.pop("caption", None)
        except BadSample as e:
            skips.append((e.reason, rel, str(e)))
            continue
        except ValueError as e:
            skips.append((errors.INVALID_JSON, rel, str(e)))
            continue
        sources.append({"source_id": source_id(str(Path(rel).with_suffix(""))), "path": str(resolved),
                        "texts": texts, "meta": {"video": rel, **meta}})
    return sources, skips


def _manifest(manifest: Path, policy: ReadPolicy):
    sources, skips = [], []
    root = manifest.parent
    for lineno, where, row in iter_manifest(manifest, manifest.name):
        try:
            if isinstance(row, ValueError):
                raise row
            texts = _texts(row.pop("texts", None), where)
            sid = row.pop("id", None)
            if sid is not None and not isinstance(sid, (str, int)):
                raise ValueError(f"{where}: id must be a string")
        except ValueError as e:
            skips.append((errors.INVALID_JSON, where, str(e)))
            continue
        try:
            if "\x00" in row["video"]:  # no OS call takes it ("embedded null byte"): a bad line, not the end
                raise BadSample(errors.INVALID_LINE, where, "the video path holds a NUL byte")
            video = policy.resolve(root, row["video"])
        except BadSample as e:
            skips.append((e.reason, where, str(e)))
            continue
        sid = source_id(str(sid) if sid is not None else f"{lineno:08d}_{Path(row['video']).stem}")
        sources.append({"source_id": sid, "path": str(video), "texts": texts, "meta": row})
    return sources, skips


def raw_pairs_manifest(web: Path, out: Path) -> Path:
    """A curate input manifest as uncurated training pairs: every upload whole, its candidate texts
    as its ``captions`` (one drawn per step; uploads without a text have nothing to train on and are
    left out). Returns ``out``, a manifest for ``videollama data shards``."""
    lines = []
    for _, _, row in iter_manifest(web / "manifest.jsonl"):
        if isinstance(row, ValueError):
            raise row
        if row.get("texts"):
            lines.append(json.dumps({"id": row["id"], "video": row["video"], "captions": row["texts"]}))
    out.write_text("\n".join(lines) + "\n")
    return out
