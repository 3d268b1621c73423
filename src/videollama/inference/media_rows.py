"""Per-row video keys/values for continuous batching: rows that read videos of different lengths.

A row of :class:`~videollama.inference.batch.BatchDecoder` reads at most one video: every
cross-attention block's ``(k, v)``, each ``[1, H, L, hd]`` with ``L`` = windows x latents per
window (a 4-second clip is one window, an hour up to the policy's ``max_windows``).
:class:`MediaRows` keeps them in one buffer per block, ``[rows, H, L_max, hd]``, and a key mask
``[rows, L_max]`` bool (True at a row's real latents), so that one decode step reads every row's
video in one batched cross-attention, short and long together; the padding is masked out.

The buffers grow and never shrink: in length at least to the longest video seen, doubling each
time they grow (never past ``max_latents``, the model's policy: ``max_windows`` x latents per
window), in rows to the most rows a step has read. A compiled step thus sees one shape per (row
bucket, L_max), and L_max takes at most log2(max_windows) + 1 values. What they hold at most:
rows x L_max x 2 x C x D x bytes per element (C cross-attention blocks, D = H x hd).
A row without a video keeps its first key visible (never an empty softmax); the decoder passes
such rows through every block unchanged (``Media.rows``).
"""

from __future__ import annotations

import torch

from videollama.model.decoder import Media

MediaKV = list[tuple[torch.Tensor, torch.Tensor]]  # per cross-attn block (k, v), batch dim 1


def max_media_latents(config) -> int:
    """The most latents one video gives under ``config``'s policy: ``max_windows`` windows of the
    resampler's latents, or of every frame's tokens without a resampler."""
    pre, vision = config.preprocess, config.vision
    per_window = config.resampler.num_latents or pre.num_frames * (vision.num_patches + 1)
    return pre.max_windows * per_window


class MediaRows:
    """The videos of a batch's rows (module docstring). ``num_blocks``: the model's cross-attention
    blocks; ``max_latents``: the longest video it may read (:func:`max_media_latents`)."""

    def __init__(self, num_blocks: int, max_latents: int) -> None:
        self.num_blocks, self.max_latents = num_blocks, max_latents
        self.kv: MediaKV | None = None  # per block (k, v), each [rows, H, L_max, hd]; at the first video
        self.mask: torch.Tensor | None = None  # [rows, L_max] bool
        self.lengths: list[int] = []  # latents of each buffer row's video (0: none)

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def length(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    @property
    def nbytes(self) -> int:
        """The buffers' bytes (K/V and mask)."""
        if self.kv is None:
            return 0
        kv = sum(t.numel() * t.element_size() for pair in self.kv for t in pair)
        return kv + self.mask.numel() * self.mask.element_size()

    def check(self, media_kv: MediaKV) -> int:
        """Raise ValueError unless ``media_kv`` is one video this batch can hold; its length L."""
        if len(media_kv) != self.num_blocks:
            raise ValueError(f"media_kv has {len(media_kv)} (k, v) pairs; the model has {self.num_blocks} "
                             "cross-attention blocks")
        length = media_kv[0][0].shape[2] if media_kv and media_kv[0][0].dim() == 4 else 0
        for i, (k, v) in enumerate(media_kv):
            if k.dim() != 4 or k.shape[0] != 1 or k.shape != v.shape or k.shape[2] != length or length < 1:
                raise ValueError(f"media_kv[{i}] must be (k, v), each [1, heads, latents, head_dim] with the same "
                                 f"latents in every block; got {tuple(k.shape)} and {tuple(v.shape)}")
            if self.kv is not None and (k.shape[1] != self.kv[i][0].shape[1] or k.shape[3] != self.kv[i][0].shape[3]
                                        or k.dtype != self.kv[i][0].dtype):
                raise ValueError(f"media_kv[{i}] is {tuple(k.shape[1:])} {k.dtype} per row; this batch holds "
                                 f"heads x head_dim {tuple(self.kv[i][0].shape[1::2])} {self.kv[i][0].dtype}")
        if length > self.max_latents:
            raise ValueError(f"a video of {length} latents is longer than this model's policy allows "
                             f"({self.max_latents}: preprocess.max_windows x latents per window)")
        return length

    def reserve(self, rows: int, length: int = 0, like: MediaKV | None = None) -> None:
        """Grow the buffers to at least ``rows`` rows and ``length`` latents (allocated at the first
        video, shaped ``like`` it; before any video only the row count is noted). Everything is
        allocated before anything changes: a failed allocation leaves the batch as it was."""
        if self.kv is None and like is None:
            return
        if self.kv is None:
            length = max(length, like[0][0].shape[2])
        rows = max(rows, self.rows)
        grown = self.length or length
        while grown < length:  # doubling: few distinct shapes for a compiled step
            grown *= 2
        length = max(min(grown, self.max_latents), self.length)
        if rows == self.rows and length == self.length:
            return
        template = like if self.kv is None else self.kv
        kv = [(k.new_zeros((rows, k.shape[1], length, k.shape[3])), v.new_zeros((rows, v.shape[1], length, v.shape[3])))
              for k, v in template]
        mask = torch.zeros(rows, length, dtype=torch.bool, device=template[0][0].device)
        mask[:, 0] = True  # rows without a video: one visible key
        if self.kv is not None:
            old_rows, old_length = self.rows, self.length
            for (new_k, new_v), (k, v) in zip(kv, self.kv):
                new_k[:old_rows, :, :old_length] = k
                new_v[:old_rows, :, :old_length] = v
            mask[:old_rows, :old_length] = self.mask
        self.kv, self.mask = kv, mask
        self.lengths += [0] * (rows - len(self.lengths))

    def put(self, row: int, media_kv: MediaKV) -> None:
        """Row ``row`` reads this video (checked, and the buffers reserved for it, by the caller)."""
        length = media_kv[0][0].shape[2]
        for (buf_k, buf_v), (k, v) in zip(self.kv, media_kv):
            buf_k[row, :, :length] = k[0]
            buf_v[row, :, :length] = v[0]
        self.mask[row] = False
        self.mask[row, :length] = True
        self.lengths[row] = length

    def clear(self, row: int) -> None:
        """Row ``row`` reads no video (its old keys stay, masked out)."""
        if row < self.rows:
            self.mask[row] = False
            self.mask[row, 0] = True
            self.lengths[row] = 0

    def move(self, source: int, target: int) -> None:
        """Row ``target`` takes row ``source``'s video (compaction after a row leaves)."""
        if source >= self.rows:
            return self.clear(target)
        length = self.lengths[source]
        if length:
            for k, v in self.kv:
                k[target, :, :length] = k[source, :, :length]
                v[target, :, :length] = v[source, :, :length]
        self.mask[target] = self.mask[source]
        self.lengths[target] = length

    def media(self, rows: int, reads: torch.Tensor) -> Media:
        """What the first ``rows`` rows of a step read (``reads`` [rows] bool: which of them have a
        video); the buffers grow to ``rows`` rows first if a step reads more rows than ever before."""
        self.reserve(rows)
        return Media(kv=[(k[:rows], v[:rows]) for k, v in self.kv], rows=reads, key_mask=self.mask[:rows])
