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


class SyntheticVideos(SyntheticClips):
    """Whole videos made of random windows, batched as the loader's whole-video mode batches them
    (``data.windows: whole``; ``videollama.data.stages.collate_windows``).

    Global micro-batch ``g`` (``n * w + r``, as :class:`SyntheticClips`) holds 1 to ``batch_size``
    videos of 1 to ``max_windows`` windows, at most ``window_budget`` in all, with one or two text
    rows each. Every window is one of ``palette`` fixed random windows, so windows repeat within a
    video (a still stretch) and across batches and ranks, as real static video does: what a
    latent cache keyed by content meets.
    """

    def __init__(self, *, window_budget: int, palette: int = 8, **kwargs):
        super().__init__(**kwargs)
        self.window_budget, self.palette = window_budget or self.cfg.preprocess.max_windows, palette

    def window(self, k: int) -> torch.Tensor:
        pre = self.cfg.preprocess
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * (k + 1))
        return torch.randn(pre.num_frames, 3, pre.size, pre.size, generator=g)  # [F, 3, S, S]

    def __next__(self) -> dict:
        from videollama.data.windows import sample_times

        pre = self.cfg.preprocess
        index = self.batches_taken * self.world_size + self.rank  # the global micro-batch
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + 999_983 * (index + 1))
        self.batches_taken += 1
        left = self.window_budget
        videos = int(torch.randint(1, min(self.batch_size, left) + 1, (1,), generator=g))
        counts = []
        for v in range(videos):
            most = min(pre.max_windows, left - (videos - v - 1))  # leave every later video a window
            counts.append(int(torch.randint(1, max(1, most) + 1, (1,), generator=g)))
            left -= counts[-1]
        picks = torch.randint(0, self.palette, (sum(counts),), generator=g).tolist()
        times = torch.cat([torch.from_numpy(sample_times([k * pre.window_s for k in range(n)], pre.num_frames, pre.fps))
                           for n in counts])  # [N, F]
        rows = [v for v in range(videos) for _ in range(1 + v % 2)]  # odd videos get two texts
        ids = torch.randint(3, self.cfg.decoder.vocab_size, (len(rows), self.seq_len), generator=g)  # [R, T]
        labels = ids.clone()
        labels[:, : self.seq_len // 4] = IGNORE_INDEX
        return {"video": torch.stack([self.window(k) for k in picks]),  # [N, F, 3, S, S]
                "windows": {"times": times, "video": torch.repeat_interleave(torch.arange(videos), torch.tensor(counts))},
                "input_ids": ids, "labels": labels, "video_index": torch.tensor(rows), "keys": [f"v{v}" for v in range(videos)]}
