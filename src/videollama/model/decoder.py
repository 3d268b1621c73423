"""The language decoder: Llama blocks with gated cross-attention to the visual latents.

Parameter names follow Hugging Face ``LlamaForCausalLM`` (``model.X`` there is ``decoder.X``
here), so importing Llama weights is a prefix rename. A gated cross-attention block
(``cross_attn_layers.{k}``) runs before decoder layers 0, every, 2*every, ...; its tanh gates
start at zero, so a fresh model is exactly the text-only language model.

Generation uses a static per-layer :class:`KVCache` (gpt-fast style): ``start`` says where the
current tokens go in the cache; the visual keys/values are projected once per video
(:meth:`Decoder.project_media`) and passed to every step. Training passes the latents
themselves, and each cross-attention block projects them inside its own forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from videollama.config import DecoderConfig
from videollama.model.layers import RMSNorm, SwiGLU, apply_rotary, rotary_cos_sin
from videollama.model.resampler import GatedCrossAttentionBlock


@dataclass
class KVCache:
    """Static keys/values of one attention layer: [B, kv_heads, max_len, head_dim] each."""

    k: torch.Tensor
    v: torch.Tensor

    def update(self, start: int | torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v [B, kv_heads, T, hd] at positions start..start+T; return everything so far.

        ``start`` may also be a tensor [B] of per-row write positions (one new token, T == 1):
        the static-shape decode step. Each row's k/v is scattered at its own position and the
        whole cache [B, kv_heads, max_len, hd] is returned, so shapes never change from step to
        step (``torch.compile`` compiles the step once); the key mask hides unwritten slots.
        """
        if isinstance(start, torch.Tensor):
            if k.shape[2] != 1:
                raise ValueError(f"per-row cache writes take one token per row, got {k.shape[2]}")
            # k[b, h, 0] -> cache[b, h, start[b]]: index_put_ rather than scatter_, because
            # inductor re-inplaces index_put on a graph input, while a scatter_ became a copy of
            # the whole cache (and a copy back) every compiled step.
            rows = torch.arange(k.shape[0], device=k.device)[:, None]  # [B, 1]
            heads = torch.arange(k.shape[1], device=k.device)[None, :]  # [1, KV]
            index = (rows, heads, start[:, None])  # broadcast to [B, KV]
            self.k.index_put_(index, k[:, :, 0])
            self.v.index_put_(index, v[:, :, 0])
            return self.k, self.v
        end = start + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions; writing up to {end}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                mask: torch.Tensor | None = None, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        """x: [B, T, D]; mask: None (plain causal) or bool [B, 1, T, S] (True = may attend)."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, T, hd]
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)  # [B, KV, T, hd]
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(start, k, v)  # [B, KV, start+T, hd]
        if t == 1:
            out = one_query_attention(q, k, v, mask)  # [B, H, 1, hd]
            return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))
        if self.kv_heads != self.num_heads:
            # Each group of query heads shares one key/value head (HF's repeat_kv order).
            k = k.repeat_interleave(self.num_heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.num_heads // self.kv_heads, dim=1)
        # Without a mask: a fresh sequence is plainly causal; one new token sees all the past.
        is_causal = mask is None and t > 1
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


def one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd), masked) v for one query per row (a decode step), as SDPA computes it.

    q: [B, H, 1, hd]; k, v: [B, KV, S, hd] with H a multiple of KV (query heads h*G..h*G+G-1
    share key/value head h, HF's repeat_kv order, read in place rather than repeated); mask:
    bool [B, 1, 1, S] (True = may attend, at least one per row) or None. Returns [B, H, 1, hd].
    Two batched matmuls: on a CPU, SDPA's flash kernel with a [B, 1, 1, S] mask costs ~17x this
    at 8 rows (bench/results/serve.md).
    """
    b, h, _, hd = q.shape
    kv = k.shape[1]
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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                mask: torch.Tensor | None = None, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask=mask, cache=cache, start=start)
        return x + self.mlp(self.post_attention_layernorm(x))


