"""WebDataset shards: the writer, the reader pipeline, bad-data accounting and an exact resume position.

Format (DESIGN.md section 4): plain POSIX tar files; each sample is two consecutive members,
``KEY.mp4`` (the untouched video bytes) and ``KEY.json`` (``caption``, optional ``qa`` list of
``{question, answer, kind}``, source metadata). Any WebDataset reader can read them.

The reader is a visible list of named stages, one function each::

    expand_sources     dirs, globs, brace patterns, .tar / .jsonl / video paths -> units
    order_units        shuffle the unit (shard) order per epoch, from (seed, epoch)
    split_by_node      units[rank::world_size]; with fewer units than ranks, every rank reads
                       every unit and keeps every world_size-th sample instead
    read_tar_members   robust tar reading: headers only; a truncated tail ends the shard
    group_members      consecutive KEY.* members -> one SampleRef (or a known-bad one)
    shuffle_refs       a bounded shuffle buffer over SampleRefs, from (seed, epoch, rank)
    split_by_worker    worker w of W takes indices start+w, start+w+W, ... of the rank's sequence
    decode_sample      read the bytes, parse JSON, load_clip -> Sample, or Skip(reason);
                       with a clip cache: decode each video once, then draw windows from the cache
    tokenize_sample    make_examples + encode_example -> input_ids, labels (one row per text)
    collate            stack video, pad text rows right with pad_id (labels -100 on pads), video_index

Why plain ``tarfile`` + a torch ``IterableDataset`` instead of ``webdataset.WebDataset``: exact
resume and per-reason error accounting need control that its pipeline hides. Indexing reads
only tar headers, so each rank's sample *sequence* (a list of cheap SampleRefs, skips
included) is a pure function of (sources, seed, epoch, rank, world_size), independent of the
number of workers. Workers decode interleaved slices of that sequence and the main process
puts the results back in sequence order, so the batches are the same whatever
``num_workers`` is, and the position is just ``(epoch, number of refs consumed)``.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from videollama.config import PreprocessConfig
from videollama.data import errors
from videollama.data.errors import BadSample

log = logging.getLogger(__name__)

VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v")
IGNORE_INDEX = -100
TARGET_TOO_LONG = errors.TARGET_TOO_LONG  # encode_example never cuts a target: such samples are skipped
STATE_VERSION = 1


# ======================================================================================
# Writer
# ======================================================================================

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


def parse_size(text: str) -> int:
    """``"1GB"`` -> 10**9, ``"512MiB"`` -> 512 * 2**20, ``"4096"`` -> 4096."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?i?b?)\s*", text.lower())
    if not m:
        raise ValueError(f"cannot read size {text!r}; write e.g. 1GB, 500MB, 64MiB")
    number, unit = float(m.group(1)), m.group(2).rstrip("b")
    base = 1024 if unit.endswith("i") else 1000
    power = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}[unit.rstrip("i")]
    return int(number * base**power)


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
        print(f"error: {source}: no such folder or manifest")
        return 2
    paths = write_shards(
        samples, args.out, prefix=args.prefix, max_bytes=parse_size(args.shard_size), max_count=args.max_count
    )
    written = counts.pop("written", 0)
    print(f"wrote {written} samples into {len(paths)} shards under {args.out}")
    if counts:
        print("skipped: " + ", ".join(f"{reason}={n}" for reason, n in sorted(counts.items())))
    return 0


# ======================================================================================
# Reader: the stages, in pipeline order
# ======================================================================================


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


@dataclass
class Sample:
    """A decoded sample. video: [F, 3, S, S] float32; timestamps: [F] seconds; input_ids/labels: one
    list of token ids per text of the clip (after tokenize_sample).

    Token ids stay Python lists until ``collate``: a worker process hands each tensor to the main
    process through its own shared-memory file descriptor, and with eight texts a clip those
    hand-overs took a third of a training step's time."""

    index: int
    key: str
    source: str
    meta: dict[str, Any]
    video: Any
    timestamps: Any
    input_ids: Any = None
    labels: Any = None


@dataclass
class Skip:
    """A sample that could not be used, with its reason code (videollama.data.errors)."""

    index: int
    key: str
    source: str
    reason: str
    message: str


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


