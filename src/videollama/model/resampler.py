"""From frame features to a few visual latents, and from latents into the decoder.

:class:`PerceiverResampler` (OpenFlamingo style) turns ``F x (1+N)`` ViT tokens into a fixed,
small set of latents; a learned time embedding added to each frame's tokens lets the latents
keep track of when things happen. :class:`GatedCrossAttentionBlock` lets the decoder's hidden
states read those latents through tanh gates that start at zero, so a fresh model is exactly
the text-only language model. Video never enters the token sequence: a 2,048-token prompt
attends to 64 latents, which is what keeps cross-modal attention cheap at inference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from videollama.config import ResamplerConfig
from videollama.model.layers import RMSNorm, SwiGLU


class PerceiverAttention(nn.Module):
    """Latents attend to concat(media tokens, latents)."""

    def __init__(self, *, dim: int, num_heads: int, head_dim: int) -> None:
        super().__init__()
        inner = num_heads * head_dim
        self.num_heads = num_heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """media: [B, M, D]; latents: [B, L, D] -> [B, L, D]."""
        media, latents = self.norm_media(media), self.norm_latents(latents)
        q = self.to_q(latents)  # [B, L, inner]
        # Latents also attend to themselves, so they can coordinate what each one keeps.
        k, v = self.to_kv(torch.cat([media, latents], dim=1)).chunk(2, dim=-1)  # [B, M+L, inner] each
        q, k, v = (rearrange(t, "b s (h d) -> b h s d", h=self.num_heads) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(rearrange(out, "b h s d -> b s (h d)"))


class PerceiverFeedForward(nn.Module):
    def __init__(self, *, dim: int, mult: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mult * dim, bias=False)
        self.fc2 = nn.Linear(mult * dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class PerceiverLayer(nn.Module):
    def __init__(self, config: ResamplerConfig, dim: int) -> None:
        super().__init__()
        self.attn = PerceiverAttention(dim=dim, num_heads=config.num_heads, head_dim=config.head_dim)
        self.ff = PerceiverFeedForward(dim=dim, mult=config.ff_mult)


class PerceiverResampler(nn.Module):
    """[B, F, N, D_v] frame tokens -> [B, num_latents, D_v] visual latents.

    ``num_latents: 0`` turns resampling off: the "latents" are then the frame tokens themselves,
    [B, F*N, D_v], each with its frame's time embedding. For a small input (the Shapes model's
    4 x 65 tokens) that costs little, and the decoder's cross-attention can pick out one object's
    tokens by what it asks about ("the red square") instead of depending on learned latent
    queries to have kept every object apart (bench/results/demo.md measures the difference).
    """

    def __init__(self, config: ResamplerConfig, *, dim: int, max_frames: int) -> None:
        super().__init__()
        self.resample = config.num_latents > 0
        # Small random (not zero) init: latents must tell frames apart from the first step.
        self.time_embedding = nn.Parameter(torch.empty(max_frames, dim))
        self.latents = nn.Parameter(torch.empty(config.num_latents, dim)) if self.resample else None
        self.layers = nn.ModuleList(PerceiverLayer(config, dim) for _ in range(config.depth if self.resample else 0))
        self.norm = nn.LayerNorm(dim) if self.resample else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """This module's own parameters (the layers inside follow VideoLlama.init_weights' rule)."""
        nn.init.normal_(self.time_embedding, std=0.02)
        if self.latents is not None:
            nn.init.normal_(self.latents, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, F, N, D_v] -> [B, L, D_v] (L = num_latents, or F*N without resampling)."""
        b, f = x.shape[:2]
        x = x + self.time_embedding[:f, None, :]  # the same time code on every token of a frame
        media = rearrange(x, "b f n d -> b (f n) d")  # [B, F*N, D]
        if self.latents is None:
            return media
        latents = self.latents.expand(b, -1, -1)  # [B, L, D]
        for layer in self.layers:
            latents = latents + layer.attn(media, latents)
            latents = latents + layer.ff(latents)
        return self.norm(latents)


