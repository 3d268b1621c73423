"""The reader's stages, in pipeline order, and :func:`reader_stream`, the one place that chains them::

    1 expand_sources     dirs, globs, brace patterns, .tar / .jsonl / video paths -> units (sources.py)
    2 order_units        shuffle the unit (shard) order per epoch, from (seed, epoch)
    3 split_by_node      units[rank::world_size]; with fewer units than ranks, every rank reads
                         every unit and keeps every world_size-th sample instead
    4 read_tar_members   robust tar reading: headers only; a truncated tail ends the shard (sources.py)
    5 group_members      consecutive KEY.* members -> one SampleRef (or a known-bad one) (sources.py)
    6 shuffle_refs       a bounded shuffle buffer over SampleRefs, from (seed, epoch, rank)
    7 split_by_worker    worker w of W takes indices start+w, start+w+W, ... of the rank's sequence
    8 decode_sample      read the bytes, parse JSON, load_clip -> Sample, or Skip(reason);
                         with a clip cache: decode each video once, then draw windows from it;
                         whole-video mode: every window under the model's policy (window_cache.py)
    9 tokenize_sample    make_examples + encode_example -> input_ids, labels (one row per text)
   10 collate            stack video, pad text rows right with pad_id (labels -100 on pads), video_index;
                         whole-video mode: collate_windows (the loader batches by a window budget)

Each rank's sample *sequence* (stages 1-6, skips included) is a pure function of (sources,
seed, epoch, rank, world_size), independent of the number of workers; the loader (loader.py)
runs stages 7-9 in workers and puts the results back in sequence order.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from videollama.config import PreprocessConfig
from videollama.constants import IGNORE_INDEX
from videollama.data import errors
from videollama.data.errors import BadSample
from videollama.data.read_policy import DEFAULT_POLICY, ReadPolicy
from videollama.data.sources import SampleRef, Unit, index_units, read_sample

TARGET_TOO_LONG = errors.TARGET_TOO_LONG  # encode_example never cuts a target: such samples are skipped


@dataclass
class Sample:
    """A decoded sample. video: [F, 3, S, S] float32; timestamps: [F] seconds (whole-video mode:
    every window, [W, F, 3, S, S] and [W, F]); input_ids/labels: one list of token ids per text of
    the clip (after tokenize_sample).

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


@dataclass
class ReaderPlan:
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
    policy: ReadPolicy = DEFAULT_POLICY  # where video paths may point, what one clip or video may cost
    windows: str = "clip"  # clip: one window per sample; whole: every window (window_cache.whole_video)
    window_budget: int = 0  # whole: a video with more windows is skipped (OVER_WINDOW_BUDGET)


