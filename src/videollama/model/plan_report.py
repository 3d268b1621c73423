"""``videollama plan`` on the command line: what to plan (a model directory, a preset or a training
recipe), the report in sensible units, and what to change when a run does not fit."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from videollama.config import VideoLlamaConfig
from videollama.model.parts import BLOCK_TYPES

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


# ---- notes and suggestions ------------------------------------------------------------------------


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
    elif s.mode != "infer" and s.fsdp:
        notes.append(f"FSDP2 full sharding over {s.gpus} devices: parameters (fp32{master}), gradients and "
                     f"optimizer state are 1/{s.gpus} each")
    elif s.mode != "infer":
        notes.append("one device, fp32: the training loop runs without FSDP")
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
    from videollama.model.plan import _with, estimate, max_micro_batch, usable_bytes

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
                _with(s, checkpointing=BLOCK_TYPES))
    if s.precision == "fp32":
        suggest("bf16 (--precision bf16" + (", mixed precision through FSDP)" if s.mode != "infer" else ")"),
                _with(s, precision="bf16"))
    if s.mode in ("train", "lora"):
        n = _more_gpus(config, s, usable)
        if n:
            suggest(f"more GPUs: {n} (--gpus {n}) with FSDP full sharding", _with(s, gpus=n))
        else:
            out.append("more GPUs: not even 4096 with FSDP full sharding (activations are per device)")
    b = max_micro_batch(config, s)
    what = "micro-batch" if s.mode != "infer" else "batch"
    if 0 < b < s.micro_batch:
        keep = " (keep the global batch with more gradient accumulation steps)" if s.mode != "infer" else ""
        suggest(f"a smaller {what}: {b} (--micro-batch {b}){keep}", _with(s, micro_batch=b))
    elif b == 0:
        out.append(f"a smaller {what}: even 1 does not fit")
    frames = next((f for f in range(s.frames - 1, 0, -1) if verdict(_with(s, frames=f))[0]), 0)
    if frames:
        suggest(f"fewer frames: {frames} (--frames {frames})", _with(s, frames=frames))
    tokens = _largest(lambda t: verdict(_with(s, tokens=t))[0], 2 if s.mode != "infer" else 1, s.tokens - 1)
    if tokens:
        suggest(f"shorter text: {tokens} tokens (--seq {tokens})", _with(s, tokens=tokens))
    if s.mode in ("train", "lora") and not any(fitting):   # no single change is enough: several together
        for batch in sorted({s.micro_batch, 1}, reverse=True):
            both = _with(s, checkpointing=BLOCK_TYPES, precision="bf16", micro_batch=batch)
            n = s.gpus if verdict(both)[0] else _more_gpus(config, both, usable)
            if n:
                also = f", micro-batch {batch}" if batch != s.micro_batch else ""
                suggest(f"together: checkpointing on every block, bf16, {n} GPU(s){also}", _with(both, gpus=n))
                break
    if s.mode == "train" and not s.freeze:
        from videollama.model.plan import LORA_R

        lora = _with(s, mode="lora", lora_r=LORA_R, lora_targets=tuple(_lora_defaults().target_modules),
                     lora_parts=tuple(_lora_defaults().parts))
        suggest(f"LoRA (--mode lora, r={LORA_R}, or a recipe's lora: section): frozen base, adapters trained", lora)
        if s.gpus == 1:
            suggest("QLoRA (--mode qlora: base linear weights in NF4, lora.quantize nf4)", _with(lora, mode="qlora"))
    elif s.mode == "lora" and s.gpus == 1:
        suggest("QLoRA (--mode qlora: base linear weights in NF4, lora.quantize nf4)", _with(s, mode="qlora"))
    if s.mode == "infer":
        at = est.at_peak
        out.append(f"int8 or int4 weights (not built yet, issue 14): {format_bytes(at['parameters'])} of "
                   f"parameters would shrink to about 1/{2 if s.precision == 'bf16' else 4} or 1/"
                   f"{4 if s.precision == 'bf16' else 8}")
    return out


def _lora_defaults():
    from videollama.train.recipe import LoraSection

    return LoraSection()


def _more_gpus(config, s, usable: int) -> int:
    """The fewest devices (powers of two above s.gpus, up to 4096) that fit; 0 if none does."""
    from videollama.model.plan import _with, estimate

    n = s.gpus * 2
    while n <= 4096 and estimate(config, _with(s, gpus=n)).peak > usable:
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


# ---- the report -----------------------------------------------------------------------------------


def render(p) -> str:
    s, e = p.settings, p.estimate
    t = e.totals
    lines = [f"videollama plan: {p.model} ({_count(p.params)} parameters), {s.mode}, {s.gpus} device(s), "
             f"{s.precision}"]
    size = f"{s.frames} frames"
    if s.mode != "infer":
        ac = ", ".join(s.checkpointing) if s.checkpointing else "none"
        lines.append(f"  micro-batch {s.micro_batch} x {size}, {s.tokens} tokens; activation checkpointing: {ac}")
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
    verdict = "fits" if p.fits else "does NOT fit"
    what = "micro-batch" if s.mode != "infer" else "batch"
    lines.append(f"  {verdict} in {s.gpu_memory_gib:g} GiB per device ({format_bytes(p.usable)} usable, 90%); "
                 f"largest {what} that fits: {p.max_micro_batch if p.max_micro_batch else 'none'}")
    if p.suggestions:
        lines.append("  what would make it fit, one change at a time:")
        lines += [f"    - {x}" for x in p.suggestions]
    return "\n".join(lines)


# ---- command line ---------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_argument_group("what to plan (one of)")
    what.add_argument("--model", type=Path, metavar="DIR", help="a model directory (its config.json only is read)")
    what.add_argument("--preset", metavar="NAME", help="a preset name (see config.py)")
    what.add_argument("--config", type=Path, metavar="RECIPE", help="a training recipe (its model, micro_batch, precision, "
                      "parallel.activation_checkpointing, freeze and data.max_len)")
    parser.add_argument("--mode", metavar="train|lora|qlora|infer", help="train (default; a recipe with a lora: "
                        "section: lora, or qlora with lora.quantize nf4), lora, qlora or infer (generate)")
    parser.add_argument("--lora-r", type=int, dest="lora_r", metavar="R", help="lora/qlora: the adapters' rank "
                        "(default: the recipe's lora.r, else 16)")
    parser.add_argument("--gpus", type=int, metavar="N", help="devices; train: FSDP full sharding over them (default 1)")
    parser.add_argument("--gpu-memory", type=float, dest="gpu_memory_gib", metavar="GIB", help="memory per device in GiB "
                        "(default 80; an '80 GB' A100 or H100 has 80 GiB); 90%% of it counts as usable")
    parser.add_argument("--frames", type=int, metavar="F", help="frames per clip (default: the model's preprocess.num_frames)")
    parser.add_argument("--size", type=int, metavar="S", help="frame size in pixels (default: the model's vision.image_size)")
    parser.add_argument("--seq", type=int, dest="tokens", metavar="T", help="train: tokens per row (default data.max_len or "
                        "max_seq_len); infer: prompt tokens (default max_seq_len - new tokens)")
    parser.add_argument("--new-tokens", type=int, metavar="N", help="infer: tokens generated (default 32)")
    parser.add_argument("--micro-batch", type=int, metavar="B", help="train: clips per micro-batch; infer: prompts (default 1)")
    parser.add_argument("--precision", metavar="bf16|fp32", help="bf16 (default; a GPU's) or fp32")
    parser.add_argument("--activation-checkpointing", nargs="?", const="all", dest="checkpointing",
                        metavar="KINDS", help="checkpoint every block (no value, or 'all'), the kinds given "
                        f"(comma-separated: {','.join(BLOCK_TYPES)}) or none")
    parser.add_argument("--json", action="store_true", help="print JSON")


def resolve(args: argparse.Namespace) -> tuple[VideoLlamaConfig, dict, str]:
    """The model config, the plan's keyword arguments (recipe values, then the flags) and a name."""
    given = [k for k in ("model", "preset", "config") if getattr(args, k, None) is not None]
    if len(given) != 1:
        raise ValueError("plan needs exactly one of --model DIR, --preset NAME or --config RECIPE"
                         + (f" (got {', '.join('--' + g for g in given)})" if given else ""))
    kw: dict = {}
    notes: list[str] = []
    if args.model is not None:
        config, name = VideoLlamaConfig.load(args.model), str(args.model)
    elif args.preset is not None:
        config, name = VideoLlamaConfig.from_name(args.preset), args.preset
    else:
        config, name, kw, notes = _from_recipe(args.config)
    if args.gpu_memory_gib is not None and not 0 < args.gpu_memory_gib < math.inf:  # inf: no integer of bytes
        raise ValueError(f"--gpu-memory must be a finite number of GiB > 0, got {args.gpu_memory_gib}")
    if args.size is not None:
        config = config.with_overrides({"vision.image_size": args.size, "preprocess.size": args.size})
    for key in ("mode", "lora_r", "gpus", "gpu_memory_gib", "frames", "tokens", "new_tokens", "micro_batch", "precision"):
        if getattr(args, key, None) is not None:
            kw[key] = getattr(args, key)
    if args.checkpointing is not None:
        value = args.checkpointing.strip()
        kw["checkpointing"] = (BLOCK_TYPES if value == "all" else () if value == "none"
                               else tuple(k.strip() for k in value.split(",") if k.strip()))
    if kw.get("mode") == "infer" and args.tokens is None:
        kw.pop("tokens", None)   # a recipe's data.max_len is a training length, not a prompt's
    kw["_notes"] = notes
    return config, kw, name


