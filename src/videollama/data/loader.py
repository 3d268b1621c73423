"""The training and evaluation loader: stages 7-10 in DataLoader workers, items back in
sequence order, batches, bad-data accounting with a skip budget, and an exact resume position.

Why plain ``tarfile`` + a torch ``IterableDataset`` instead of ``webdataset.WebDataset``: exact
resume and per-reason error accounting need control that its pipeline hides. Each rank's sample
sequence is a pure function of (sources, seed, epoch, rank, world_size) (stages.py); workers
decode interleaved slices of it and the main process puts the results back in sequence order,
so the batches are the same whatever ``num_workers`` is, and the position is just
``(epoch, number of refs consumed)``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from videollama.config import PreprocessConfig
from videollama.data.errors import SkipBudgetExceeded
from videollama.data.read_policy import ReadPolicy
from videollama.data.sources import expand_sources
from videollama.data.stages import ReaderPlan, Sample, Skip, collate, collate_windows, reader_stream

log = logging.getLogger(__name__)

STATE_VERSION = 1


class _EpochStream(IterableDataset):
    """Stages 7-9 for one epoch from ``start``: an IterableDataset a DataLoader can run in workers."""

    def __init__(self, plan: ReaderPlan, epoch: int, start: int):
        self.plan, self.epoch, self.start = plan, epoch, start

    def __iter__(self) -> Iterator[Sample | Skip]:
        info = get_worker_info()
        worker_id, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        for item in reader_stream(self.plan, self.epoch, self.start, worker_id=worker_id, num_workers=num_workers):
            if info is not None and isinstance(item, Sample):
                # To the main process as numpy, pickled into the worker's pipe: a tensor would go
                # through a shared-memory file descriptor of its own, a socket round trip each, a
                # cost on the scale of a tiny model's whole step. epoch_items turns them back into
                # tensors.
                item.video, item.timestamps = item.video.numpy(), item.timestamps.numpy()
            yield item


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # decoding is per-sample; intra-op threads would only oversubscribe
    # Ctrl-C reaches the whole process group: the main process checkpoints and stops the workers;
    # a worker that died of it first would end the epoch with an error instead.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def epoch_items(
    plan: ReaderPlan, epoch: int, start: int, *, num_workers: int, timeout_s: float = 600.0, prefetch: int = 2
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
    plan = ReaderPlan(
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
    and draw later windows from a uint8 cache there (see :func:`cached_clip`). ``policy``: where
    video paths may point and what one clip or video may cost (:class:`ReadPolicy`; its defaults).

    ``windows="whole"``: each sample is its whole video, every window the model's policy picks
    (``preprocess.max_windows``; :func:`videollama.data.window_cache.whole_video`), and a batch
    holds at most ``window_budget`` windows (0: ``max_windows``) of at most ``batch_size`` videos,
    taken in sequence order: a sample that does not fit starts the next batch, so long and short
    videos mix. A video with more windows than the budget is skipped and counted
    (``over_window_budget``): a batch never exceeds the budget, which is what bounds a step's
    memory. Batches are then ``{"video": [N, F, 3, S, S] (every window), "windows": {"times":
    [N, F], "video": [N]}, "input_ids", "labels", "video_index": [R] (row -> video), "keys": [V]}``
    (:func:`collate_windows`). The position is the first sample of the next batch, so resuming
    is exact here too.
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
        policy: ReadPolicy | None = None,
        windows: str = "clip",
        window_budget: int = 0,
    ):
        from videollama.data.tokenizer import PAD_ID, TASKS, load_tokenizer

        if task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, not {task!r}")
        if texts_per_clip < 0:
            raise ValueError(f"texts_per_clip must be >= 0 (0: every text of a clip), not {texts_per_clip}")
        if windows not in ("clip", "whole") or window_budget < 0:
            raise ValueError(f"windows must be clip or whole and window_budget >= 0, not {windows!r}, {window_budget}")

        if isinstance(tokenizer, (str, Path)):
            tokenizer = load_tokenizer(tokenizer)
        pad_id = PAD_ID if pad_id is None else pad_id
        self.units = expand_sources(sources)
        self.plan = ReaderPlan(
            units=self.units, preprocess=preprocess, seed=seed, rank=rank, world_size=world_size, train=train,
            shuffle_buffer=shuffle_buffer, video_root=video_root, tokenizer=tokenizer, task=task,
            max_len=max_len, cache_dir=None if cache_dir is None else str(cache_dir), texts_per_clip=texts_per_clip,
            policy=policy or ReadPolicy(), windows=windows,
            window_budget=(window_budget or preprocess.max_windows) if windows == "whole" else 0,
        )
        self.batch_size, self.num_workers, self.epochs = batch_size, num_workers, epochs
        self.pad_id, self.drop_last, self.worker_timeout_s = pad_id, drop_last, worker_timeout_s
        self.skip_budget, self.skip_budget_min_samples = skip_budget, skip_budget_min_samples
        # The committed position: where the next batch starts, and the counts up to there.
        self._epoch, self._position, self._seen, self._skipped = 0, 0, 0, {}
        self._active: Iterator | None = None
        self._logged: set[tuple[str, str]] = set()

    @classmethod
    def from_section(cls, data: Any, *, tokenizer: Any, preprocess: PreprocessConfig, batch_size: int,
                     max_len: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> VideoTextLoader:
        """The loader a recipe's ``data:`` section describes (train.recipe.DataSection: sources, task,
        workers, skip budget, caches, texts per clip, windows and their budget, and its read policy);
        the rest is the run's (tokenizer, the model's preprocessing, micro-batch, rank)."""
        return cls(data.sources, tokenizer=tokenizer, preprocess=preprocess, task=data.task, batch_size=batch_size,
                   max_len=max_len, seed=seed, rank=rank, world_size=world_size, num_workers=data.num_workers,
                   train=True, skip_budget=data.skip_budget, cache_dir=data.cache_dir,
                   texts_per_clip=data.texts_per_clip, policy=data.read_policy(), windows=data.windows,
                   window_budget=data.window_budget)

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
                if isinstance(item, Sample) and batch and not self._fits(batch, item):
                    commit()  # the batch ends before this item: the position is this item's
                    yield self._collate(batch)
                    batch = []
                position = item.index + 1
                accounting.count(item)
                if isinstance(item, Sample):
                    usable += 1
                    batch.append(item)
                    if self._full(batch):
                        commit()
                        yield self._collate(batch)
                        batch = []
            if self.epochs is None and first == 0 and usable == 0:
                raise RuntimeError(
                    f"epoch {epoch} of rank {self.plan.rank} had no usable sample "
                    f"(skipped: {accounting.skipped}); refusing to loop forever over {len(self.units)} sources"
                )
            epoch, position = epoch + 1, 0
        if batch and not self.drop_last:
            commit()
            yield self._collate(batch)
        commit()

    # ---- batching: batch_size clips, or whole videos within a window budget -----------
    def _windows(self, batch: list[Sample]) -> int:
        return sum(s.video.shape[0] for s in batch)  # whole-video samples: video [W, F, 3, S, S]

    def _fits(self, batch: list[Sample], item: Sample) -> bool:
        """Whether ``item`` joins ``batch`` (a clip always does: a full batch has already left)."""
        if self.plan.windows == "clip":
            return True
        return (len(batch) < self.batch_size
                and self._windows(batch) + item.video.shape[0] <= self.plan.window_budget)

    def _full(self, batch: list[Sample]) -> bool:
        if self.plan.windows == "clip":
            return len(batch) == self.batch_size
        return len(batch) == self.batch_size or self._windows(batch) == self.plan.window_budget

    def _collate(self, batch: list[Sample]) -> dict[str, Any]:
        if self.plan.windows == "clip":
            return collate(batch, pad_id=self.pad_id)
        return collate_windows(batch, pad_id=self.pad_id)
