"""The report of ``videollama plan``: the breakdown at the peak in sensible units, the fit and what
would make a run fit."""

from __future__ import annotations

LABELS = {"parameters": "parameters", "gradients": "gradients", "optimizer_state": "optimizer state",
          "gathered_parameters": "gathered parameters", "inputs": "inputs", "activations": "activations",
          "visual_latents_and_cross_kv": "visual latents + cross-attn k/v", "kv_cache": "KV cache",
          "transient": "largest transient"}
KINDS = {"root": "embeddings and norms", "vision": "ViT", "cross_attn": "cross-attention", "loss": "logits/loss"}


def format_bytes(n: float) -> str:
    """Bytes in the unit that reads best: 3.2 MiB, 27.4 GiB, 512 B."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.0f} K"



def render(p) -> str:
    s, e = p.settings, p.estimate
    t = e.totals
    lines = [f"videollama plan: {p.model} ({_count(p.params)} parameters), {s.mode}, {s.gpus} device(s), "
             f"{s.precision}"]
    size = f"{s.frames} frames"
    if s.mode != "infer":
        ac = ", ".join(s.checkpointing) if s.checkpointing else "none"
        lines.append(f"  micro-batch {s.micro_batch} x {size}, {s.tokens} tokens; activation checkpointing: {ac}")
    elif s.whole_video:
        lines.append(f"  batch {s.micro_batch} x a video of {s.video_seconds:g} s: {t['video_windows']} windows of {size}, "
                     f"{t['video_latents']:,} latents; {s.tokens} prompt + {s.new_tokens} new tokens")
    else:
        lines.append(f"  batch {s.micro_batch} x {size}, {s.tokens} prompt + {s.new_tokens} new tokens")
    if s.lora:
        lines.append(f"  trainable: {_count(t['trainable_params'])} adapter parameters in {t['adapted_layers']} layers "
                     f"({format_bytes(t['adapter_bytes'])} fp32), frozen: {_count(t['frozen_params'])}; base weights "
                     f"{format_bytes(t['base_weight_bytes'])}" + (f" (NF4 {format_bytes(t['nf4_weight_bytes'])})"
                                                                  if s.mode == "qlora" else ""))
    lines += [f"  note: {n}" for n in p.notes]
    lines.append(f"  at the peak ({e.phase}):")
    for key, label in LABELS.items():
        value = e.at_peak[key]
        if not value and key not in ("parameters", "activations" if s.mode != "infer" else "parameters"):
            continue
        extra = ""
        if key == "optimizer_state":
            extra = "AdamW m and v, fp32"
        elif key == "activations":
            extra = (f"saved for backward (without checkpointing {format_bytes(t['activations_without_checkpointing'])},"
                     f" with it on every block {format_bytes(t['activations_with_checkpointing'])})")
        lines.append(f"    {label:<32}{format_bytes(value):>11}   {extra}".rstrip())
    lines.append(f"    {'peak':<32}{format_bytes(e.peak):>11}")
    if s.mode != "infer":
        kinds = ", ".join(f"{KINDS.get(k, k)} {format_bytes(v)}" for k, v in t["activations_by_kind"].items() if v)
        lines.append(f"  activations by kind: {kinds}")
        lines.append(f"  whole step: gradients {format_bytes(t['gradients'])}, largest transient "
                     f"{format_bytes(t['largest_transient'])}")
    if s.mode == "infer":
        lines.append(f"  whole run: KV cache {format_bytes(t['kv_cache'])} ({s.tokens + s.new_tokens} positions), "
                     f"largest transient {format_bytes(t['largest_transient'])}")
    lines.append(f"  visual latents {format_bytes(t['visual_latents'])}, cross-attention k/v "
                 f"{format_bytes(t['cross_attn_kv'])}" + (" (recomputed when checkpointed)" if s.mode != "infer" else ""))
    if s.whole_video:
        lines += _whole_video_lines(p)
    verdict = "fits" if p.fits else "does NOT fit"
    what = "micro-batch" if s.mode != "infer" else "batch"
    lines.append(f"  {verdict} in {s.gpu_memory_gib:g} GiB per device ({format_bytes(p.usable)} usable, 90%); "
                 f"largest {what} that fits: {p.max_micro_batch if p.max_micro_batch else 'none'}")
    if p.suggestions:
        lines.append("  what would make it fit, one change at a time:")
        lines += [f"    - {x}" for x in p.suggestions]
    return "\n".join(lines)


def _whole_video_lines(p) -> list[str]:
    """Generation with a whole video: each item, whether or not it is alive at the peak."""
    s, t = p.settings, p.estimate.totals
    chunk = min(s.windows_per_chunk, s.windows)
    return [
        "  the video, item by item:",
        f"    {'weights':<32}{format_bytes(t['parameters']):>11}",
        f"    {'visual latents':<32}{format_bytes(t['visual_latents']):>11}   [{s.micro_batch} x {t['video_latents']:,}, "
        "vision width]",
        f"    {'cross-attention k/v':<32}{format_bytes(t['cross_attn_kv']):>11}   {t['cross_attn_blocks']} blocks x "
        f"{format_bytes(t['cross_attn_kv_per_block'])} (k and v, [heads, {t['video_latents']:,}, head_dim] each)",
        f"    {'chunk of frames being encoded':<32}{format_bytes(t['frame_chunk']):>11}   {chunk} windows x {s.frames} "
        "frames, fp32, while they are encoded",
        f"    {'KV cache':<32}{format_bytes(t['kv_cache']):>11}   {s.tokens + s.new_tokens} text positions",
        f"  while encoding {format_bytes(t['encoding_peak'])}, while generating {format_bytes(t['generation_peak'])}"]