def order_units(units: list[Unit], *, seed: int, epoch: int, shuffle: bool) -> list[Unit]:
    """Stage 2. The same order on every rank, reshuffled each epoch from (seed, epoch)."""
    units = list(units)
    if shuffle:
        random.Random(f"{seed}/{epoch}/units").shuffle(units)
    return units


def split_by_node(units: list[Unit], *, rank: int, world_size: int) -> tuple[list[Unit], int, int]:
    """Stage 3. -> (this rank's units, sample stride, sample offset).

    Whole units per rank when there are enough of them (each rank reads only its shards);
    otherwise every rank reads every unit and keeps samples ``i % world_size == rank``. Either
    way every sample of an epoch goes to exactly one rank.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if len(units) >= world_size:
        return units[rank::world_size], 1, 0
    return units, world_size, rank


@dataclass
class _TarDamage:
    message: str
    cut_member: str | None  # the member whose data runs past the end of the file, if any


def read_tar_members(path: str) -> Iterator[tuple[str, int, int] | _TarDamage]:
    """Stage 4. Yield ``(name, data_offset, size)`` for each regular member, reading headers only.

    A damaged shard yields its good members, then one ``_TarDamage`` (and stops): a member
    cut short, a truncated or invalid header, or a missing end-of-archive block.
    """
    try:
        file_size = os.path.getsize(path)
        f = open(path, "rb")  # closed by the `with f` below
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
            if not any(ext in ref.members for ext in _VIDEO_MEMBER_EXTS):
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
                or not any(ext in current.members for ext in _VIDEO_MEMBER_EXTS)
            )
            if current is not None and not incomplete:
                yield finish(current)
            key = cut_key or (current.key if incomplete else f"<tail of {os.path.basename(path)}>")
            yield SampleRef(key=key, source=path, error=(errors.TRUNCATED_TAR, item.message))
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


_VIDEO_MEMBER_EXTS = tuple(ext.lstrip(".") for ext in VIDEO_EXTS)


def read_jsonl(path: str, video_root: str | None) -> Iterator[SampleRef]:
    """Stage 5 for evaluation sets: each line is a sample; videos relative to the file or video_root.

    ``{"video", "question", "answer", "kind"}`` -> meta ``{"caption": "", "qa": [...]}``;
    ``{"video", "captions": [...]}`` -> meta ``{"caption": captions[0], "captions": [...]}``.
    """
    root = video_root or os.path.dirname(path)
    name = os.path.basename(path)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            key = f"{name}:{lineno}"
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("video"), str):
                    raise ValueError('each line must be a JSON object with a "video" path')
                meta = _eval_line_meta(row)
            except ValueError as e:
                yield SampleRef(key=key, source=path, error=(errors.INVALID_JSON, str(e)))
                continue
            yield SampleRef(key=key, source=path, video_path=os.path.join(root, row["video"]), meta=meta)


def _eval_line_meta(row: dict[str, Any]) -> dict[str, Any]:
    extra = {k: v for k, v in row.items() if k not in ("question", "answer", "kind", "captions")}
    if "question" in row:
        if not isinstance(row["question"], str) or not isinstance(row.get("answer"), str):
            raise ValueError("a VideoQA line needs string question and answer")
        qa = {"question": row["question"], "answer": row["answer"], "kind": row.get("kind", "")}
        return {**extra, "caption": "", "qa": [qa]}
    captions = row.get("captions")
    if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
        raise ValueError('a line needs "question"/"answer" or a non-empty "captions" list')
    return {**extra, "caption": captions[0], "captions": captions}


def read_video_file(path: str) -> Iterator[SampleRef]:
    """Stage 5 for loose video files (``data inspect``): meta from a sidecar .json/.txt if any."""
    meta: dict[str, Any] = {"caption": ""}
    stem = os.path.splitext(path)[0]
    try:
        if os.path.exists(stem + ".json"):
            loaded = json.loads(Path(stem + ".json").read_text())
            if not isinstance(loaded, dict):
                raise ValueError("the sidecar .json is not an object")
            meta.update(loaded)
        elif os.path.exists(stem + ".txt"):
            meta["caption"] = Path(stem + ".txt").read_text().strip()
    except (ValueError, UnicodeDecodeError) as e:
        yield SampleRef(key=os.path.basename(stem), source=path, error=(errors.INVALID_JSON, str(e)))
        return
    yield SampleRef(key=os.path.basename(stem), source=path, video_path=path, meta=meta)


def index_units(units: list[Unit], *, video_root: str | None = None) -> Iterator[SampleRef]:
    """Stages 4-5 over a list of units, in order."""
    for unit in units:
        if unit.kind == "tar":
            yield from group_members(unit.path)
        elif unit.kind == "jsonl":
            yield from read_jsonl(unit.path, video_root)
        else:
            yield from read_video_file(unit.path)


def shuffle_refs(refs: Iterable[SampleRef], *, buffer_size: int, rng: random.Random) -> Iterator[SampleRef]:
    """Stage 6. A bounded shuffle buffer. Refs are tiny, so a large buffer costs little memory."""
    buffer: list[SampleRef] = []
    for ref in refs:
        buffer.append(ref)
        if len(buffer) >= buffer_size:
            i = rng.randrange(len(buffer))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


def rank_sequence(
    units: list[Unit], *, seed: int, epoch: int, rank: int, world_size: int, shuffle: bool,
    shuffle_buffer: int, video_root: str | None = None,
) -> Iterator[SampleRef]:
    """Stages 2-6: this rank's deterministic sample sequence for one epoch (skips included)."""
    ordered = order_units(units, seed=seed, epoch=epoch, shuffle=shuffle)
    mine, stride, offset = split_by_node(ordered, rank=rank, world_size=world_size)
    refs: Iterable[SampleRef] = index_units(mine, video_root=video_root)
    if stride > 1:
        refs = (ref for i, ref in enumerate(refs) if i % stride == offset)
    if shuffle and shuffle_buffer > 1:
        refs = shuffle_refs(refs, buffer_size=shuffle_buffer, rng=random.Random(f"{seed}/{epoch}/{rank}/refs"))
    return iter(refs)


