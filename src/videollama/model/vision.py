"""The video encoder: a CLIP ViT applied to every frame, plus gated temporal aggregation.

Parameter names follow Hugging Face ``CLIPVisionModel`` (``vision_model.X`` there is
``vision.X`` here), so pre-trained image weights load with a prefix rename. The parts we add
for time (``temporal.{j}.*``, ``temporal_embedding``, ``frame_diff.*``) are residual branches
multiplied by ``tanh(gate)`` with the gate initialised to zero: at load time the encoder
computes exactly, bit for bit, what the image ViT computes on each frame, and training opens
the gates only as far as time helps.

Frames are folded into the batch for the ViT blocks (``[(B F), N+1, D]``) and patches into the
batch for the temporal blocks (``[(B N+1), F, D]``), so there is no Python loop over frames.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from videollama.config import VisionConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    # The activation OpenAI's CLIP was trained with; HF calls it "quick_gelu".
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class VisionAttention(nn.Module):
    """Multi-head self-attention with biases, HF CLIP names (``q_proj`` .. ``out_proj``)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"vision hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [batch, seq, dim] -> [batch, seq, dim]; every token sees every token."""
        q, k, v = (rearrange(p(x), "b s (h d) -> b h s d", h=self.num_heads)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(rearrange(out, "b h s d -> b s (h d)"))


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        if act not in _ACTIVATIONS:
            raise ValueError(f"unknown vision hidden_act {act!r}; choose from {sorted(_ACTIVATIONS)}")
        self.act = _ACTIVATIONS[act]
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionEncoderLayer(nn.Module):
    """One pre-norm CLIP ViT block."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = VisionAttention(config.hidden_size, config.num_heads)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config.hidden_size, config.intermediate_size, config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionTransformerLayers(nn.Module):
    """Holds ``layers`` so that the names read ``encoder.layers.{i}`` as in HF CLIP."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(config) for _ in range(config.num_layers))


class VisionEmbeddings(nn.Module):
    """The parameters of HF ``CLIPVisionEmbeddings``; the encoder's forward uses them in order."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.class_embedding = nn.Parameter(torch.empty(d))
        self.patch_embedding = nn.Conv2d(config.num_channels, d, kernel_size=config.patch_size,
                                         stride=config.patch_size, bias=False)
        self.position_embedding = nn.Embedding(1 + config.num_patches, d)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.class_embedding, std=0.02)


class TemporalAttentionBlock(nn.Module):
    """Each spatial token attends to the same token in the other frames; gated residual."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = VisionAttention(config.hidden_size, config.num_heads)
        # Shape [1] rather than [] so that FSDP can shard it along dim 0 like every other tensor.
        self.gate_init = float(config.gate_init)
        self.gate = nn.Parameter(torch.empty(1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gate, self.gate_init)

    def forward(self, x: torch.Tensor, time_embedding: torch.Tensor) -> torch.Tensor:
        """x: [B, F, N+1, D]; time_embedding: [F, D] -> [B, F, N+1, D]."""
        b = x.shape[0]
        h = rearrange(x, "b f n d -> (b n) f d")  # [(B N+1), F, D]: one sequence over time per token
        # The time embedding lives inside the branch, so a closed gate leaves x untouched.
        h = self.self_attn(self.layer_norm(h + time_embedding))
        h = rearrange(h, "(b n) f d -> b f n d", b=b)
        return x + torch.tanh(self.gate) * h


class FrameDifference(nn.Module):
    """A gated projection of the change between consecutive frames' patch embeddings.

    Motion is what a single frame cannot show; the difference of patch embeddings hands it to
    the ViT before the first block, which the tiny model needs to learn directions at all.
    """

    def __init__(self, dim: int, *, gate_init: float = 0.0) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.gate_init = float(gate_init)
        self.gate = nn.Parameter(torch.empty(1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The gate (``proj`` follows VideoLlama.init_weights' rule for linear layers)."""
        nn.init.constant_(self.gate, self.gate_init)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """patches: [B, F, N, D] -> [B, F, N, D]. The first frame has no predecessor: zero difference."""
        diff = patches[:, 1:] - patches[:, :-1]  # [B, F-1, N, D]
        diff = F.pad(diff, (0, 0, 0, 0, 1, 0))  # [B, F, N, D]
        return patches + torch.tanh(self.gate) * self.proj(diff)


class VisionEncoder(nn.Module):
    """CLIP ViT per frame with gated temporal attention after every ``temporal_every``-th block."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        if config.image_size % config.patch_size:
            raise ValueError(f"image_size {config.image_size} is not a multiple of patch_size {config.patch_size}")
        self.config = config
        d = config.hidden_size
        self.embeddings = VisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(d, eps=config.layer_norm_eps)  # sic: HF's spelling
        self.encoder = VisionTransformerLayers(config)
        self.post_layernorm = nn.LayerNorm(d, eps=config.layer_norm_eps)

        every = config.temporal_every
        num_temporal = config.num_layers // every if every > 0 else 0
        self.temporal = nn.ModuleList(TemporalAttentionBlock(config) for _ in range(num_temporal))
        self.temporal_embedding = nn.Parameter(torch.empty(config.max_frames, d)) if num_temporal else None
        self.frame_diff = FrameDifference(d, gate_init=config.gate_init) if config.frame_diff else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The temporal position embedding (every block inside has its own rule)."""
        if self.temporal_embedding is not None:
            nn.init.normal_(self.temporal_embedding, std=0.02)

    def forward(self, video: torch.Tensor, *, apply_post_layernorm: bool = False) -> torch.Tensor:
        """video: [B, F, C, H, W] normalised pixels -> [B, F, 1+N, D], the last hidden state
        per frame (CLS first, then patches), before ``post_layernorm`` like HF's last_hidden_state.

        The composed model asks for ``apply_post_layernorm=True``: the norm then runs inside this
        forward, where FSDP has this module's parameters gathered.
        """
        b, f = video.shape[:2]
        frames = video.flatten(0, 1).to(self.embeddings.patch_embedding.weight.dtype)  # [(B F), C, H, W]
        patches = self.embeddings.patch_embedding(frames).flatten(2).transpose(1, 2)  # [(B F), N, D]
        if self.frame_diff is not None:
            patches = self.frame_diff(patches.unflatten(0, (b, f))).flatten(0, 1)
        cls = self.embeddings.class_embedding.expand(b * f, 1, -1)  # [(B F), 1, D]
        x = torch.cat([cls, patches], dim=1) + self.embeddings.position_embedding.weight  # [(B F), 1+N, D]
        x = self.pre_layrnorm(x)

        every, j = self.config.temporal_every, 0
        for i, layer in enumerate(self.encoder.layers):
            x = layer(x)
            if every > 0 and (i + 1) % every == 0:
                x = self.temporal[j](x.unflatten(0, (b, f)), self.temporal_embedding[:f]).flatten(0, 1)
                j += 1
        if apply_post_layernorm:
            x = self.post_layernorm(x)
        return x.unflatten(0, (b, f))
