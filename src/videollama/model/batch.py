"""Continuous batching: requests join and leave a running decode between steps.

:class:`BatchDecoder` holds one static KV cache of ``max_batch`` rows x ``max_len`` positions.
:meth:`BatchDecoder.add` prefills a prompt into a free row (alone, exactly as
:func:`~videollama.model.generate.generate` prefills a one-row batch) and returns its first new
token; :meth:`BatchDecoder.step` then runs one :func:`~videollama.model.generate.decode_step` for
every row at once, whatever each row's length, video or sampling settings. Shapes never change
from step to step ([max_batch, 1] tokens, a [max_batch, max_len] key mask, per-row write slots),
so the compiled step compiles once (twice: with and without any video row in the batch).

Videos: each row's cross-attention keys/values (``model.decoder.project_media(model.encode_video(v))``,
batch dim 1) are copied into a [max_batch, H, L, hd] buffer per cross-attention block; a bool
``media_rows`` [max_batch] says which rows read it, and the others pass every cross-attention
block unchanged, exactly as the model does with ``video=None``. All videos of one decoder must
give the same number of latents L (the resampler's ``num_latents``, or frames x tokens per frame).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from videollama.model.decoder import KVCache
from videollama.model.generate import run_step, sample

MediaKV = list[tuple[torch.Tensor, torch.Tensor]]  # per cross-attn block (k, v), batch dim 1


@dataclass
class _Row:
    temperature: float
    top_p: float
    generator: torch.Generator | None


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
        self.media_kv: MediaKV | None = None  # allocated at the first video
        self.rows: dict[int, _Row] = {}

    @property
    def free_slots(self) -> int:
        return self.max_batch - len(self.rows)

    def length(self, slot: int) -> int:
        """How many cache positions row ``slot`` uses (its prompt and the tokens fed since)."""
        self._check_active(slot)
        return int(self.write_pos[slot])

    def _check_active(self, slot: int) -> None:
        if slot not in self.rows:
            raise ValueError(f"slot {slot} is not active")

    def _check_media(self, media_kv: MediaKV) -> None:
        blocks = self.model.decoder.cross_attn_layers
        if len(media_kv) != len(blocks):
            raise ValueError(f"media_kv has {len(media_kv)} (k, v) pairs; the model has {len(blocks)} "
                             "cross-attention blocks")
        for i, (k, v) in enumerate(media_kv):
            if k.dim() != 4 or k.shape[0] != 1 or k.shape != v.shape:
                raise ValueError(f"media_kv[{i}] must be (k, v), each [1, heads, latents, head_dim]; got "
                                 f"{tuple(k.shape)} and {tuple(v.shape)}")
            if self.media_kv is not None and k.shape[1:] != self.media_kv[i][0].shape[1:]:
                raise ValueError(f"media_kv[{i}] is {tuple(k.shape[1:])} per row; this batch decoder holds "
                                 f"{tuple(self.media_kv[i][0].shape[1:])} (every video must give the same "
                                 "number of latents)")

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
        if media_kv is not None:
            self._check_media(media_kv)
        slot = next(s for s in range(self.max_batch) if s not in self.rows)

        # The prompt alone, into this row's slice of the cache (views: writes land in place).
        row_caches = [KVCache(c.k[slot:slot + 1], c.v[slot:slot + 1]) for c in self.caches]
        hidden = self.model.decoder(ids, positions=torch.arange(n, device=self.device)[None], key_mask=None,
                                    media=media_kv, kv_caches=row_caches, start=0)
        logits = self.model.lm_head(hidden[:, -1])  # [1, V]
        generator = None
        if temperature > 0:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed) if seed is not None else generator.seed()
        first = sample(logits, temperature=temperature, top_p=top_p, generator=generator)  # [1]

        if media_kv is not None:
            if self.media_kv is None:
                self.media_kv = [(k.new_zeros((self.max_batch, *k.shape[1:])),
                                  v.new_zeros((self.max_batch, *v.shape[1:]))) for k, v in media_kv]
            for (buf_k, buf_v), (k, v) in zip(self.media_kv, media_kv):
                buf_k[slot].copy_(k[0])
                buf_v[slot].copy_(v[0])
        self.media_rows[slot] = media_kv is not None
        self.key_mask[slot] = False
        self.key_mask[slot, :n] = True
        self.write_pos[slot] = n
        self.position[slot, 0] = n
        self.tokens[slot, 0] = first[0]
        self.rows[slot] = _Row(temperature, top_p, generator)
        return slot, int(first[0])

    @torch.inference_mode()
    def step(self) -> dict[int, int]:
        """One decode step for every active slot: {slot: next token id}.

        Each active row feeds its last token (the one add() or the previous step returned) at its
        next cache slot. A row whose cache is full raises ValueError: remove it first.
        """
        if not self.rows:
            return {}
        active = torch.tensor(sorted(self.rows), dtype=torch.long, device=self.device)
        full = [s for s in self.rows if int(self.write_pos[s]) >= self.max_len]
        if full:
            raise ValueError(f"slot(s) {full} hold max_len {self.max_len} positions already: remove them")
        self.key_mask[active, self.write_pos[active]] = True  # each row's new token sees itself
        any_media = bool(self.media_rows[active].any())
        logits = run_step(self.compile, self.model, self.tokens, position=self.position, write_pos=self.write_pos,
                          key_mask=self.key_mask, media_kv=self.media_kv if any_media else None,
                          kv_caches=self.caches, media_rows=self.media_rows if any_media else None)  # [B, V]
        greedy = logits.argmax(dim=-1)  # [B]
        out: dict[int, int] = {}
        for slot, row in self.rows.items():
            if row.temperature == 0.0:
                tok = greedy[slot]
            else:
                tok = sample(logits[slot:slot + 1], temperature=row.temperature, top_p=row.top_p,
                             generator=row.generator)[0]
            self.tokens[slot, 0] = tok
            out[slot] = int(tok)
        self.write_pos[active] += 1
        self.position[active] += 1
        return out

    def remove(self, slot: int) -> None:
        """Free row ``slot`` (its cache contents are left; the next add overwrites what it uses)."""
        self._check_active(slot)
        del self.rows[slot]
        self.media_rows[slot] = False
        self.key_mask[slot] = False
        self.key_mask[slot, 0] = True
        self.write_pos[slot] = 0
        self.position[slot, 0] = 0
        self.tokens[slot, 0] = 0
