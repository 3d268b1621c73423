"""`videollama info`: parameters, training FLOPs and per-GPU memory of a preset.

Parameters are counted on a model built on the meta device (no memory is allocated), so the
13B preset is counted exactly, tensor by tensor, in a second. FLOPs are counted analytically
from the config (matmuls, convolutions and attention; 2 FLOPs per multiply-add), and a test
checks the formula against torch's FlopCounterMode on a real forward of the tiny model.
Attention is counted in full (not halved for the causal mask), as PaLM and torchtitan do for MFU.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

from videollama.config import VideoLlamaConfig
from videollama.model.parts import DECODER_SIDE, PARTS, VISION_SIDE, part_of

GiB = 2**30


def count_params(config: VideoLlamaConfig) -> dict[str, int]:
    """Parameters counted on a meta-device model (shared tensors counted once).

    ``vision`` and ``decoder``: the two sides (videollama.model.parts.VISION_SIDE / DECODER_SIDE);
    ``by_part``: per part of videollama.model.parts.PARTS.
    """
    import torch

    from videollama.model.videollama import VideoLlama

    with torch.device("meta"):
        model = VideoLlama(config)
    by_part = dict.fromkeys(PARTS, 0)
    for name, p in model.named_parameters():  # named_parameters de-duplicates tied weights
        by_part[part_of(name)] += p.numel()
    vision = sum(by_part[k] for k in VISION_SIDE)
    decoder = sum(by_part[k] for k in DECODER_SIDE)
    return {"vision": vision, "decoder": decoder, "total": vision + decoder, "by_part": by_part}


# ---- FLOPs ---------------------------------------------------------------------------------------


def _linear(rows: int, d_in: int, d_out: int) -> int:
    return 2 * rows * d_in * d_out


def _attention(q_rows: int, kv_rows: int, dim: int, batch: int = 1) -> int:
    """QK^T and AV for `batch` independent sequences: 2 matmuls of q x kv x dim."""
    return batch * 2 * (2 * q_rows * kv_rows * dim)


def forward_flops(config: VideoLlamaConfig, *, frames: int, tokens: int) -> dict[str, int]:
    """Forward FLOPs for one sample with `frames` video frames and `tokens` text tokens."""
    v, r, d = config.vision, config.resampler, config.decoder
    n = v.num_patches
    seq = n + 1                                       # CLS + patches per frame
    D = v.hidden_size

    vit = _linear(frames * n, v.num_channels * v.patch_size**2, D)          # patch embedding (conv)
    per_block = (4 * _linear(frames * seq, D, D)                            # q, k, v, out
                 + _attention(seq, seq, D, batch=frames)
                 + _linear(frames * seq, D, v.intermediate_size) + _linear(frames * seq, v.intermediate_size, D))
    vit += v.num_layers * per_block

    temporal = 0
    if v.temporal_every:
        n_temporal = v.num_layers // v.temporal_every
        temporal += n_temporal * (4 * _linear(frames * seq, D, D) + _attention(frames, frames, D, batch=seq))
    if v.frame_diff:
        temporal += _linear(frames * n, D, D)

    inner = r.num_heads * r.head_dim
    if r.num_latents:
        L = r.num_latents
        kv_rows = frames * seq + L
        resampler = r.depth * (_linear(L, D, inner) + 2 * _linear(kv_rows, D, inner)
                               + _attention(L, kv_rows, inner, batch=1) + _linear(L, inner, D)
                               + _linear(L, D, r.ff_mult * D) + _linear(L, r.ff_mult * D, D))
    else:  # no resampler: the decoder reads every frame token
        L, resampler = frames * seq, 0

    H = d.hidden_size
    kvd = d.kv_heads * d.head_dim
    block = (_linear(tokens, H, H) + 2 * _linear(tokens, H, kvd) + _linear(tokens, H, H)
             + _attention(tokens, tokens, H)
             + 3 * _linear(tokens, H, d.intermediate_size))
    llama = d.num_layers * block
    xheads = d.cross_attn_heads or d.num_heads
    xdim = xheads * d.head_dim
    n_cross = len(range(0, d.num_layers, d.cross_attn_every)) if d.cross_attn_every else 0
    cross = n_cross * (_linear(tokens, H, xdim) + 2 * _linear(L, D, xdim) + _attention(tokens, L, xdim)
                       + _linear(tokens, xdim, H)
                       + 3 * _linear(tokens, H, d.cross_attn_ff_mult * H))   # SwiGLU feed-forward
    head = _linear(tokens, H, d.vocab_size)
    out = {"vision": vit, "temporal": temporal, "resampler": resampler, "decoder": llama,
           "cross_attn": cross, "lm_head": head}
    out["total"] = sum(out.values())
    return out


def train_flops_per_sample(config: VideoLlamaConfig, *, frames: int | None = None, tokens: int | None = None) -> int:
    """Forward + backward FLOPs (3x forward) for one training sample, recipe input by default."""
    frames = frames or config.preprocess.num_frames
    tokens = tokens or config.decoder.max_seq_len
    return 3 * forward_flops(config, frames=frames, tokens=tokens)["total"]


# ---- memory ---------------------------------------------------------------------------------------


@dataclass
class MemoryEstimate:
    sharded_state_gib: float      # fp32 master params + fp32 grads + AdamW m, v: 16 B/param / world
    gathered_params_gib: float    # bf16 unsharded params of the two largest blocks (current + prefetch)
    activations_gib: float        # checkpointed block inputs (bf16) + one block's live activations
    total_gib: float


def fsdp_memory(config: VideoLlamaConfig, params: dict[str, int], *, world_size: int = 64,
                micro_batch: int = 1, frames: int | None = None, tokens: int | None = None) -> MemoryEstimate:
    """Per-GPU memory for FSDP full sharding with AdamW in mixed precision (bf16 compute).

    Assumes full activation checkpointing per block: only each block's input is kept, plus the
    live activations of the block being recomputed. An estimate, not a measurement.
    """
    v, d = config.vision, config.decoder
    frames = frames or config.preprocess.num_frames
    tokens = tokens or d.max_seq_len
    state = 16 * params["total"] / world_size
    D, H = v.hidden_size, d.hidden_size
    vit_block = 4 * D * D + 2 * D * v.intermediate_size
    dec_block = 2 * H * H + 2 * H * d.kv_heads * d.head_dim + 3 * H * d.intermediate_size
    gathered = 2 * 2 * max(vit_block, dec_block)
    seq_v = frames * (v.num_patches + 1)
    n_temporal = v.num_layers // v.temporal_every if v.temporal_every else 0
    block_inputs = 2 * micro_batch * (seq_v * D * (v.num_layers + n_temporal) + tokens * H * d.num_layers)
    # Live activations of one recomputed block: about 16 hidden-sized bf16 tensors (attention via
    # flash/SDPA keeps no T x T matrix) plus fp32 logits for the loss.
    live = 2 * micro_batch * 16 * max(seq_v * D, tokens * H) + 4 * micro_batch * tokens * d.vocab_size
    act = block_inputs + live
    return MemoryEstimate(state / GiB, gathered / GiB, act / GiB, (state + gathered + act) / GiB)


def info(preset_or_config: str | VideoLlamaConfig, *, world_size: int = 64) -> dict:
    cfg = (VideoLlamaConfig.from_name(preset_or_config) if isinstance(preset_or_config, str)
           else preset_or_config)
    params = count_params(cfg)
    frames, tokens = cfg.preprocess.num_frames, cfg.decoder.max_seq_len
    fwd = forward_flops(cfg, frames=frames, tokens=tokens)
    mem = fsdp_memory(cfg, params, world_size=world_size)
    return {
        "preset": cfg.name,
        "params": params,
        "input": {"frames": frames, "fps": cfg.preprocess.fps, "size": cfg.preprocess.size, "tokens": tokens},
        "flops": {"train_per_sample": 3 * fwd["total"], "forward_per_sample": fwd["total"],
                  "forward_by_part": {k: v for k, v in fwd.items() if k != "total"}},
        "memory_per_gpu_gib": {"world_size": world_size, "strategy": "FSDP full shard, AdamW, bf16 mixed precision, "
                               "full activation checkpointing, micro-batch 1", **mem.__dict__},
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="videollama-13b", help="preset name (see config.py)")
    parser.add_argument("--world-size", type=int, default=64, help="GPUs for the FSDP memory estimate")
    parser.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    out = info(args.preset, world_size=args.world_size)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    p, f, m = out["params"], out["flops"], out["memory_per_gpu_gib"]
    print(f"preset {out['preset']}")
    b = p["by_part"]
    print(f"  parameters  vision side {_count(p['vision'])}  (ViT {_count(b['vision'])}, temporal "
          f"{_count(b['temporal'])}, resampler {_count(b['resampler'])})")
    print(f"              decoder side {_count(p['decoder'])}  (Llama blocks {_count(b['decoder'])}, "
          f"cross-attn {_count(b['cross_attn'])}, embeddings {_count(b['embeddings'])})")
    print(f"              total {_count(p['total'])}")
    i = out["input"]
    print(f"  training FLOPs per sample ({i['frames']} frames at {i['fps']} FPS, {i['size']}px, {i['tokens']} "
          f"tokens): {f['train_per_sample'] / 1e12:.1f} TFLOP")
    print(f"  memory per GPU, {m['strategy']}, {m['world_size']} GPUs: {m['total_gib']:.1f} GiB "
          f"(state {m['sharded_state_gib']:.1f}, gathered params {m['gathered_params_gib']:.1f}, "
          f"activations {m['activations_gib']:.1f})")
    return 0


def _count(n: int) -> str:
    """A parameter count in the unit that reads best: 12.933 B, 32.3 M, 730 K."""
    if n >= 1e9:
        return f"{n / 1e9:.3f} B"
    if n >= 1e6:
        return f"{n / 1e6:.1f} M"
    return f"{n / 1e3:.0f} K" if n >= 1e3 else str(n)