def split_by_worker(
    refs: Iterable[SampleRef], *, start: int, worker_id: int, num_workers: int
) -> Iterator[tuple[int, SampleRef]]:
    """Stage 7. Worker w takes sequence indices start+w, start+w+W, ... (with their index)."""
    for index, ref in enumerate(refs):
        if index >= start and (index - start) % num_workers == worker_id:
            yield index, ref


def sample_seed(seed: int, epoch: int, source: str, key: str) -> int:
    """Per-sample randomness (clip start, QA choice) from (seed, epoch, shard name, key)."""
    digest = hashlib.sha256(f"{seed}/{epoch}/{os.path.basename(source)}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def decode_sample(
    index: int, ref: SampleRef, *, preprocess: PreprocessConfig, train: bool, seed: int, epoch: int,
    cache_dir: str | None = None,
) -> Sample | Skip:
    """Stage 8. Read the sample's bytes, parse its JSON and decode the clip; never raises for bad data.

    With ``cache_dir`` the clip comes from :func:`cached_clip` (decoded once, windows drawn from
    the cache) instead of a fresh ``load_clip``.
    """
    from videollama.data.clip import load_clip

    if ref.error is not None:
        return Skip(index, ref.key, ref.source, *ref.error)
    try:
        if ref.video_path is not None:  # JSONL line or loose video
            if not os.path.exists(ref.video_path):
                raise BadSample(errors.MISSING_VIDEO, ref.video_path, "the video file does not exist")
            meta, video_source = ref.meta or {}, ref.video_path
        else:
            try:
                with open(ref.source, "rb") as f:
                    meta_bytes = _read_member(f, ref.members["json"])
                    ext = next(e for e in _VIDEO_MEMBER_EXTS if e in ref.members)
                    video_source = _read_member(f, ref.members[ext])
            except OSError as e:  # the shard vanished or shrank after it was indexed
                raise BadSample(errors.TRUNCATED_TAR, ref.source, f"cannot read {ref.key}: {e}") from e
            meta = _parse_meta(meta_bytes, f"{ref.source}:{ref.key}.json")
        generator = torch.Generator().manual_seed(sample_seed(seed, epoch, ref.source, ref.key))
        name = f"{ref.source}:{ref.key}" if ref.video_path is None else ref.video_path
        try:
            if cache_dir is not None:
                frames, timestamps = cached_clip(
                    video_source, cache_dir=cache_dir, identity=(ref.video_path or ref.source, ref.key),
                    preprocess=preprocess, train=train, generator=generator, name=name,
                )
            else:
                frames, timestamps = load_clip(
                    video_source, num_frames=preprocess.num_frames, fps=preprocess.fps, size=preprocess.size,
                    train=train, mean=preprocess.mean, std=preprocess.std, generator=generator, name=name,
                )
        except BadSample:
            raise
        except Exception as e:  # FFmpeg failures load_clip did not classify still must not end the epoch
            raise BadSample(errors.DECODE_ERROR, ref.key, f"{type(e).__name__}: {e}") from e
    except BadSample as e:
        return Skip(index, ref.key, ref.source, e.reason, str(e))
    return Sample(index, ref.key, ref.source, meta, frames, torch.as_tensor(timestamps, dtype=torch.float64))


