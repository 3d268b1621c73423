"""The language decoder: Llama blocks with gated cross-attention to the visual latents.

Parameter names follow Hugging Face ``LlamaForCausalLM`` (``model.X`` there is ``decoder.X``
here), so importing Llama weights is a prefix rename. A gated cross-attention block
(``cross_attn_layers.{k}``) runs before decoder layers 0, every, 2*every, ...; its tanh gates
start at zero, so a fresh model is exactly the text-only language model.

What the cross-attention blocks read is one :class:`Media`: the visual latents (training: each
block projects them inside its own forward) or every block's keys/values of them, projected once
per video (:meth:`Decoder.project_media`, generation), with which rows read which video.
Generation uses a static per-layer :class:`KVCache` (gpt-fast style): a tensor of per-row cache
slots says where the current tokens go, and a decode step reads the whole cache through its key
mask, so its shapes never change from step to step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from videollama.config import DecoderConfig
from videollama.model.layers import RMSNorm, SwiGLU, apply_rotary, rotary_cos_sin, written
from videollama.model.resampler import GatedCrossAttentionBlock, MediaTime


@dataclass
class KVCache:
    """Static keys/values of one attention layer: [B, kv_heads, max_len, head_dim] each."""

    k: torch.Tensor
    v: torch.Tensor

    def update(self, slots: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v [B, kv_heads, T, hd] at the cache slots slots [B, T] (long) of each row;
        return the whole cache, [B, kv_heads, max_len, hd] each.

        A prompt writes slots 0..T-1; a decode step one token per row at its own slot. The
        returned shapes never change from step to step (``torch.compile`` compiles the step
        once); the key mask hides the slots a row must not see.
        """
        # k[b, h, j] -> cache[b, h, slots[b, j]]: index_put_ rather than scatter_, because
        # inductor re-inplaces index_put on a graph input, while a scatter_ became a copy of the
        # whole cache (and a copy back) every compiled step.
        rows = torch.arange(k.shape[0], device=k.device)[:, None, None]  # [B, 1, 1]
        heads = torch.arange(k.shape[1], device=k.device)[None, :, None]  # [1, KV, 1]
        index = (rows, heads, slots[:, None, :])  # broadcast to [B, KV, T]
        self.k.index_put_(index, k)
        self.v.index_put_(index, v)
        return self.k, self.v


class LlamaAttention(nn.Module):
    """Causal grouped-query self-attention with rotary positions (HF names, no biases)."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        if config.hidden_size % config.num_heads or config.num_heads % config.kv_heads:
            raise ValueError(f"decoder hidden_size {config.hidden_size}, num_heads {config.num_heads} and "
                             f"num_kv_heads {config.kv_heads} do not divide evenly")
        self.num_heads, self.kv_heads, self.head_dim = config.num_heads, config.kv_heads, config.head_dim
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, mask: torch.Tensor | None = None,
                cache: KVCache | None = None, slots: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, T, D]; mask: None (plain causal) or bool [B, 1, T, S] (True = may attend), see
        :func:`attention_mask_for`; cache / slots [B, T]: generation's cache of this layer and
        the slot each token goes to. With a cache, the step reads the cache's slots
        0..S-1 (S: the mask's key length, else T): a fresh sequence its own T slots, a decode
        step (mask [B, 1, 1, max_len]) the whole cache."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, T, hd]
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)  # [B, KV, T, hd]
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            keys = mask.shape[-1] if mask is not None else t
            k, v = cache.update(slots, k, v)  # [B, KV, max_len, hd]
            k, v = k[:, :, :keys], v[:, :, :keys]  # [B, KV, S, hd]
        if t == 1:
            out = one_query_attention(q, k, v, mask)  # [B, H, 1, hd]
            return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))
        if self.kv_heads != self.num_heads:
            # Each group of query heads shares one key/value head (HF's repeat_kv order).
            k = k.repeat_interleave(self.num_heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.num_heads // self.kv_heads, dim=1)
        # Without a mask a fresh sequence is plainly causal.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


def one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd), masked) v for one query per row (a decode step), as SDPA computes it.

    q: [B, H, 1, hd]; k, v: [B, KV, S, hd] with H a multiple of KV (query heads h*G..h*G+G-1
    share key/value head h, HF's repeat_kv order, read in place rather than repeated); mask:
    bool [B, 1, 1, S] (True = may attend, at least one per row) or None. Returns [B, H, 1, hd].
    Two batched matmuls: SDPA's CPU flash kernel is many times slower with a [B, 1, 1, S] mask,
    the shape of every batched decode step.
    """
    b, h, _, hd = q.shape
    kv = k.shape[1]
    if torch.compiler.is_compiling():
        q = written(q)  # the query's rotary positions computed once, not once per cached key
    qg = q.reshape(b, kv, h // kv, hd)  # [B, KV, G, hd]: the G query heads of each key/value head
    scores = (qg @ k.transpose(-1, -2)) * hd ** -0.5  # [B, KV, G, S]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v).reshape(b, h, 1, hd)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, mask: torch.Tensor | None = None,
                cache: KVCache | None = None, slots: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask=mask, cache=cache, slots=slots)
        return x + self.mlp(self.post_attention_layernorm(x))