def attention_mask_for(key_mask: torch.Tensor | None, t: int, start: int | torch.Tensor) -> torch.Tensor | None:
    """The boolean attention mask [B, 1, T, S] for T queries at positions start..start+T-1.

    key_mask: [B, S] with S = start + T, 1 for real tokens and 0 for (left) padding, or None.
    Returns None where plain causal attention is exact (no padding, and either a fresh
    sequence or one new token), so SDPA can take its fastest path.

    Static-shape decoding (``start`` a tensor [B] of per-row cache positions, T == 1): key_mask
    is then required, [B, max_len], True at every cache slot the new token may see (its
    row's real past tokens and itself); the mask is that, [B, 1, 1, max_len].
    """
    if isinstance(start, torch.Tensor):
        if key_mask is None or t != 1:
            raise ValueError("per-row cache positions need a [B, max_len] key_mask and one token per row")
        return key_mask.bool()[:, None, None, :]
    if key_mask is None and (start == 0 or t == 1):
        return None
    s = start + t
    device = key_mask.device if key_mask is not None else None
    q_pos = torch.arange(start, s, device=device)[:, None]  # [T, 1]
    k_pos = torch.arange(s, device=device)[None, :]  # [1, S]
    causal = k_pos <= q_pos  # [T, S]
    if key_mask is None:
        return causal[None, None]
    # A padding query would see no key at all (SDPA then gives NaN); let it see itself. Its
    # output is never used, but NaNs must not exist anywhere.
    allowed = causal & (key_mask.bool()[:, None, :] | (k_pos == q_pos))  # [B, T, S]
    return allowed[:, None]


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

    def forward(self, input_ids: torch.Tensor, *, positions: torch.Tensor,
                key_mask: torch.Tensor | None = None,
                media: torch.Tensor | list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                kv_caches: list[KVCache] | None = None, start: int | torch.Tensor = 0,
                media_index: torch.Tensor | None = None,
                media_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states [B, T, D] (after the final norm).

        input_ids, positions: [B, T]; key_mask: [B, start+T] (1 = real token) or None;
        media: the visual latents [B, L, D_v], or their per-block (k, v) from :meth:`project_media`,
        or None for text only (cross-attention skipped); media_index: [B] or None, which video of
        media [V, ...] each row reads (several text rows about one clip share its latents);
        kv_caches / start: generation's caches and where these tokens go in them (``start`` an
        int, or a tensor [B] of per-row positions for one token per row, see :meth:`KVCache.update`);
        media_rows: bool [B] or None: with media, only rows marked True read it, and every other
        row passes each cross-attention block unchanged, exactly as with ``media=None``
        (continuous batching mixes rows with and without a video in one step).
        """
        x = self.embed_tokens(input_ids)  # [B, T, D]
        c = self.config
        cos, sin = rotary_cos_sin(positions, c.head_dim, c.rope_theta, x.dtype, rope_type=c.rope_type,
                                  factor=c.rope_factor, low_freq_factor=c.rope_low_freq_factor,
                                  high_freq_factor=c.rope_high_freq_factor,
                                  original_max_position_embeddings=c.rope_original_max_position_embeddings)
        mask = attention_mask_for(key_mask, input_ids.shape[1], start)
        every = self.config.cross_attn_every
        for i, layer in enumerate(self.layers):
            if media is not None and every > 0 and i % every == 0:
                k = i // every
                crossed = self.cross_attn_layers[k](x, media if isinstance(media, torch.Tensor) else media[k],
                                                    media_index=media_index)
                x = crossed if media_rows is None else torch.where(media_rows[:, None, None], crossed, x)
            cache = kv_caches[i] if kv_caches is not None else None
            x = layer(x, cos, sin, mask=mask, cache=cache, start=start)
        return self.norm(x)