# Most sample frames one video keeps in the cache: four windows' worth (a 4 s window of a 16 s clip).
CACHE_MAX_WINDOWS = 4
# A short video is cached on a grid up to this many times finer than 1 / fps, so that training
# windows start at many points (0.25 s apart at 1 FPS) rather than a few whole seconds apart.
CACHE_SUBSTEPS = 4


def cached_clip(
    video_source: str | bytes, *, cache_dir: str, identity: tuple[str, str], preprocess: PreprocessConfig,
    train: bool, generator: torch.Generator, name: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 8 with a clip cache: the clip ``load_clip`` would give, minus the decoding after the first time.

    Decoding H.264 costs a tiny model about as much CPU as training on the clip, and every epoch
    decodes every clip again. Here each video is decoded once onto the time grid ``k / (fps s)``
    (``s`` up to ``CACHE_SUBSTEPS`` sub-steps per frame interval for a short video, 1 for a long
    one; the grid covers the video up to ``CACHE_MAX_WINDOWS`` windows' worth of frames, centred
    in a longer video), centre-cropped, and kept as uint8 in ``cache_dir`` (one ``.npz`` per
    video, keyed by its file, size, mtime, sample key and the preprocessing spec). A window is
    every ``s``-th grid frame: training starts it at a grid point drawn from ``generator``;
    evaluation at ``load_clip``'s centred start, which the grid goes through. Compared with
    ``load_clip(train=True)`` the window start is drawn from the grid rather than from a
    continuum, and there is no random crop. Returns ``(frames [F, 3, S, S] float32 normalised,
    timestamps [F] float64)``; raises ``BadSample`` as ``load_clip`` does.
    """
    import av
    import numpy as np

    from videollama.data.clip import load_clip

    source, key = identity
    stat = os.stat(source)
    pre = preprocess
    ident = f"{os.path.abspath(source)}|{stat.st_size}|{stat.st_mtime_ns}|{key}|{pre.size}|{pre.fps}|{pre.num_frames}"
    path = Path(cache_dir) / f"{hashlib.sha256(ident.encode()).hexdigest()[:32]}.npz"
    try:
        with np.load(path, allow_pickle=False) as stored:
            # [G, 3, S, S] uint8, [G] seconds, grid steps per frame interval, evaluation's start
            pixels, grid_times = stored["pixels"], stored["timestamps"]
            sub, eval_start = int(stored["substeps"]), int(stored["eval_start"])
    except (OSError, ValueError, KeyError):  # not cached yet (or a damaged entry: decode again)
        try:
            with av.open(io.BytesIO(video_source) if isinstance(video_source, bytes) else video_source) as c:
                stream = c.streams.video[0]
                duration = (float(stream.duration * stream.time_base) if stream.duration is not None
                            else (c.duration or 0) / 1e6)
        except Exception:  # noqa: BLE001 - load_clip below names what is wrong with the file
            duration = 0.0
        most = CACHE_MAX_WINDOWS * pre.num_frames
        sub = max(1, min(CACHE_SUBSTEPS, most // max(1, math.ceil(duration * pre.fps - 1e-6))))
        rate = pre.fps * sub
        span = (pre.num_frames - 1) * sub + 1  # grid frames one window covers
        # The grid goes through load_clip's centred window start, so that evaluation sees exactly
        # load_clip's frames, and reaches back from it as far as the video (or the cap) allows.
        centre = max(0.0, (duration - pre.num_frames / pre.fps) / 2)
        eval_start = min(math.floor(centre * rate + 1e-6), max(0, (most * sub - span) // 2))
        first = centre - eval_start / rate
        grid = min(max(int((duration - first) * rate + 1e-6), span, eval_start + span), most * sub)
        frames, grid_times = load_clip(video_source, num_frames=grid, fps=rate, size=pre.size, start=first,
                                       train=False, normalize=False, name=name)
        pixels = (frames * 255.0).round_().to(torch.uint8).numpy()
        grid_times = grid_times.numpy()
        os.makedirs(cache_dir, exist_ok=True)
        # Written under a temporary name and renamed: a concurrent reader never sees half a file.
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, pixels=pixels, timestamps=grid_times, substeps=sub, eval_start=eval_start)
        os.replace(tmp, path)
    span = (pre.num_frames - 1) * sub + 1
    starts = len(pixels) - span  # the last grid index a window may start at
    if train:
        start = int(torch.randint(0, starts + 1, (1,), generator=generator))
    else:
        start = min(eval_start, starts)
    window = torch.from_numpy(pixels[start:start + span:sub].astype(np.float32))  # [F, 3, S, S]
    std = torch.tensor(pre.std, dtype=torch.float32).view(3, 1, 1)
    mean = torch.tensor(pre.mean, dtype=torch.float32).view(3, 1, 1)
    window.mul_(1.0 / (255.0 * std)).sub_(mean / std)  # (x / 255 - mean) / std, as load_clip does
    return window, torch.from_numpy(np.asarray(grid_times[start:start + span:sub], dtype=np.float64))


def _read_member(f, where: tuple[int, int]) -> bytes:
    offset, size = where
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise OSError(f"the shard ends {size - len(data)} bytes early")
    return data


def _parse_meta(data: bytes, source: str) -> dict[str, Any]:
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise BadSample(errors.INVALID_JSON, source, f"not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise BadSample(errors.INVALID_JSON, source, "the JSON is not an object")
    return meta


def tokenize_sample(
    item: Sample | Skip, *, tokenizer: Any, task: str, max_len: int, seed: int, epoch: int, texts_per_clip: int = 1
) -> Sample | Skip:
    """Stage 9. Choose the clip's texts (deterministically per sample) and encode each one.

    ``item.input_ids`` / ``item.labels`` become lists of token-id lists, one per text: the caption
    or one QA item by default, or several (``texts_per_clip``, see ``make_examples``)."""
    from videollama.data.tokenizer import encode_example, make_examples

    if isinstance(item, Skip):
        return item
    rng = random.Random(sample_seed(seed, epoch, item.source, item.key))
    meta = item.meta
    if task == "caption" and texts_per_clip == 1 and isinstance(meta.get("captions"), list) and meta["captions"]:
        meta = {**meta, "caption": rng.choice(meta["captions"])}  # evaluation-set lines hold several
    try:
        texts = make_examples(meta, task, rng, texts_per_clip)
    except (KeyError, ValueError, TypeError, IndexError) as e:
        # The JSON parsed but lacks what the task needs (e.g. no "qa" for videoqa).
        return Skip(item.index, item.key, item.source, errors.INVALID_JSON, f"{item.key}: unusable for {task}: {e}")
    item.input_ids, item.labels = [], []
    for prompt, target in texts:
        try:
            input_ids, labels = encode_example(tokenizer, prompt, target, max_len)
        except ValueError as e:  # encode_example never cuts the target; such a sample cannot train
            return Skip(item.index, item.key, item.source, TARGET_TOO_LONG, f"{item.key}: {e}")
        item.input_ids.append(list(input_ids))
        item.labels.append(list(labels))
    return item


def collate(samples: list[Sample], *, pad_id: int) -> dict[str, Any]:
    """Stage 10. -> video [B, F, 3, S, S]; input_ids/labels [R, T] (right-padded), one row per text;
    video_index [R]: the clip each row belongs to (R == B, and video_index == 0..B-1, with one text
    per clip); timestamps [B, F]."""
    rows = [(i, ids, lab) for i, s in enumerate(samples) for ids, lab in zip(s.input_ids, s.labels)]
    length = max(len(ids) for _, ids, _ in rows)
    input_ids = torch.tensor([list(ids) + [pad_id] * (length - len(ids)) for _, ids, _ in rows], dtype=torch.long)
    labels = torch.tensor([list(lab) + [IGNORE_INDEX] * (length - len(lab)) for _, _, lab in rows], dtype=torch.long)
    return {
        "video": torch.stack([s.video for s in samples]),  # [B, F, 3, S, S]
        "input_ids": input_ids,
        "labels": labels,
        "video_index": torch.tensor([i for i, _, _ in rows], dtype=torch.long),  # [R]
        "keys": [s.key for s in samples],
        "timestamps": torch.stack([s.timestamps for s in samples]),  # [B, F]
    }


# ======================================================================================
# Running the stages: workers, re-interleaving, accounting, position
# ======================================================================================


@dataclass
class _Plan:
    """Everything a worker needs to rebuild its slice of the rank's sequence (picklable)."""

    units: list[Unit]
    preprocess: PreprocessConfig
    seed: int
    rank: int
    world_size: int
    train: bool
    shuffle_buffer: int
    video_root: str | None
    tokenizer: Any = None
    task: str = "caption"
    max_len: int = 0
    cache_dir: str | None = None
    texts_per_clip: int = 1


class _EpochStream(IterableDataset):
    """Stages 7-9 for one epoch from ``start``: an IterableDataset a DataLoader can run in workers."""

    def __init__(self, plan: _Plan, epoch: int, start: int):
        self.plan, self.epoch, self.start = plan, epoch, start

    def __iter__(self) -> Iterator[Sample | Skip]:
        info = get_worker_info()
        worker_id, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        p = self.plan
        refs = rank_sequence(
            p.units, seed=p.seed, epoch=self.epoch, rank=p.rank, world_size=p.world_size, shuffle=p.train,
            shuffle_buffer=p.shuffle_buffer, video_root=p.video_root,
        )
        for index, ref in split_by_worker(refs, start=self.start, worker_id=worker_id, num_workers=num_workers):
            item = decode_sample(index, ref, preprocess=p.preprocess, train=p.train, seed=p.seed, epoch=self.epoch,
                                 cache_dir=p.cache_dir)
            if p.tokenizer is not None:
                item = tokenize_sample(
                    item, tokenizer=p.tokenizer, task=p.task, max_len=p.max_len, seed=p.seed, epoch=self.epoch,
                    texts_per_clip=p.texts_per_clip,
                )
            if info is not None and isinstance(item, Sample):
                # To the main process as numpy, pickled into the worker's pipe: a tensor would go
                # through a shared-memory file descriptor of its own, a socket round trip each
                # (2 ms apiece here, a sixth of a tiny model's training step). epoch_items turns
                # them back into tensors.
                item.video, item.timestamps = item.video.numpy(), item.timestamps.numpy()
            yield item


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # decoding is per-sample; intra-op threads would only oversubscribe


def epoch_items(
    plan: _Plan, epoch: int, start: int, *, num_workers: int, timeout_s: float = 600.0, prefetch: int = 2
) -> Iterator[Sample | Skip]:
    """Run one epoch's stream (in ``num_workers`` processes) and yield items in sequence order.

    ``prefetch``: samples each worker keeps ready ahead of the consumer (a batch's worth keeps a
    training step from waiting on the next clip)."""
    dataset = _EpochStream(plan, epoch, start)
    if num_workers == 0:
        yield from dataset
        return
    # The Rust tokenizer's thread pool does not survive fork; tokenizing in workers is serial anyway.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    loader = DataLoader(
        dataset, batch_size=None, num_workers=num_workers, worker_init_fn=_worker_init,
        timeout=timeout_s, prefetch_factor=max(2, prefetch),
    )
    # DataLoader already visits workers round-robin, which is sequence order here; re-ordering by
    # index anyway keeps the guarantee independent of that implementation detail.
    pending: dict[int, Sample | Skip] = {}
    expected = start
    for item in loader:
        if isinstance(item, Sample):
            item.video, item.timestamps = torch.from_numpy(item.video), torch.from_numpy(item.timestamps)
        pending[item.index] = item
        while expected in pending:
            yield pending.pop(expected)
            expected += 1
    if pending:
        raise RuntimeError(f"internal error: sample indices {sorted(pending)[:5]} arrived out of sequence")


