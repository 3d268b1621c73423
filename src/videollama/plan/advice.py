"""What ``videollama plan`` says beside its numbers: notes on how a run is counted, and, when it does
not fit, each change that would help, re-planned."""

from __future__ import annotations

from videollama.config import VideoLlamaConfig
from videollama.model.parts import BLOCK_TYPES
from videollama.plan.estimate import estimate, max_micro_batch
from videollama.plan.report import format_bytes
from videollama.plan.settings import LORA_R, usable_bytes, with_settings


def notes_for(config: VideoLlamaConfig, s) -> list[str]:
    notes = []
    master = ", the master weights; bf16 copies are gathered per block" if s.precision == "bf16" else ""
    if s.lora:
        quant = ("; the base linear weights in NF4 (0.516 B per weight: 4 bits and a double-quantized absmax "
                 "per 64), the rest in " + s.precision) if s.mode == "qlora" else ""
        notes.append(f"LoRA r={s.lora_r} on {', '.join(s.lora_targets)} in {', '.join(s.lora_parts)} "
                     f"(train.lora.target_modules' selection): every base weight frozen, gradients and AdamW "
                     f"state for the adapters only{quant}")
        if s.mode == "qlora":
            notes.append("qlora: one GPU, one process, no FSDP (train/loop.py); the loop itself keeps the "
                         "non-quantized weights in fp32 (plan with --precision fp32 for that)")
        if set(s.lora_parts) & {"vision", "temporal", "resampler"}:
            notes.append("adapters on the vision side: its blocks' activations are full training's plus the "
                         "adapters' (an upper bound)")
    if s.mode == "qlora":
        pass
    elif s.mode != "infer" and s.fsdp and s.gpus == 1:
        notes.append(f"one device, bf16: the training loop computes in bf16 through FSDP2 on one rank (fp32 "
                     f"parameters{master})")
    elif s.mode != "infer" and s.fsdp and s.shard < s.gpus:
        notes.append(f"FSDP2 hybrid sharding: sharded over the {s.shard} GPUs of a node, replicated across "
                     f"{s.gpus // s.shard} nodes: parameters (fp32{master}), gradients and optimizer state are "
                     f"1/{s.shard} each")
    elif s.mode != "infer" and s.fsdp:
        notes.append(f"FSDP2 full sharding over {s.gpus} devices: parameters (fp32{master}), gradients and "
                     f"optimizer state are 1/{s.gpus} each")
    elif s.mode != "infer":
        notes.append("one device, fp32: the training loop runs without FSDP")
    if s.mode != "infer" and s.accumulation > 1:
        across = ", all-reduced across nodes on the last" if s.shard < s.gpus else ""
        notes.append(f"{s.accumulation} micro-batches per step: the gradient accumulates in fp32"
                     + (f" shards (reduce-scattered every micro-batch{across})" if s.fsdp and s.gpus > 1 else ""))
    if s.mode == "infer" and s.gpus > 1:
        notes.append(f"inference: each of the {s.gpus} devices holds a whole replica; the numbers are per device")
    if s.freeze and not s.lora:
        notes.append(f"frozen {', '.join(s.freeze)}: no gradients or optimizer state for them, and no activations "
                     "where no gradient flows (a frozen prefix); a frozen block with trainable blocks before it "
                     "is counted in full (an upper bound)")
    if config.preprocess.size != config.vision.image_size:
        notes.append(f"frames are {config.vision.image_size}x{config.vision.image_size} (vision.image_size)")
    return notes


