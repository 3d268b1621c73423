"""``videollama plan`` on the command line: what to plan (a model directory, a preset or a training
recipe), the flags that change it, and the report."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from videollama.config import VideoLlamaConfig
from videollama.model.parts import BLOCK_TYPES
from videollama.plan.planner import plan, settings_for
from videollama.plan.report import render
from videollama.plan.simulate_cli import add_arguments as add_simulate_arguments


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
    parser.add_argument("--gpus", type=int, metavar="N", help="devices; train: FSDP2 sharding over them, "
                        "hybrid across nodes (default 1)")
    parser.add_argument("--gpus-per-node", type=int, default=8, metavar="N", help="GPUs per node (default 8): more GPUs "
                        "than that shard inside a node and replicate across nodes (train/parallel.py)")
    parser.add_argument("--global-batch", type=int, metavar="N", help="train: clips per optimizer step (default: the "
                        "recipe's global_batch, else micro-batch x GPUs); more than that accumulates micro-batches")
    parser.add_argument("--gpu-memory", type=float, dest="gpu_memory_gib", metavar="GIB", help="memory per device in GiB "
                        "(default 80; an '80 GB' A100 or H100 has 80 GiB); 90%% of it counts as usable")
    parser.add_argument("--frames", type=int, metavar="F", help="frames per clip (default: the model's preprocess.num_frames)")
    parser.add_argument("--size", type=int, metavar="S", help="frame size in pixels (default: the model's vision.image_size)")
    parser.add_argument("--seq", type=int, dest="tokens", metavar="T", help="train: tokens per row (default data.max_len or "
                        "max_seq_len); infer: prompt tokens (default max_seq_len - new tokens)")
    parser.add_argument("--new-tokens", type=int, metavar="N", help="infer: tokens generated (default 32)")
    parser.add_argument("--video-seconds", type=float, metavar="S", help="infer: each prompt about a whole video of "
                        "S seconds, in windows by the model's policy (preprocess.max_windows), encoded a chunk at a time")
    parser.add_argument("--windows-per-chunk", type=int, metavar="N", help="infer with --video-seconds: windows "
                        "decoded and encoded at a time (default 8)")
    parser.add_argument("--micro-batch", type=int, metavar="B", help="train: clips per micro-batch; infer: prompts (default 1)")
    parser.add_argument("--precision", metavar="bf16|fp32", help="bf16 (default; a GPU's) or fp32")
    parser.add_argument("--activation-checkpointing", nargs="?", const="all", dest="checkpointing",
                        metavar="KINDS", help="checkpoint every block (no value, or 'all'), the kinds given "
                        f"(comma-separated: {','.join(BLOCK_TYPES)}) or none")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="with --config: recipe overrides as `train` takes them (micro_batch=4 "
                        "model.init_from=DIR); with --model or --preset: model config keys (decoder.num_layers=4)")
    add_simulate_arguments(parser)


def resolve(args: argparse.Namespace) -> tuple[VideoLlamaConfig, dict, str]:
    """The model config, the plan's keyword arguments (recipe values, then the flags) and a name."""
    given = [k for k in ("model", "preset", "config") if getattr(args, k, None) is not None]
    if len(given) != 1:
        raise ValueError("plan needs exactly one of --model DIR, --preset NAME or --config RECIPE"
                         + (f" (got {', '.join('--' + g for g in given)})" if given else ""))
    kw: dict = {}
    notes: list[str] = []
    overrides = list(getattr(args, "overrides", None) or [])
    if args.model is not None:
        config, name = _with_model_overrides(VideoLlamaConfig.load(args.model), overrides), str(args.model)
    elif args.preset is not None:
        config, name = _with_model_overrides(VideoLlamaConfig.from_name(args.preset), overrides), args.preset
    else:
        config, name, kw, notes = _from_recipe(args.config, overrides)
    if args.gpu_memory_gib is not None and not 0 < args.gpu_memory_gib < math.inf:  # inf: no integer of bytes
        raise ValueError(f"--gpu-memory must be a finite number of GiB > 0, got {args.gpu_memory_gib}")
    budget_days = getattr(args, "budget_days", None)
    if budget_days is not None and not 0 < budget_days < math.inf:
        raise ValueError(f"--budget-days must be a finite number of days > 0, got {budget_days}")
    if args.size is not None:
        config = config.with_overrides({"vision.image_size": args.size, "preprocess.size": args.size})
    for key in ("mode", "lora_r", "gpus", "gpu_memory_gib", "frames", "tokens", "new_tokens", "micro_batch", "precision",
                "video_seconds", "windows_per_chunk", "gpus_per_node", "global_batch"):
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


def _with_model_overrides(config: VideoLlamaConfig, overrides: list[str]) -> VideoLlamaConfig:
    """``key=value`` items on a model config (``decoder.num_layers=4``), values parsed as YAML."""
    from videollama.dataclass_io import parse_override

    return config.with_overrides(dict(parse_override(item) for item in overrides)) if overrides else config


def _from_recipe(path: Path, overrides: list[str] | None = None) -> tuple[VideoLlamaConfig, str, dict, list[str]]:
    from videollama.train.recipe import TrainConfig

    cfg = TrainConfig.from_yaml(path, overrides)
    if cfg.model.init_from:
        if not (Path(cfg.model.init_from) / "config.json").is_file():
            raise ValueError(f"{path}: model.init_from {cfg.model.init_from} is not a model directory (no config.json; "
                             "`make demo` writes runs/demo/model): plan another with model.init_from=DIR, or a preset "
                             "with model.init_from=null model.preset=NAME")
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
    kw = {**lora, "micro_batch": cfg.micro_batch, "precision": precision, "global_batch": cfg.global_batch,
          "freeze": () if lora else tuple(cfg.freeze),
          "checkpointing": tuple(cfg.parallel.activation_checkpointing), "texts_per_clip": texts,
          "tokens": min(tokens or config.decoder.max_seq_len, config.decoder.max_seq_len)}
    return config, f"{path} ({config.name})", kw, notes


def run(args: argparse.Namespace) -> int:
    config, kw, name = resolve(args)
    notes = kw.pop("_notes")
    if getattr(args, "simulate", False):
        from videollama.plan.simulate_cli import run as run_simulation

        return run_simulation(args, config, kw, name, notes)
    s = settings_for(config, **kw)
    p = plan(config, s, model_name=name)
    p.notes = notes + p.notes
    print(json.dumps(p.to_dict(), indent=2) if args.json else render(p))
    return 0