class SkipBudgetExceeded(RuntimeError):
    """Too large a fraction of the data is unusable: something upstream is broken."""


class _Accounting:
    """Skip counts by reason, the skip budget, and logging each bad key once."""

    def __init__(self, *, skip_budget: float, min_samples: int, logged: set[tuple[str, str]] | None = None):
        self.skip_budget, self.min_samples = skip_budget, min_samples
        self.skipped: dict[str, int] = {}
        self.seen = 0
        self.examples: dict[str, str] = {}
        # Shared across iterations of one loader, so a bad sample is logged once, not once an epoch.
        self._logged = set() if logged is None else logged

    def count(self, item: Sample | Skip) -> None:
        self.seen += 1
        if isinstance(item, Skip):
            self.skipped[item.reason] = self.skipped.get(item.reason, 0) + 1
            self.examples.setdefault(item.reason, item.message)
            if (item.source, item.key) not in self._logged:
                self._logged.add((item.source, item.key))
                log.warning("skipped sample %s in %s: %s", item.key, item.source, item.message)
        n_skipped = sum(self.skipped.values())
        if self.seen >= self.min_samples and n_skipped > self.skip_budget * self.seen:
            detail = "; ".join(f"{r}: {n} (e.g. {self.examples[r]})" for r, n in sorted(self.skipped.items()))
            raise SkipBudgetExceeded(
                f"{n_skipped} of {self.seen} samples were unusable ({n_skipped / self.seen:.1%}), more than "
                f"the skip budget of {self.skip_budget:.1%}. By reason: {detail}"
            )


