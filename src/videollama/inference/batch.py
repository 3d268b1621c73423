"""Continuous batching: requests join and leave a running decode between steps.

:class:`BatchDecoder` holds one static KV cache of ``max_batch`` rows x ``max_len`` positions.
:meth:`BatchDecoder.add` prefills a prompt into a free row (alone, exactly as
:func:`~videollama.inference.generate.generate` prefills a one-row batch) and returns its first new
token; :meth:`BatchDecoder.step` then runs one :func:`~videollama.inference.generate.decode_step`
for every active row at once, whatever each row's length, video or sampling settings.

The step's cost follows the number n of ACTIVE rows, not max_batch: active rows are kept
compacted in the buffers' rows 0..n-1 (when a request leaves, the last active row's cache,
mask, positions, token and video K/V move into its row), and the step runs on views ``[:n]`` of
the static buffers (no copies). The caller's slot ids stay stable: a slot -> row map follows the
moves. Eager steps use exactly n rows; the compiled step rounds n up to a bucket (1, 2, 4, 8, ...,
max_batch; the extra rows are idle ones) so that it compiles once per bucket (and per media /
no media), not once per n, gpt-fast style.

Videos: each row's cross-attention keys/values (``model.decoder.project_media(latents)`` of one
whole video, batch dim 1: a clip is one window, a long video up to the policy's ``max_windows``)
are copied into a buffer per cross-attention block, [rows, H, L_max, hd], with a key mask
[rows, L_max] for the rows whose video is shorter than the longest (:class:`~videollama.inference.
media_rows.MediaRows`); a bool ``media_rows`` [max_batch] says which rows read a video, and the
others pass every cross-attention block unchanged, exactly as the model does with ``video=None``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from videollama.inference.generate import prefill, run_step, sample, step_choice, step_report
from videollama.inference.media_rows import MediaKV, MediaRows, max_media_latents
from videollama.model.decoder import KVCache, Media


@dataclass
class _Row:
    temperature: float
    top_p: float
    generator: torch.Generator | None
    index: int  # its row in the static buffers (rows 0..n-1 hold the n active requests)


def buckets(max_batch: int) -> list[int]:
    """The compiled step's row counts: powers of two below max_batch, then max_batch."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return [*out, max_batch]


def bucket(n: int, max_batch: int) -> int:
    """The smallest bucket >= n (1 <= n <= max_batch)."""
    return next(b for b in buckets(max_batch) if b >= n)