def _from_recipe(path: Path) -> tuple[VideoLlamaConfig, str, dict, list[str]]:
    from videollama.train.recipe import TrainConfig

    cfg = TrainConfig.from_yaml(path)
    if cfg.model.init_from:
        config = VideoLlamaConfig.load(cfg.model.init_from)
    else:
        config = VideoLlamaConfig.from_name(cfg.model.preset)
        if cfg.model.overrides:
            config = config.with_overrides(cfg.model.overrides)
    notes = []
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16"
        notes.append("recipe precision auto: planned as bf16 (what it means on a GPU)")
    texts = cfg.data.texts_per_clip
    if texts == 0:
        texts = 1
        notes.append("data.texts_per_clip 0 (every text of a clip): planned as 1 text row per clip")
    tokens = cfg.data.synthetic_seq_len if cfg.data.kind == "synthetic" else cfg.data.max_len
    lora = {}
    if cfg.lora.r:
        lora = {"mode": "qlora" if cfg.lora.quantize == "nf4" else "lora", "lora_r": cfg.lora.r,
                "lora_dropout": cfg.lora.dropout, "lora_targets": tuple(cfg.lora.target_modules),
                "lora_parts": tuple(cfg.lora.parts)}
    kw = {**lora, "micro_batch": cfg.micro_batch, "precision": precision,
          "freeze": () if lora else tuple(cfg.freeze),
          "checkpointing": tuple(cfg.parallel.activation_checkpointing), "texts_per_clip": texts,
          "tokens": min(tokens or config.decoder.max_seq_len, config.decoder.max_seq_len)}
    return config, f"{path} ({config.name})", kw, notes


def run(args: argparse.Namespace) -> int:
    from videollama.model.plan import plan, settings_for

    config, kw, name = resolve(args)
    notes = kw.pop("_notes")
    s = settings_for(config, **kw)
    p = plan(config, s, model_name=name)
    p.notes = notes + p.notes
    print(json.dumps(p.to_dict(), indent=2) if args.json else render(p))
    return 0