def suggestions_for(config: VideoLlamaConfig, s, est) -> list[str]:
    """What alone would make it fit, each re-planned; LoRA/QLoRA and quantized weights as text only."""
    usable = usable_bytes(s)
    out = []

    fitting = []

    def verdict(s2) -> tuple[bool, str]:
        peak = estimate(config, s2).peak
        return peak <= usable, f"{format_bytes(peak)} per device" + ("" if peak <= usable else ", still too much")

    def suggest(text: str, s2) -> None:
        ok, what = verdict(s2)
        fitting.append(ok)
        out.append(f"{text}: {what}")

    if s.mode != "infer" and set(s.checkpointing) != set(BLOCK_TYPES):
        suggest("activation checkpointing on every block (--activation-checkpointing)",
                with_settings(s, checkpointing=BLOCK_TYPES))
    if s.precision == "fp32":
        suggest("bf16 (--precision bf16" + (", mixed precision through FSDP)" if s.mode != "infer" else ")"),
                with_settings(s, precision="bf16"))
    if s.mode in ("train", "lora"):
        n = _more_gpus(config, s, usable)
        if n:
            suggest(f"more GPUs: {n} (--gpus {n}) with FSDP full sharding", with_settings(s, gpus=n))
        else:
            out.append("more GPUs: not even 4096 with FSDP full sharding (activations are per device)")
    b = max_micro_batch(config, s)
    what = "micro-batch" if s.mode != "infer" else "batch"
    if 0 < b < s.micro_batch:
        keep = " (keep the global batch with more gradient accumulation steps)" if s.mode != "infer" else ""
        suggest(f"a smaller {what}: {b} (--micro-batch {b}){keep}", with_settings(s, micro_batch=b))
    elif b == 0:
        out.append(f"a smaller {what}: even 1 does not fit")
    frames = next((f for f in range(s.frames - 1, 0, -1) if verdict(with_settings(s, frames=f))[0]), 0)
    if frames:
        suggest(f"fewer frames: {frames} (--frames {frames})", with_settings(s, frames=frames))
    tokens = _largest(lambda t: verdict(with_settings(s, tokens=t))[0], 2 if s.mode != "infer" else 1, s.tokens - 1)
    if tokens:
        suggest(f"shorter text: {tokens} tokens (--seq {tokens})", with_settings(s, tokens=tokens))
    if s.whole_video:
        windows = _largest(lambda w: verdict(with_settings(s, windows=w))[0], 1, s.windows - 1)
        if windows:
            suggest(f"fewer windows: {windows} (preprocess.max_windows {windows}: the video spread over them)",
                    with_settings(s, windows=windows))
    if s.mode in ("train", "lora") and not any(fitting):   # no single change is enough: several together
        for batch in sorted({s.micro_batch, 1}, reverse=True):
            both = with_settings(s, checkpointing=BLOCK_TYPES, precision="bf16", micro_batch=batch)
            n = s.gpus if verdict(both)[0] else _more_gpus(config, both, usable)
            if n:
                also = f", micro-batch {batch}" if batch != s.micro_batch else ""
                suggest(f"together: checkpointing on every block, bf16, {n} GPU(s){also}", with_settings(both, gpus=n))
                break
    if s.mode == "train" and not s.freeze:
        lora = with_settings(s, mode="lora", lora_r=LORA_R, lora_targets=tuple(_lora_defaults().target_modules),
                     lora_parts=tuple(_lora_defaults().parts))
        suggest(f"LoRA (--mode lora, r={LORA_R}, or a recipe's lora: section): frozen base, adapters trained", lora)
        if s.gpus == 1:
            suggest("QLoRA (--mode qlora: base linear weights in NF4, lora.quantize nf4)", with_settings(lora, mode="qlora"))
    elif s.mode == "lora" and s.gpus == 1:
        suggest("QLoRA (--mode qlora: base linear weights in NF4, lora.quantize nf4)", with_settings(s, mode="qlora"))
    if s.mode == "infer":
        out += _quantized_weights(s, est, usable)
    return out


def _quantized_weights(s, est, usable: int) -> list[str]:
    """int8 and int4 weights (``--quantize`` of generate, eval and serve), by arithmetic: the
    parameters at 1 or 0.5 bytes each in place of the precision's, the rest of the peak unchanged
    (an upper bound on what is saved: norms and scales stay in floating point)."""
    params = est.at_peak["parameters"]
    per_param = 2 if s.precision == "bf16" else 4
    lines = []
    for flag, size, where in (("int8", 1.0, "any device"), ("int4", 0.5, "a CUDA GPU, bf16 model")):
        peak = est.peak - params + int(params * size / per_param)
        verdict = "" if peak <= usable else ", still too much"
        lines.append(f"{flag} weights (--quantize {flag} of generate, eval and serve; {where}): parameters "
                     f"{format_bytes(params)} -> about {format_bytes(int(params * size / per_param))}, "
                     f"about {format_bytes(peak)} per device{verdict}")
    return lines


def _lora_defaults():
    from videollama.train.recipe import LoraSection

    return LoraSection()


def _more_gpus(config, s, usable: int) -> int:
    """The fewest devices (powers of two above s.gpus, up to 4096) that fit; 0 if none does."""
    n = s.gpus * 2
    while n <= 4096 and estimate(config, with_settings(s, gpus=n)).peak > usable:
        n *= 2
    return n if n <= 4096 else 0


def _largest(ok, lo: int, hi: int) -> int:
    """The largest x in [lo, hi] with ok(x), for ok monotone (True then False); 0 if none."""
    if hi < lo or not ok(lo):
        return 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo
