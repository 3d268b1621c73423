"""Layers shared by the decoder and the cross-attention blocks: RMSNorm, SwiGLU, rotary positions,
and :func:`written`, a copy ``torch.compile`` keeps as a buffer.

They follow Hugging Face Llama's definitions (and parameter names) exactly, so imported Llama
weights compute what they computed there.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


@torch.library.custom_op("videollama::written", mutates_args=())
def written(x: torch.Tensor) -> torch.Tensor:
    """A copy of x that inductor cannot inline into the loops that read it, so that x is computed
    once rather than once per iteration of the consumer's reduction. Inductor's C++ backend
    otherwise inlines a pointwise producer into the reduction that consumes it: the RMSNorm that
    feeds an int8 product (a per-element rsqrt and divide) recomputed for every output row, or
    the rotary positions of a decode step's query (a pow, a cos and a sin per element)
    recomputed for every cached key (bench/results/int8_op.md). Eagerly: not needed, not used."""
    return x.clone()


@written.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class RMSNorm(nn.Module):
    """Llama RMSNorm, computed in float32 like HF whatever the parameter dtype."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


ROPE_TYPES = ("default", "linear", "llama3")


def rotary_inv_freq(head_dim: int, theta: float, *, rope_type: str = "default", factor: float = 1.0,
                    low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                    original_max_position_embeddings: int = 8192,
                    device: torch.device | None = None) -> torch.Tensor:
    """The rotary inverse frequencies [head_dim / 2], float32, as Hugging Face computes them.

    rope_type "default": theta^(-2i/d). "linear": divided by ``factor`` (position interpolation).
    "llama3" (Llama-3.1 and later): wavelengths longer than original_max_position_embeddings /
    low_freq_factor are divided by ``factor``, those shorter than .../ high_freq_factor are kept,
    and the band between is interpolated smoothly (transformers' _compute_llama3_parameters).
    """
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device,
                                             dtype=torch.int64).float() / head_dim))  # [hd/2]
    if rope_type == "linear":
        return inv_freq / factor
    if rope_type == "llama3":
        if not high_freq_factor > low_freq_factor:
            raise ValueError(f"rope_type llama3: high_freq_factor {high_freq_factor} must exceed "
                             f"low_freq_factor {low_freq_factor}")
        low_freq_wavelen = original_max_position_embeddings / low_freq_factor
        high_freq_wavelen = original_max_position_embeddings / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        old_len = original_max_position_embeddings
        smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    return inv_freq


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype, *,
                   rope_type: str = "default", factor: float = 1.0, low_freq_factor: float = 1.0,
                   high_freq_factor: float = 4.0, original_max_position_embeddings: int = 8192,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: [B, T] integer positions -> (cos, sin), each [B, 1, T, head_dim].

    Computed on the fly in float32 (a few hundred flops) rather than kept in a buffer, so the
    model has no buffers to lose on the meta device or under FSDP. The keyword arguments are the
    RoPE scaling of :func:`rotary_inv_freq` (DecoderConfig's rope_* fields).
    """
    inv_freq = rotary_inv_freq(head_dim, theta, rope_type=rope_type, factor=factor,
                               low_freq_factor=low_freq_factor, high_freq_factor=high_freq_factor,
                               original_max_position_embeddings=original_max_position_embeddings,
                               device=positions.device)
    freqs = positions.float()[..., None] * inv_freq  # [B, T, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [B, T, hd]: HF's rotate_half layout
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, hd]; cos/sin: [B, 1, T, hd]."""
    return x * cos + rotate_half(x) * sin


class SwiGLU(nn.Module):
    """Llama's feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
