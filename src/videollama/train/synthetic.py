"""A data source with no files: random clips and token ids, for smoke tests, benchmarks and the
multi-process tests (1 and 2 ranks must see the same samples)."""

from __future__ import annotations

import torch

from videollama.config import VideoLlamaConfig
from videollama.constants import IGNORE_INDEX


class SyntheticClips:
    """Random clips and token ids, a pure function of (seed, sample index).

    Rank ``r`` of ``w`` takes global micro-batch ``n * w + r`` as its ``n``-th batch, so a
    global step covers the same samples whatever the number of ranks: a 1-rank run and a
    2-rank run with the same global batch see the same data. ``state_dict`` is the position.
    """

    def __init__(self, *, model_cfg: VideoLlamaConfig, batch_size: int, seq_len: int, seed: int,
                 rank: int, world_size: int):
        self.cfg = model_cfg
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.batches_taken = 0
        self.skipped: dict[str, int] = {}

    def state_dict(self) -> dict:
        return {"batches_taken": self.batches_taken}

    def load_state_dict(self, state: dict) -> None:
        self.batches_taken = int(state["batches_taken"])

    def sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        pre = self.cfg.preprocess
        video = torch.randn(pre.num_frames, 3, pre.size, pre.size, generator=g)  # [F, 3, H, W]
        ids = torch.randint(3, self.cfg.decoder.vocab_size, (self.seq_len,), generator=g)  # [T]
        labels = ids.clone()
        labels[: self.seq_len // 4] = IGNORE_INDEX  # a "prompt" that carries no loss, as in fine-tuning
        return video, ids, labels

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        first = (self.batches_taken * self.world_size + self.rank) * self.batch_size
        samples = [self.sample(first + i) for i in range(self.batch_size)]
        self.batches_taken += 1
        video, ids, labels = (torch.stack(x) for x in zip(*samples))
        return {"video": video, "input_ids": ids, "labels": labels}