class BatchDecoder:
    """Continuous batching over a static KV cache of max_batch rows x max_len positions."""

    def __init__(self, model, *, max_batch: int, max_len: int, compile: bool = False) -> None:
        d = model.config.decoder
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if not 1 < max_len <= d.max_seq_len:
            raise ValueError(f"max_len must be in [2, {d.max_seq_len}] (the model's max_seq_len), got {max_len}")
        self.model = model.eval()
        self.max_batch, self.max_len, self.compile = max_batch, max_len, compile
        device = model.decoder.embed_tokens.weight.device
        self.device = device
        self.caches = model.decoder.new_kv_cache(max_batch, max_len)
        self.key_mask = torch.zeros(max_batch, max_len, dtype=torch.bool, device=device)
        self.key_mask[:, 0] = True  # an idle row sees its slot 0: never an empty softmax
        self.write_pos = torch.zeros(max_batch, dtype=torch.long, device=device)  # next cache slot
        self.position = torch.zeros(max_batch, 1, dtype=torch.long, device=device)  # its rotary position
        self.tokens = torch.zeros(max_batch, 1, dtype=torch.long, device=device)  # the token to feed
        self.media_rows = torch.zeros(max_batch, dtype=torch.bool, device=device)
        self.media = MediaRows(len(model.decoder.cross_attn_layers), max_media_latents(model.config))
        self.rows: dict[int, _Row] = {}  # caller-visible slot -> its row (index moves on compaction)
        self.slot_at: list[int] = []  # row index -> slot, for the n active rows

    @property
    def free_slots(self) -> int:
        return self.max_batch - len(self.rows)

    def length(self, slot: int) -> int:
        """How many cache positions row ``slot`` uses (its prompt and the tokens fed since)."""
        self._check_active(slot)
        return int(self.write_pos[self.rows[slot].index])

    def _check_active(self, slot: int) -> None:
        if slot not in self.rows:
            raise ValueError(f"slot {slot} is not active")

    @torch.inference_mode()
    def add(self, prompt_ids: list[int], *, media_kv: MediaKV | None, temperature: float = 0.0,
            top_p: float = 1.0, seed: int | None = None,
            max_new_tokens: int | None = None) -> tuple[int, int]:
        """Prefill one request into a free slot; return (slot, first new token id).

        The row then holds len(prompt_ids) + (tokens fed by steps) positions, at most max_len;
        given ``max_new_tokens``, len(prompt_ids) + max_new_tokens must fit in max_len.
        seed: the row's own sampling generator (None: a random seed), so a seeded request draws
        the same tokens whatever else shares the batch.
        """
        if not self.free_slots:
            raise ValueError(f"no free slot: all {self.max_batch} rows are decoding")
        if temperature < 0 or not 0.0 < top_p <= 1.0:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
        n = len(prompt_ids)
        budget = n + (max_new_tokens if max_new_tokens is not None else 1)
        if n == 0 or budget > self.max_len or (max_new_tokens is not None and max_new_tokens < 1):
            raise ValueError(f"a prompt of {n} tokens with max_new_tokens {max_new_tokens} does not fit this "
                             f"batch decoder's max_len {self.max_len} (need 1 <= prompt + new <= max_len)")
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)  # [1, T]
        self.model.check_tokens(ids)
        length = self.media.check(media_kv) if media_kv is not None else 0
        slot = next(s for s in range(self.max_batch) if s not in self.rows)
        r = len(self.rows)  # the first idle row: active rows stay in 0..n-1

        # The prompt alone, into this row's slice of the cache (views: writes land in place).
        row_caches = [KVCache(c.k[r:r + 1], c.v[r:r + 1]) for c in self.caches]
        media = Media(kv=media_kv) if media_kv is not None else None
        logits = prefill(self.model, ids, attention_mask=torch.ones_like(ids), media=media,
                         kv_caches=row_caches)  # [1, V]
        generator = None
        if temperature > 0:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed) if seed is not None else generator.seed()
        first = sample(logits, temperature=temperature, top_p=top_p, generator=generator)  # [1]

        if media_kv is not None:
            self.media.reserve(r + 1, length, like=media_kv)
            self.media.put(r, media_kv)
        else:
            self.media.clear(r)
        self.media_rows[r] = media_kv is not None
        self.key_mask[r] = False
        self.key_mask[r, :n] = True
        self.write_pos[r] = n
        self.position[r, 0] = n
        self.tokens[r, 0] = first[0]
        self.rows[slot] = _Row(temperature, top_p, generator, r)
        self.slot_at.append(slot)
        return slot, int(first[0])

    @torch.inference_mode()
    def step(self) -> dict[int, int]:
        """One decode step for every active slot: {slot: next token id}.

        Each active row feeds its last token (the one add() or the previous step returned) at its
        next cache slot. A row whose cache is full raises ValueError: remove it first. The step
        runs on rows [:n] (eager) or [:bucket(n)] (compiled) of the static buffers.
        """
        n = len(self.rows)
        if not n:
            return {}
        lengths = self.write_pos[:n].tolist()
        full = [self.slot_at[i] for i, length in enumerate(lengths) if length >= self.max_len]
        if full:
            raise ValueError(f"slot(s) {full} hold max_len {self.max_len} positions already: remove them")
        self.key_mask[:n].scatter_(1, self.write_pos[:n, None], True)  # each row's new token sees itself
        any_media = bool(self.media_rows[:n].any())
        # Compiled: rows [:bucket(n)] (rows n.. are idle: slot 0 visible, writes at slot 0, outputs
        # ignored), unless the eager step measured faster at that bucket: then exactly n rows, eager.
        nb, compiled = n, False
        if self.compile:
            nb = bucket(n, self.max_batch)
            token, kwargs = self._step_inputs(nb, any_media)
            compiled = step_choice(self.model, token, **kwargs) == "compiled"
            nb = nb if compiled else n
        token, kwargs = self._step_inputs(nb, any_media)
        logits = run_step(compiled, self.model, token, **kwargs)  # [nb, V]
        new = logits[:n].argmax(dim=-1)  # [n]
        for i, slot in enumerate(self.slot_at):
            row = self.rows[slot]
            if row.temperature != 0.0:
                new[i] = sample(logits[i:i + 1], temperature=row.temperature, top_p=row.top_p,
                                generator=row.generator)[0]
        self.tokens[:n, 0] = new
        self.write_pos[:n] += 1
        self.position[:n] += 1
        return dict(zip(self.slot_at, new.tolist()))

    def _step_inputs(self, rows: int, any_media: bool) -> tuple[torch.Tensor, dict]:
        """decode_step's token and keyword inputs for rows [:rows] of the static buffers (views)."""
        caches = [KVCache(c.k[:rows], c.v[:rows]) for c in self.caches]
        media = self.media.media(rows, self.media_rows[:rows]) if any_media else None
        return self.tokens[:rows], {"position": self.position[:rows], "write_pos": self.write_pos[:rows],
                                    "key_mask": self.key_mask[:rows], "media": media, "kv_caches": caches}

    @torch.inference_mode()
    def warm_up(self, video: bool = True) -> list[dict]:
        """Before any request (with ``compile``): choose and compile the step of every row bucket,
        without and (``video``, when the model reads video) with video rows, on idle rows; the
        choice records (:func:`~videollama.inference.generate.step_report`) of those steps."""
        if self.rows:
            raise ValueError("warm_up needs an idle batch decoder")
        if not self.compile:
            return []
        media_options = [False]
        if video and len(self.model.decoder.cross_attn_layers):
            media_options.append(True)
            self.media.reserve(self.max_batch, like=self.model.decoder.project_media(self._blank_latents()))
        keys = []
        for any_media in media_options:
            self.media_rows[:] = any_media
            for b in buckets(self.max_batch):
                token, kwargs = self._step_inputs(b, any_media)
                step_choice(self.model, token, **kwargs)
                keys.append((b, self.max_len, any_media))
        self.media_rows[:] = False
        return [r for r in step_report() if (r["rows"], r["cache_len"], r["media"]) in keys]

    def _blank_latents(self) -> torch.Tensor:
        """The visual latents [1, L, D_v] of a black clip: a video's shapes, for warm-up."""
        cfg, p = self.model.config, next(self.model.vision.parameters())
        size = cfg.vision.image_size
        video = torch.zeros(1, cfg.preprocess.num_frames, 3, size, size, dtype=p.dtype, device=p.device)
        return self.model.encode_video(video)

    @torch.inference_mode()
    def remove(self, slot: int) -> None:
        """Free ``slot``: the last active row moves into its row (cache up to its length, mask,
        positions, token, video K/V), so rows 0..n-2 stay the active ones; the freed last row
        is reset to idle (its cache contents are left; the next add overwrites what it uses)."""
        self._check_active(slot)
        r = self.rows.pop(slot).index
        last = len(self.slot_at) - 1
        if r != last:
            moved = self.slot_at[last]
            used = int(self.write_pos[last])
            for c in self.caches:
                c.k[r, :, :used] = c.k[last, :, :used]
                c.v[r, :, :used] = c.v[last, :, :used]
            self.media.move(last, r)
            for buf in (self.key_mask, self.write_pos, self.position, self.tokens, self.media_rows):
                buf[r] = buf[last]
            self.rows[moved].index = r
            self.slot_at[r] = moved
        self.slot_at.pop()
        self.media.clear(last)
        self.media_rows[last] = False
        self.key_mask[last] = False
        self.key_mask[last, 0] = True
        self.write_pos[last] = 0
        self.position[last, 0] = 0
        self.tokens[last, 0] = 0