def attention_mask_for(key_mask: torch.Tensor | None, t: int) -> torch.Tensor | None:
    """The boolean attention mask [B, 1, T, S] of a step, or None where none is needed.

    T > 1 tokens are a fresh sequence (positions 0..T-1, S = T): key_mask [B, T] is 1 for real
    tokens and 0 for (left) padding, or None; None is returned without padding (plain causal:
    SDPA's fastest path). T == 1 is one token per row: key_mask [B, S] is True at every key it
    may see (a decode step: its row's real past tokens and itself, S = the cache's max_len), or
    None for a fresh sequence of one token.
    """
    if key_mask is None:
        return None
    if t == 1:
        return key_mask.bool()[:, None, None, :]
    if key_mask.shape[1] != t:
        raise ValueError(f"{t} tokens are a fresh sequence: key_mask must be [B, {t}], got {tuple(key_mask.shape)}")
    q_pos = torch.arange(t, device=key_mask.device)[:, None]  # [T, 1]
    k_pos = torch.arange(t, device=key_mask.device)[None, :]  # [1, S]
    causal = k_pos <= q_pos  # [T, S]
    # A padding query would see no key at all (SDPA then gives NaN); let it see itself. Its
    # output is never used, but NaNs must not exist anywhere.
    allowed = causal & (key_mask.bool()[:, None, :] | (k_pos == q_pos))  # [B, T, S]
    return allowed[:, None]