def iter_samples(
    sources: str | Path | Sequence[str | Path], *, preprocess: PreprocessConfig | None = None,
    video_root: str | None = None, num_workers: int = 0, seed: int = 0,
) -> Iterator[Sample | Skip]:
    """Decode every sample of ``sources`` once, in order (no shuffle, no tokenizer): for inspection."""
    plan = _Plan(
        units=expand_sources(sources), preprocess=preprocess or PreprocessConfig(), seed=seed, rank=0,
        world_size=1, train=False, shuffle_buffer=0, video_root=video_root,
    )
    yield from epoch_items(plan, 0, 0, num_workers=num_workers)


class VideoTextLoader:
    """Batches of video + text from shards or evaluation-set JSONL, resumable and robust to bad data.

    Iterating yields ``{"video": [B, F, 3, S, S] float32, "input_ids": [R, T] long,
    "labels": [R, T] long (-100 on the prompt and on pads), "video_index": [R] long (the clip of
    each text row), "keys": [str] * B, "timestamps": [B, F] float32}``. ``task`` is ``caption``,
    ``videoqa`` or ``caption+videoqa``; ``texts_per_clip`` texts of each clip become rows (0: all
    of them; the default 1 gives R == B). With ``epochs=None`` it never ends; each epoch reshuffles
    from ``(seed, epoch)``. Iteration continues from the current position, so
    ``load_state_dict`` then ``iter`` resumes exactly. Bad samples are skipped and counted in
    ``skipped``; ``SkipBudgetExceeded`` is raised once more than ``skip_budget`` of at least
    ``skip_budget_min_samples`` seen samples were unusable. ``cache_dir``: decode each video once
    and draw later windows from a uint8 cache there (see :func:`cached_clip`).
    """

    def __init__(
        self,
        sources: str | Path | Sequence[str | Path],
        *,
        tokenizer: Any,
        preprocess: PreprocessConfig,
        task: str = "caption",
        batch_size: int,
        max_len: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        train: bool = True,
        skip_budget: float = 0.01,
        skip_budget_min_samples: int = 100,
        epochs: int | None = None,
        shuffle_buffer: int = 1000,
        video_root: str | None = None,
        pad_id: int | None = None,
        drop_last: bool = False,
        worker_timeout_s: float = 600.0,
        cache_dir: str | None = None,
        texts_per_clip: int = 1,
    ):
        from videollama.data.tokenizer import PAD_ID, TASKS, load_tokenizer

        if task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, not {task!r}")
        if texts_per_clip < 0:
            raise ValueError(f"texts_per_clip must be >= 0 (0: every text of a clip), not {texts_per_clip}")

        if isinstance(tokenizer, (str, Path)):
            tokenizer = load_tokenizer(tokenizer)
        pad_id = PAD_ID if pad_id is None else pad_id
        self.units = expand_sources(sources)
        self.plan = _Plan(
            units=self.units, preprocess=preprocess, seed=seed, rank=rank, world_size=world_size, train=train,
            shuffle_buffer=shuffle_buffer, video_root=video_root, tokenizer=tokenizer, task=task,
            max_len=max_len, cache_dir=None if cache_dir is None else str(cache_dir), texts_per_clip=texts_per_clip,
        )
        self.batch_size, self.num_workers, self.epochs = batch_size, num_workers, epochs
        self.pad_id, self.drop_last, self.worker_timeout_s = pad_id, drop_last, worker_timeout_s
        self.skip_budget, self.skip_budget_min_samples = skip_budget, skip_budget_min_samples
        # The committed position: where the next batch starts, and the counts up to there.
        self._epoch, self._position, self._seen, self._skipped = 0, 0, 0, {}
        self._active: Iterator | None = None
        self._logged: set[tuple[str, str]] = set()

    # ---- position ------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def skipped(self) -> dict[str, int]:
        """Skipped samples by reason, up to the last batch yielded."""
        return dict(self._skipped)

    def _fingerprint(self) -> str:
        names = "\n".join(os.path.basename(u.path) for u in self.units)
        return hashlib.sha256(names.encode()).hexdigest()[:16]

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position: the next batch after restoring is the next batch now."""
        p = self.plan
        return {
            "version": STATE_VERSION, "epoch": self._epoch, "position": self._position, "seen": self._seen,
            "skipped": dict(self._skipped), "seed": p.seed, "rank": p.rank, "world_size": p.world_size,
            "shuffle_buffer": p.shuffle_buffer, "train": p.train, "sources": self._fingerprint(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        p = self.plan
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}; this code reads {STATE_VERSION}")
        # The position counts samples of *this rank's* sequence; that sequence depends on these.
        for name, now in (
            ("world_size", p.world_size), ("rank", p.rank), ("seed", p.seed),
            ("shuffle_buffer", p.shuffle_buffer), ("train", p.train), ("sources", self._fingerprint()),
        ):
            if state[name] != now:
                raise ValueError(
                    f"cannot resume: the loader state was saved with {name}={state[name]!r} but this loader "
                    f"has {name}={now!r}; the saved position only means something for the same sample "
                    "sequence (same shards, seed, shuffle buffer, rank and world size)"
                )
        self._close_active()
        self._epoch, self._position = int(state["epoch"]), int(state["position"])
        self._seen, self._skipped = int(state["seen"]), dict(state["skipped"])

    # ---- iteration -----------------------------------------------------------------
    def _close_active(self) -> None:
        if self._active is not None:
            self._active.close()  # stops its DataLoader workers
            self._active = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._close_active()
        self._active = self._batches()
        return self._active

    def _batches(self) -> Iterator[dict[str, Any]]:
        accounting = _Accounting(
            skip_budget=self.skip_budget, min_samples=self.skip_budget_min_samples, logged=self._logged
        )
        accounting.seen, accounting.skipped = self._seen, dict(self._skipped)
        epoch, position = self._epoch, self._position
        batch: list[Sample] = []

        def commit() -> None:
            self._epoch, self._position = epoch, position
            self._seen, self._skipped = accounting.seen, dict(accounting.skipped)

        while self.epochs is None or epoch < self.epochs:
            usable = 0
            first = position
            for item in epoch_items(
                self.plan, epoch, position, num_workers=self.num_workers, timeout_s=self.worker_timeout_s,
                prefetch=-(-self.batch_size // max(1, self.num_workers)),
            ):
                position = item.index + 1
                accounting.count(item)
                if isinstance(item, Sample):
                    usable += 1
                    batch.append(item)
                    if len(batch) == self.batch_size:
                        commit()
                        yield collate(batch, pad_id=self.pad_id)
                        batch = []
            if self.epochs is None and first == 0 and usable == 0:
                raise RuntimeError(
                    f"epoch {epoch} of rank {self.plan.rank} had no usable sample "
                    f"(skipped: {accounting.skipped}); refusing to loop forever over {len(self.units)} sources"
                )
            epoch, position = epoch + 1, 0
        if batch and not self.drop_last:
            commit()
            yield collate(batch, pad_id=self.pad_id)
        commit()
