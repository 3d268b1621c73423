"""Where samples come from: source expansion, tar shard indexing, evaluation-set lines and
loose videos, each turned into cheap :class:`SampleRef` records (offsets and paths, no bytes).

Indexing a tar reads its headers only, so a rank's whole sample sequence is known before
any video is decoded; a damaged shard yields its good samples and one TRUNCATED_TAR ref.
Imports no torch.
"""

from __future__ import annotations

import glob
import itertools
import os
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from videollama.data import errors
from videollama.data.errors import BadSample
from videollama.data.evalset import iter_eval_lines
from videollama.data.read_policy import DEFAULT_POLICY, ReadPolicy
from videollama.data.safe_io import (
    MAX_JSON_BYTES,
    check_regular_file,
    parse_json,
    read_bounded,
    read_json_object,
    resolve_inside,
)

VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v")
# A video larger than this is not read into memory (a shard member or a file for `data shards`).
MAX_VIDEO_BYTES = 4 * 2**30


@dataclass(frozen=True)
class Unit:
    """One readable source: a tar shard, an evaluation-set JSONL, or a loose video file."""

    kind: str  # "tar" | "jsonl" | "video"
    path: str


@dataclass
class SampleRef:
    """Where a sample's bytes are, without the bytes; ``error`` marks a sample known bad."""

    key: str
    source: str
    members: dict[str, tuple[int, int]] = field(default_factory=dict)  # ext -> (offset, size) in a tar
    video_path: str | None = None  # JSONL lines and loose videos
    meta: dict[str, Any] | None = None  # already parsed (JSONL line, sidecar)
    error: tuple[str, str] | None = None  # (reason, message)


def expand_sources(sources: str | Path | Sequence[str | Path]) -> list[Unit]:
    """Stage 1. Dirs (their ``*.tar``), globs, ``{000..009}`` brace patterns, or paths to
    ``.tar``, ``.jsonl`` or video files -> a sorted, de-duplicated list of units."""
    import braceexpand  # installed with webdataset

    if isinstance(sources, (str, Path)):
        sources = [sources]
    units: list[Unit] = []
    for source in sources:
        for pattern in braceexpand.braceexpand(str(source)):
            if any(c in pattern for c in "*?["):
                matches = sorted(glob.glob(pattern))
                if not matches:
                    raise FileNotFoundError(f"{pattern}: the pattern matches no file")
            elif os.path.isdir(pattern):
                matches = sorted(glob.glob(os.path.join(pattern, "*.tar")))
                if not matches:
                    raise FileNotFoundError(f"{pattern}: the folder holds no .tar shards")
            elif os.path.exists(pattern):
                matches = [pattern]
            else:
                raise FileNotFoundError(f"{pattern}: no such file or folder")
            for path in matches:
                units.append(Unit(_unit_kind(path), os.path.abspath(path)))
    return list(dict.fromkeys(units))