class CrossAttention(nn.Module):
    """Text hidden states (queries) attend to visual latents (keys/values from D_v)."""

    def __init__(self, *, dim: int, media_dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"decoder hidden_size {dim} is not divisible by cross-attention heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(media_dim, dim, bias=False)
        self.v_proj = nn.Linear(media_dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def project_media(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latents: [B, L, D_v] -> (k, v), each [B, H, L, hd]."""
        k = rearrange(self.k_proj(latents), "b l (h d) -> b h l d", h=self.num_heads)
        v = rearrange(self.v_proj(latents), "b l (h d) -> b h l d", h=self.num_heads)
        return k, v

    def forward(self, x: torch.Tensor, media_kv: tuple[torch.Tensor, torch.Tensor],
                media_index: torch.Tensor | None = None, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, T, D] -> [B, T, D]. Every text position sees every latent of its video.

        media_kv: (k, v), each [B, H, L, hd]; or [V, H, L, hd] with ``media_index`` [B] saying
        which video row b reads. Since no text position attends to another here, the rows of
        one video are laid end to end as one query sequence against that video's keys: the
        keys and values are never copied per row (for a clip with ten questions and hundreds of
        latents, the copies cost more than the attention). key_mask: bool [B or V, L], True at
        the real latents of a video whose windows are padded to the batch's longest (None: all real).
        """
        mask = key_mask[:, None, None, :] if key_mask is not None else None  # [V, 1, 1, L]
        if media_index is None:
            q = rearrange(self.q_proj(x), "b t (h d) -> b h t d", h=self.num_heads)
            out = F.scaled_dot_product_attention(q, *media_kv, attn_mask=mask)  # [B, H, T, hd]
            return self.o_proj(rearrange(out, "b h t d -> b t (h d)"))
        b, t, _ = x.shape
        videos = media_kv[0].shape[0]
        # slot[r]: how many earlier rows read the same video (rows of a video fill slots 0, 1, ...).
        one_hot = F.one_hot(media_index, videos)  # [B, V]
        slot = (one_hot.cumsum(0) - 1).gather(1, media_index[:, None]).squeeze(1)  # [B]
        per_video = int(one_hot.sum(0).max())
        grouped = x.new_zeros(videos, per_video, t, x.shape[-1])
        grouped[media_index, slot] = x  # [V, S, T, D]; empty slots stay zero and are dropped below
        q = rearrange(self.q_proj(grouped), "v s t (h d) -> v h (s t) d", h=self.num_heads)
        out = F.scaled_dot_product_attention(q, *media_kv, attn_mask=mask)  # [V, H, S*T, hd]
        out = rearrange(out, "v h (s t) d -> v s t (h d)", t=t)[media_index, slot]  # [B, T, H*hd]
        return self.o_proj(out)


class MediaTime(nn.Module):
    """Stamps visual latents with their absolute time: latents + W [sin(2 pi t / P), cos(2 pi t / P)]_P.

    ``t`` is seconds from the start of the video, per group of latents (a frame's tokens, or a
    window's resampled latents). Not a table indexed by window number: every time has a code,
    and with periods 1, 10, 100, 1000 s each decimal digit of t is one phase pair, so a time never
    seen in training reads as the digits it has. W starts at zero, so a fresh (or loaded older)
    model computes exactly what it computed without it, as the tanh gates do.
    """

    def __init__(self, dim: int, periods: tuple[float, ...]) -> None:
        super().__init__()
        # A plain tuple, not a buffer: a meta-device build allocated with to_empty must not lose it.
        self.frequencies = tuple(2 * math.pi / p for p in periods)
        self.proj = nn.Linear(2 * len(periods), dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.proj.weight)

    def forward(self, latents: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        """latents: [W, L, D]; times: [W, G] seconds with L a multiple of G (group g is latents
        g*L/G .. (g+1)*L/G - 1) -> [W, L, D]."""
        w, length, d = latents.shape
        groups = times.shape[1]
        if times.shape[0] != w or length % groups:
            raise ValueError(f"times {tuple(times.shape)} do not group latents {tuple(latents.shape)}")
        # float64 phases: 2 pi t / 1 s at t = 3600 s keeps its fractional part exact to 1e-12.
        frequencies = torch.tensor(self.frequencies, dtype=torch.float64, device=times.device)
        phase = times.to(torch.float64)[..., None] * frequencies  # [W, G, P]
        features = torch.cat([phase.sin(), phase.cos()], dim=-1).to(latents.dtype)  # [W, G, 2P]
        code = self.proj(features)  # [W, G, D]
        return (latents.view(w, groups, length // groups, d) + code[:, :, None, :]).view(w, length, d)


class GatedCrossAttentionBlock(nn.Module):
    """x = x + tanh(attn_gate) * attn(RMSNorm(x), latents); x = x + tanh(ff_gate) * ff(RMSNorm(x))."""

    def __init__(self, *, dim: int, media_dim: int, num_heads: int, ff_mult: int, eps: float,
                 gate_init: float = 0.0) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(dim, eps)
        self.attn = CrossAttention(dim=dim, media_dim=media_dim, num_heads=num_heads)
        self.ff_norm = RMSNorm(dim, eps)
        self.ff = SwiGLU(dim, ff_mult * dim)
        # Shape [1] rather than [] so that FSDP can shard it along dim 0 like every other tensor.
        self.gate_init = float(gate_init)
        self.attn_gate = nn.Parameter(torch.empty(1))
        self.ff_gate = nn.Parameter(torch.empty(1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The gates (the norms and projections inside have their own rules)."""
        nn.init.constant_(self.attn_gate, self.gate_init)
        nn.init.constant_(self.ff_gate, self.gate_init)

    def project_media(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latents [B, L, D_v] -> this block's (k, v); compute once per video, reuse every step."""
        return self.attn.project_media(latents)

    def forward(self, x: torch.Tensor, media: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                media_index: torch.Tensor | None = None, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, T, D] -> [B, T, D]. media: the latents [B, L, D_v] (training: projected here, inside
        this forward, where FSDP has the weights gathered) or their (k, v) from :meth:`project_media`
        (generation: projected once per video). media_index: [B], optional: row b reads video
        ``media_index[b]`` of latents [V, L, D_v], projected once per video and then gathered;
        key_mask: bool [V, L] or None, the real latents of each video (CrossAttention.forward)."""
        media_kv = self.project_media(media) if isinstance(media, torch.Tensor) else media
        x = x + torch.tanh(self.attn_gate) * self.attn(self.attn_norm(x), media_kv, media_index, key_mask)
        return x + torch.tanh(self.ff_gate) * self.ff(self.ff_norm(x))