def reader_stream(plan: ReaderPlan, epoch: int, start: int, *, worker_id: int = 0,
                  num_workers: int = 1) -> Iterator[Sample | Skip]:
    """The whole reader pipeline for one epoch of one rank, from sequence index ``start``: every
    stage in order, in this one place. A worker runs it for its slice (stage 7); the loader puts
    the workers' items back in sequence order."""
    p = plan
    units = order_units(p.units, seed=p.seed, epoch=epoch, shuffle=p.train)                 # 2
    units, stride, offset = split_by_node(units, rank=p.rank, world_size=p.world_size)      # 3
    refs: Iterable[SampleRef] = index_units(units, video_root=p.video_root, policy=p.policy)  # 4-5
    if stride > 1:  # fewer units than ranks: every rank reads all, keeps every stride-th sample
        refs = (ref for i, ref in enumerate(refs) if i % stride == offset)
    if p.train and p.shuffle_buffer > 1:                                                    # 6
        refs = shuffle_refs(refs, buffer_size=p.shuffle_buffer, rng=random.Random(f"{p.seed}/{epoch}/{p.rank}/refs"))
    for index, ref in split_by_worker(refs, start=start, worker_id=worker_id, num_workers=num_workers):  # 7
        item = decode_sample(index, ref, preprocess=p.preprocess, train=p.train, seed=p.seed,  # 8
                             epoch=epoch, cache_dir=p.cache_dir, windows=p.windows, window_budget=p.window_budget,
                             policy=p.policy)
        if p.tokenizer is not None:                                                         # 9
            item = tokenize_sample(item, tokenizer=p.tokenizer, task=p.task, max_len=p.max_len, seed=p.seed,
                                   epoch=epoch, texts_per_clip=p.texts_per_clip)
        yield item


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
    cache_dir: str | None = None, windows: str = "clip", window_budget: int = 0, policy: ReadPolicy = DEFAULT_POLICY,
) -> Sample | Skip:
    """Stage 8. Read the sample's bytes, parse its JSON and decode the clip; never raises for bad data.

    With ``cache_dir`` the clip comes from :func:`videollama.data.clip_cache.cached_clip` (decoded
    once, windows drawn from the cache) instead of a fresh ``load_clip``. ``windows`` "whole":
    every window of the video instead (:func:`videollama.data.window_cache.whole_video`: no
    random start, the same pixels every epoch; cached with ``cache_dir``).
    """
    from videollama.data.clip_cache import cached_clip
    from videollama.data.video import load_clip
    from videollama.data.window_cache import whole_video

    if ref.error is not None:
        return Skip(index, ref.key, ref.source, *ref.error)
    try:
        meta, video_source = read_sample(ref)
        generator = torch.Generator().manual_seed(sample_seed(seed, epoch, ref.source, ref.key))
        name = f"{ref.source}:{ref.key}" if ref.video_path is None else ref.video_path
        try:
            if windows == "whole":
                frames, timestamps = whole_video(
                    video_source, preprocess=preprocess, name=name, window_budget=window_budget,
                    cache_dir=cache_dir, identity=(ref.video_path or ref.source, ref.key), policy=policy,
                )
            elif cache_dir is not None:
                frames, timestamps = cached_clip(
                    video_source, cache_dir=cache_dir, identity=(ref.video_path or ref.source, ref.key),
                    preprocess=preprocess, train=train, generator=generator, name=name, policy=policy,
                )
            else:
                frames, timestamps = load_clip(
                    video_source, num_frames=preprocess.num_frames, fps=preprocess.fps, size=preprocess.size,
                    train=train, mean=preprocess.mean, std=preprocess.std, generator=generator, name=name,
                    **policy.clip_bounds(),
                )
        except BadSample:
            raise
        except Exception as e:  # FFmpeg failures load_clip did not classify still must not end the epoch
            raise BadSample(errors.DECODE_ERROR, ref.key, f"{type(e).__name__}: {e}") from e
    except BadSample as e:
        return Skip(index, ref.key, ref.source, e.reason, str(e))
    return Sample(index, ref.key, ref.source, meta, frames, torch.as_tensor(timestamps, dtype=torch.float64))


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
    except (KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
        # The JSON parsed but lacks what the task needs (e.g. no "qa" for videoqa).
        return Skip(item.index, item.key, item.source, errors.INVALID_JSON, f"{item.key}: unusable for {task}: {e}")
    item.input_ids, item.labels = [], []
    for prompt, target in texts:
        try:
            input_ids, labels = encode_example(tokenizer, prompt, target, max_len)
        except (ValueError, TypeError) as e:  # encode_example never cuts the target; such a sample cannot train
            return Skip(item.index, item.key, item.source, TARGET_TOO_LONG, f"{item.key}: {e}")
        item.input_ids.append(list(input_ids))
        item.labels.append(list(labels))
    return item


def collate(samples: list[Sample], *, pad_id: int) -> dict[str, Any]:
    """Stage 10. -> video [B, F, 3, S, S]; input_ids/labels [R, T] (right-padded), one row per text;
    video_index [R]: the clip each row belongs to (R == B, and video_index == 0..B-1, with one text
    per clip); timestamps [B, F]."""
    input_ids, labels, video_index = _text_rows(samples, pad_id)
    return {
        "video": torch.stack([s.video for s in samples]),  # [B, F, 3, S, S]
        "input_ids": input_ids,
        "labels": labels,
        "video_index": video_index,  # [R]
        "keys": [s.key for s in samples],
        "timestamps": torch.stack([s.timestamps for s in samples]),  # [B, F]
    }


def collate_windows(samples: list[Sample], *, pad_id: int) -> dict[str, Any]:
    """Stage 10 of whole-video mode. -> video [N, F, 3, S, S]: every window of the V videos, each
    video's windows consecutive and in time order; windows: {"times" [N, F] float64 seconds from
    its video's start, "video" [N] long (0..V-1)} (``videollama.model.videollama.Windows``);
    input_ids/labels [R, T] and video_index [R] (row -> video) as :func:`collate`; keys [V]."""
    input_ids, labels, video_index = _text_rows(samples, pad_id)
    counts = torch.tensor([s.video.shape[0] for s in samples])  # [V] windows per video
    return {
        "video": torch.cat([s.video for s in samples]),  # [N, F, 3, S, S]
        "windows": {"times": torch.cat([s.timestamps for s in samples]),  # [N, F]
                    "video": torch.repeat_interleave(torch.arange(len(samples)), counts)},  # [N]
        "input_ids": input_ids,
        "labels": labels,
        "video_index": video_index,  # [R]
        "keys": [s.key for s in samples],
    }


def _text_rows(samples: list[Sample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every text of every sample as a row, right-padded: input_ids, labels [R, T] (labels -100 on
    pads) and video_index [R], the sample each row belongs to."""
    rows = [(i, ids, lab) for i, s in enumerate(samples) for ids, lab in zip(s.input_ids, s.labels)]
    length = max(len(ids) for _, ids, _ in rows)
    input_ids = torch.tensor([list(ids) + [pad_id] * (length - len(ids)) for _, ids, _ in rows], dtype=torch.long)
    labels = torch.tensor([list(lab) + [IGNORE_INDEX] * (length - len(lab)) for _, _, lab in rows], dtype=torch.long)
    return input_ids, labels, torch.tensor([i for i, _, _ in rows], dtype=torch.long)