@dataclass
class Media:
    """The video context of a batch of B text rows, as the cross-attention blocks read it.

    Either ``latents`` [V, L, D_v] (each block projects them inside its own forward: training,
    where FSDP has that block's weights gathered) or ``kv``: per cross-attention block its (k, v),
    each [V, H, L, hd] (:meth:`Decoder.project_media`, once per video: generation). ``index``
    [B] long: row b reads video ``index[b]`` (None: row b reads video b, V == B; several text
    rows about one clip share its latents). ``rows`` bool [B]: only the rows marked True read a
    video, every other row passes each cross-attention block unchanged, exactly as with no media
    (continuous batching mixes rows with and without a video in one step); None: every row.
    ``key_mask`` bool [V, L]: True at each video's real latents, when videos of different lengths
    (numbers of windows) are padded to the longest; None: every latent is real.
    """

    latents: torch.Tensor | None = None
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    index: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    key_mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.latents is None) == (self.kv is None):
            raise ValueError("Media holds either the visual latents or their projected keys/values")

    @classmethod
    def from_latents(cls, latents: torch.Tensor, *, index: torch.Tensor | None = None,
                     key_mask: torch.Tensor | None = None) -> Media:
        """The latents [V, L, D_v] themselves, projected inside each block (training)."""
        return cls(latents=latents, index=index, key_mask=key_mask)

    @classmethod
    def projected(cls, decoder: Decoder, latents: torch.Tensor, *, index: torch.Tensor | None = None,
                  key_mask: torch.Tensor | None = None) -> Media:
        """Every cross-attention block's keys/values of latents [V, L, D_v], projected now, once."""
        return cls(kv=decoder.project_media(latents), index=index, key_mask=key_mask)

    def for_block(self, k: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """What cross-attention block ``k`` reads: the latents, or its own (k, v)."""
        return self.latents if self.latents is not None else self.kv[k]


class Decoder(nn.Module):
    """Llama decoder (embeddings, layers, final norm) with gated cross-attention blocks.

    Holds no lm_head: the composed model owns it (HF keeps it outside ``model.`` too).
    """

    def __init__(self, config: DecoderConfig, *, media_dim: int) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_layers))
        every = config.cross_attn_every
        num_cross = len(range(0, config.num_layers, every)) if every > 0 else 0
        self.cross_attn_layers = nn.ModuleList(
            GatedCrossAttentionBlock(dim=config.hidden_size, media_dim=media_dim,
                                     num_heads=config.cross_attn_heads or config.num_heads,
                                     ff_mult=config.cross_attn_ff_mult, eps=config.rms_norm_eps,
                                     gate_init=config.cross_attn_gate_init)
            for _ in range(num_cross))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # Absolute time on every visual latent (zero at first: a model without it is unchanged).
        self.media_time = MediaTime(media_dim, config.media_time_periods)

    def project_media(self, latents: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """latents: [B, L, D_v] -> per cross-attention block, its (k, v), each [B, H, L, hd].

        Done once per video: during generation every step reuses them.
        """
        return [block.project_media(latents) for block in self.cross_attn_layers]

    def new_kv_cache(self, batch: int, max_len: int, *, device: torch.device | None = None,
                     dtype: torch.dtype | None = None) -> list[KVCache]:
        """Empty static caches, one per layer, for sequences of up to max_len tokens."""
        c = self.config
        device = device or self.embed_tokens.weight.device
        dtype = dtype or self.embed_tokens.weight.dtype
        shape = (batch, c.kv_heads, max_len, c.head_dim)
        return [KVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
                for _ in self.layers]

    def forward(self, input_ids: torch.Tensor, *, positions: torch.Tensor, key_mask: torch.Tensor | None = None,
                media: Media | None = None, kv_caches: list[KVCache] | None = None,
                write_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states [B, T, D] (after the final norm).

        input_ids, positions: [B, T]; key_mask: see :func:`attention_mask_for` ([B, T] for a
        fresh sequence, [B, S] for one new token per row), or None; media: what the
        cross-attention blocks read, or None for text only (every block skipped); kv_caches /
        write_pos [B] long: generation's caches and each row's first slot in them (zeros for a
        prompt: its T tokens fill slots 0..T-1), see :meth:`KVCache.update`.
        """
        x = self.embed_tokens(input_ids)  # [B, T, D]
        c = self.config
        cos, sin = rotary_cos_sin(positions, c.head_dim, c.rope_theta, x.dtype, rope_type=c.rope_type,
                                  factor=c.rope_factor, low_freq_factor=c.rope_low_freq_factor,
                                  high_freq_factor=c.rope_high_freq_factor,
                                  original_max_position_embeddings=c.rope_original_max_position_embeddings)
        t = input_ids.shape[1]
        mask = attention_mask_for(key_mask, t)
        slots = None
        if kv_caches is not None:  # token j of row b goes to cache slot write_pos[b] + j
            slots = write_pos[:, None] + torch.arange(t, device=write_pos.device)  # [B, T]
        every = self.config.cross_attn_every
        for i, layer in enumerate(self.layers):
            if media is not None and every > 0 and i % every == 0:
                k = i // every
                crossed = self.cross_attn_layers[k](x, media.for_block(k), media_index=media.index,
                                                    key_mask=media.key_mask)
                x = crossed if media.rows is None else torch.where(media.rows[:, None, None], crossed, x)
            cache = kv_caches[i] if kv_caches is not None else None
            x = layer(x, cos, sin, mask=mask, cache=cache, slots=slots)
        return self.norm(x)
