"""Parameters for the memory planner, counted on meta-device models: every parameter by part and
stage, the adapters LoRA adds (train.lora's own selection), and the bytes of a base in
bitsandbytes NF4 (the module docstring of estimate.py gives the byte figures)."""

from __future__ import annotations

import functools
import json

from videollama.config import VideoLlamaConfig
from videollama.model.parts import part_of
from videollama.plan.activations import F32
from videollama.plan.settings import Settings

NF4_BLOCK, NF4_BLOCK2 = 64, 256   # bitsandbytes: values per absmax block; absmax values per second-level block
NF4_TENSOR = 4 + 16 * 4           # per tensor: the fp32 offset of the absmax, the fp32 NF4 code


# ---- parameters, from a meta-device model -----------------------------------------------------------


def stage_of(name: str) -> str:
    """The stage (activations.Stage.name) whose forward uses parameter ``name``."""
    for prefix, stage in (("vision.encoder.layers.", "vision"), ("vision.temporal.", "temporal"),
                          ("decoder.layers.", "decoder"), ("decoder.cross_attn_layers.", "cross_attn")):
        if name.startswith(prefix):
            return f"{stage}.{name[len(prefix):].split('.')[0]}"
    if name.startswith("resampler."):
        return "resampler"
    if name.startswith("vision.post_layernorm."):
        return "vision.post_layernorm"
    if name.startswith("vision."):
        return "vision.embed"
    if name.startswith("decoder.media_time."):   # stamps the latents the first cross-attention block reads
        return "cross_attn.0"
    return {"decoder.embed_tokens.weight": "decoder.embed", "decoder.norm.weight": "decoder.norm",
            "lm_head.weight": "loss"}[name]


@functools.lru_cache(maxsize=16)
def _param_table(config_json: str) -> tuple[tuple[str, str, int], ...]:
    import torch

    from videollama.model.videollama import VideoLlama

    with torch.device("meta"):
        model = VideoLlama(VideoLlamaConfig.from_dict(json.loads(config_json)))
    return tuple((name, part_of(name), p.numel()) for name, p in model.named_parameters())


def param_table(config: VideoLlamaConfig) -> tuple[tuple[str, str, int], ...]:
    """(name, part, numel) of every parameter (tied ones once), from a meta-device model."""
    return _param_table(json.dumps(config.to_dict(), sort_keys=True))


@functools.lru_cache(maxsize=16)
def _lora_table(config_json: str, r: int, targets: tuple, parts: tuple) -> tuple[tuple[str, str, int], ...]:
    import torch
    import torch.nn as nn

    from videollama.model.videollama import VideoLlama
    from videollama.train.lora import target_modules
    from videollama.train.recipe import LoraSection

    with torch.device("meta"):
        model = VideoLlama(VideoLlamaConfig.from_dict(json.loads(config_json)))
    out = []
    for name in target_modules(model, LoraSection(r=r, target_modules=list(targets), parts=list(parts))):
        m = model.get_submodule(name)
        k = m.num_embeddings + m.embedding_dim if isinstance(m, nn.Embedding) else m.in_features + m.out_features
        out.append((name, stage_of(name + ".weight"), r * k))
    return tuple(out)


def lora_table(config: VideoLlamaConfig, s: Settings) -> tuple[tuple[str, str, int], ...]:
    """(module name, stage, adapter elements) of every layer LoRA adapts under ``s``: the selection
    is train.lora.target_modules' own, on a meta-device model; A [r, in] and B [out, r] per linear
    (an embedding: A [r, num_embeddings], B [dim, r])."""
    return _lora_table(json.dumps(config.to_dict(), sort_keys=True), s.lora_r, s.lora_targets, s.lora_parts)


@functools.lru_cache(maxsize=16)
def _nf4_names(config_json: str) -> frozenset:
    import torch
    import torch.nn as nn

    from videollama.model.videollama import VideoLlama

    with torch.device("meta"):
        model = VideoLlama(VideoLlamaConfig.from_dict(json.loads(config_json)))
    return frozenset(f"{n}.weight" for n, m in model.named_modules() if type(m) is nn.Linear and n != "lm_head")


def nf4_bytes(numel: int) -> int:
    """Bytes of one weight tensor of ``numel`` values in bitsandbytes NF4 with double quantization."""
    blocks = -(-numel // NF4_BLOCK)
    return -(-numel // 2) + blocks + 4 * -(-blocks // NF4_BLOCK2) + NF4_TENSOR


def base_weight_bytes(config: VideoLlamaConfig, s: Settings) -> tuple[int, int]:
    """(bytes, of which in NF4) of the base (non-adapter) parameters on one device, unsharded:
    qlora: train.lora.quantize_nf4's linear weights in NF4, the rest in the run's precision; else fp32."""
    table = param_table(config)
    if s.mode != "qlora":
        return F32 * sum(k for _, _, k in table), 0
    act = F32 if s.precision == "fp32" else 2
    quantized = _nf4_names(json.dumps(config.to_dict(), sort_keys=True))
    nf4 = sum(nf4_bytes(k) for name, _, k in table if name in quantized)
    return nf4 + act * sum(k for name, _, k in table if name not in quantized), nf4