def _unit_kind(path: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix == ".tar":
        return "tar"
    if suffix == ".jsonl":
        return "jsonl"
    if suffix in VIDEO_EXTS:
        return "video"
    raise ValueError(f"{path}: not a .tar shard, a .jsonl evaluation set or a video file")


@dataclass
class _TarDamage:
    message: str
    cut_member: str | None  # the member whose data runs past the end of the file, if any
    reason: str = errors.TRUNCATED_TAR


def read_tar_members(path: str) -> Iterator[tuple[str, int, int] | _TarDamage]:
    """Stage 4. Yield ``(name, data_offset, size)`` for each regular member, reading headers only.

    A damaged shard yields its good members, then one ``_TarDamage`` (and stops): a member
    cut short, a truncated or invalid header, or a missing end-of-archive block.
    """
    try:
        file_size = check_regular_file(path, "shard").st_size  # a FIFO would block the open forever
        f = open(path, "rb")  # closed by the `with f` below
    except BadSample as e:
        yield _TarDamage(str(e), None, e.reason)
        return
    except OSError as e:  # deleted or unreadable since the shard list was made
        yield _TarDamage(f"cannot open the shard ({e})", None)
        return
    with f:
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
        except tarfile.ReadError as e:
            yield _TarDamage(f"not a readable tar ({e})", None)
            return
        while True:
            try:
                info = tar.next()
            except tarfile.ReadError as e:
                yield _TarDamage(f"unreadable tar header ({e})", None)
                return
            if info is None:
                break
            if not info.isfile():
                continue
            if info.offset_data + info.size > file_size:
                yield _TarDamage(f"{info.name} is cut short: the file ends early", info.name)
                return
            yield info.name, info.offset_data, info.size
        # tarfile stops quietly at a missing or garbled header; a complete tar ends with a zero block.
        f.seek(tar.offset)
        block = f.read(512)
        if len(block) < 512 or block.count(0) != 512:
            yield _TarDamage("the tar ends without its end-of-archive block (truncated)", None)


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset convention: the key is everything before the first dot of the base name."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), (ext.lower() if dot else "")


def group_members(path: str) -> Iterator[SampleRef]:
    """Stage 5. Consecutive ``KEY.*`` members of a tar -> SampleRefs; damage -> one TRUNCATED_TAR."""
    current: SampleRef | None = None

    def finish(ref: SampleRef) -> SampleRef:
        if ref.error is None:
            if not any(ext in ref.members for ext in VIDEO_MEMBER_EXTS):
                ref.error = (errors.MISSING_VIDEO, "the sample has no video member")
            elif "json" not in ref.members:
                ref.error = (errors.MISSING_JSON, "the sample has no .json member")
        return ref

    for item in read_tar_members(path):
        if isinstance(item, _TarDamage):
            # One TRUNCATED_TAR per damaged shard, blamed on the sample it cut: the owner of a
            # member cut short, else an incomplete sample in progress, else the shard's tail.
            cut_key = _split_name(item.cut_member)[0] if item.cut_member is not None else None
            if current is not None and cut_key not in (None, current.key):
                yield finish(current)
                current = None
            incomplete = current is not None and (
                cut_key is not None or "json" not in current.members
                or not any(ext in current.members for ext in VIDEO_MEMBER_EXTS)
            )
            if current is not None and not incomplete:
                yield finish(current)
            key = cut_key or (current.key if incomplete else f"<tail of {os.path.basename(path)}>")
            yield SampleRef(key=key, source=path, error=(item.reason, item.message))
            return
        name, offset, size = item
        key, ext = _split_name(name)
        if current is not None and key != current.key:
            yield finish(current)
            current = None
        if current is None:
            current = SampleRef(key=key, source=path)
        current.members[ext] = (offset, size)
    if current is not None:
        yield finish(current)


VIDEO_MEMBER_EXTS = tuple(ext.lstrip(".") for ext in VIDEO_EXTS)


def read_jsonl(path: str, video_root: str | None, *, policy: ReadPolicy = DEFAULT_POLICY) -> Iterator[SampleRef]:
    """Evaluation-set lines as samples (rules: videollama.data.evalset); videos relative to the
    file or ``video_root``, and inside it (safe_io.resolve_inside) unless ``policy.allow_outside_root``.
    A bad line is a known-bad ref (INVALID_JSON, OUTSIDE_ROOT, ...), counted by the loader."""
    root = video_root or os.path.dirname(path)
    name = os.path.basename(path)
    lines = iter_eval_lines(path)
    try:
        first = next(lines, None)  # the file is checked (a FIFO, a device, ...) when reading starts
    except BadSample as e:
        yield SampleRef(key=name, source=path, error=(e.reason, str(e)))
        return
    for lineno, item in itertools.chain([first] if first is not None else [], lines):
        key = f"{name}:{lineno}"
        if isinstance(item, ValueError):
            yield SampleRef(key=key, source=path, error=(errors.INVALID_JSON, str(item)))
            continue
        try:
            video = policy.resolve(root, item.video)
        except BadSample as e:
            yield SampleRef(key=key, source=path, error=(e.reason, f"{path}:{lineno}: {e}"))
            continue
        yield SampleRef(key=key, source=path, video_path=str(video), meta=item.training_meta())


def read_sidecar(video: str | os.PathLike, root: str | os.PathLike | None = None) -> dict[str, Any]:
    """A video's metadata from ``NAME.json`` (an object) or ``NAME.txt`` (the caption) beside it.

    Bounded in size and JSON depth; with ``root``, the sidecar read must resolve inside it
    (BadSample(OUTSIDE_ROOT) for a link out). Raises ValueError or BadSample naming the sidecar."""
    stem = os.path.splitext(video)[0]
    meta: dict[str, Any] = {"caption": ""}
    for ext in (".json", ".txt"):
        if root is not None and os.path.lexists(stem + ext):
            resolve_inside(root, os.path.relpath(os.path.abspath(stem + ext), os.path.abspath(root)))
            break
    if os.path.lexists(stem + ".json"):
        meta.update(read_json_object(stem + ".json", "sidecar .json"))
    elif os.path.lexists(stem + ".txt"):
        text = read_bounded(stem + ".txt", MAX_JSON_BYTES, "sidecar")
        try:
            meta["caption"] = text.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            raise ValueError(f"{stem}.txt: not valid UTF-8 ({e.reason} at offset {e.start})") from None
    return meta


def read_video_file(path: str) -> Iterator[SampleRef]:
    """Stage 5 for loose video files (``data inspect``): meta from a sidecar .json/.txt if any."""
    key = os.path.basename(os.path.splitext(path)[0])
    try:
        meta = read_sidecar(path)
    except BadSample as e:
        yield SampleRef(key=key, source=path, error=(e.reason, str(e)))
        return
    except ValueError as e:
        yield SampleRef(key=key, source=path, error=(errors.INVALID_JSON, str(e)))
        return
    yield SampleRef(key=key, source=path, video_path=path, meta=meta)


def index_units(units: list[Unit], *, video_root: str | None = None,
                policy: ReadPolicy = DEFAULT_POLICY) -> Iterator[SampleRef]:
    """Stages 4-5 over a list of units, in order."""
    for unit in units:
        if unit.kind == "tar":
            yield from group_members(unit.path)
        elif unit.kind == "jsonl":
            yield from read_jsonl(unit.path, video_root, policy=policy)
        else:
            yield from read_video_file(unit.path)


def _read_member(f, where: tuple[int, int]) -> bytes:
    offset, size = where
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise OSError(f"the shard ends {size - len(data)} bytes early")
    return data


def _parse_meta(data: bytes, source: str) -> dict[str, Any]:
    try:
        meta = parse_json(data, "the member")
    except ValueError as e:
        raise BadSample(errors.INVALID_JSON, source, f"not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise BadSample(errors.INVALID_JSON, source, "the JSON is not an object")
    return meta


def read_sample(ref: SampleRef) -> tuple[dict[str, Any], str | bytes]:
    """``(meta, video)`` of a good ref: the video's path (JSONL lines, loose files) or bytes (tar).

    Raises BadSample: a missing video, a shard that vanished or shrank since it was indexed,
    invalid metadata JSON.
    """
    if ref.video_path is not None:  # JSONL line or loose video
        if not os.path.exists(ref.video_path):
            raise BadSample(errors.MISSING_VIDEO, ref.video_path, "the video file does not exist")
        check_regular_file(ref.video_path, "video")
        return ref.meta or {}, ref.video_path
    ext = next(e for e in VIDEO_MEMBER_EXTS if e in ref.members)
    if ref.members[ext][1] > MAX_VIDEO_BYTES:
        raise BadSample(errors.TOO_LARGE, f"{ref.source}:{ref.key}.{ext}",
                        f"{ref.members[ext][1]} bytes, over the {MAX_VIDEO_BYTES}-byte cap")
    if ref.members["json"][1] > MAX_JSON_BYTES:
        raise BadSample(errors.INVALID_JSON, f"{ref.source}:{ref.key}.json",
                        f"{ref.members['json'][1]} bytes, over the {MAX_JSON_BYTES}-byte cap")
    try:
        with open(ref.source, "rb") as f:
            meta_bytes = _read_member(f, ref.members["json"])
            video = _read_member(f, ref.members[ext])
    except OSError as e:  # the shard vanished or shrank after it was indexed
        raise BadSample(errors.TRUNCATED_TAR, ref.source, f"cannot read {ref.key}: {e}") from e
    return _parse_meta(meta_bytes, f"{ref.source}:{ref.key}.json"), video
