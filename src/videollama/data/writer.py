"""The shard writer: WebDataset ``.tar`` files from ``(key, video bytes, metadata)`` samples.

Format (DESIGN.md section 4): plain POSIX tar files; each sample is two consecutive members,
``KEY.mp4`` (the untouched video bytes) and ``KEY.json`` (``caption``, optional ``qa`` list of
``{question, answer, kind}``, source metadata). Any WebDataset reader can read them.

Imports neither torch nor PyAV: ``videollama data shards``, the Shapes generator and curation
all write through :func:`write_shards`.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

_KEY_RE = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_\-/]*$")


def write_shards(
    samples: Iterable[tuple[str, bytes, dict[str, Any]]],
    out_dir: str | Path,
    *,
    prefix: str = "shard",
    max_bytes: int = 10**9,
    max_count: int | None = None,
) -> list[Path]:
    """Write ``(key, mp4_bytes, meta)`` samples into ``out_dir/{prefix}-000000.tar``, ...

    A new shard starts when the next sample would push the current one past ``max_bytes``
    (a single larger sample still gets a shard of its own) or past ``max_count`` samples.
    Keys must be unique and contain no dot (WebDataset splits ``KEY.ext`` at the first dot).
    Each shard is written to a ``.tmp`` name and renamed when complete, so a crash never
    leaves a half-written shard that looks finished. Returns the shard paths in order.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    seen_keys: set[str] = set()
    tar: tarfile.TarFile | None = None
    tmp_path = final_path = None
    shard_bytes = shard_count = 0

    def close_shard() -> None:
        nonlocal tar
        if tar is not None:
            tar.close()
            os.replace(tmp_path, final_path)
            paths.append(final_path)
            tar = None

    try:
        for key, video, meta in samples:
            if not _KEY_RE.match(key) or ".." in key:
                raise ValueError(f"sample key {key!r}: use letters, digits, '_', '-', '/' (no dots)")
            if key in seen_keys:
                raise ValueError(f"sample key {key!r} appears twice")
            seen_keys.add(key)
            meta_bytes = json.dumps(meta, ensure_ascii=False, sort_keys=True).encode()
            size = _tar_size(len(video)) + _tar_size(len(meta_bytes))
            full = tar is not None and (
                shard_bytes + size > max_bytes or (max_count is not None and shard_count >= max_count)
            )
            if tar is None or full:
                close_shard()
                final_path = out / f"{prefix}-{len(paths):06d}.tar"
                tmp_path = final_path.with_suffix(".tar.tmp")
                tar = tarfile.open(tmp_path, "w", format=tarfile.PAX_FORMAT)
                shard_bytes = shard_count = 0
            _add_member(tar, f"{key}.mp4", video)
            _add_member(tar, f"{key}.json", meta_bytes)
            shard_bytes += size
            shard_count += 1
        close_shard()
    finally:
        if tar is not None:  # an exception mid-shard: drop the partial file
            tar.close()
            Path(tmp_path).unlink(missing_ok=True)
    return paths


def _tar_size(n: int) -> int:
    """Bytes a member of ``n`` bytes takes in a tar: a 512-byte header plus padded data."""
    return 512 + (n + 511) // 512 * 512


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o444
    info.mtime = 0  # reproducible shards: the same input gives the same bytes
    tar.addfile(info, io.BytesIO(data))


def parse_size(text: str) -> int:
    """``"1GB"`` -> 10**9, ``"512MiB"`` -> 512 * 2**20, ``"4096"`` -> 4096."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?i?b?)\s*", text.lower())
    if not m:
        raise ValueError(f"cannot read size {text!r}; write e.g. 1GB, 500MB, 64MiB")
    number, unit = float(m.group(1)), m.group(2).rstrip("b")
    base = 1024 if unit.endswith("i") else 1000
    power = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}[unit.rstrip("i")]
    return int(number * base**power)
