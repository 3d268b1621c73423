"""Setting up a training run: the model (built, frozen or adapted, sharded), optimizer, schedule and
loader, the run's record checked and kept (record.py), and the resume from its newest intact
checkpoint. :class:`Run` is everything the loop (loop.py) holds between steps.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from videollama.config import VideoLlamaConfig
from videollama.train import checkpoint as ckpt
from videollama.train.build import build_loader, build_model, check_same_model, materialize, resolve_tokenizer
from videollama.train.distributed import DistEnv, TrainingStopped, all_reduce_sum
from videollama.train.latents import build_latent_cache
from videollama.train.optim import build_optimizer, freeze
from videollama.train.parallel import build_mesh, parallelize
from videollama.train.recipe import TrainConfig
from videollama.train.record import keep_config, schedule_warnings
from videollama.train.rng import seed_everything, set_rng_state
from videollama.train.schedule import build_scheduler


@dataclass
class Run:
    """Everything one training run holds between steps."""

    cfg: TrainConfig
    env: DistEnv
    run_dir: Path
    model: torch.nn.Module
    model_cfg: VideoLlamaConfig
    optimizer: torch.optim.Optimizer
    scheduler: object
    loader: object
    mesh: object
    use_fsdp: bool
    accumulation: int
    trainable: list[torch.Tensor]
    n_params: int
    frozen_params: int
    step: int = 0
    start_step: int = 0
    bad_in_row: int = 0
    bad_total: int = 0
    last_loss: float = float("nan")
    preempted: dict = field(default_factory=lambda: {"flag": False})
    flops_per_sample: float = 0.0
    warnings: list[str] = field(default_factory=list)
    config_change: dict | None = None  # the history entry of an allowed change of settings
    latents: object = None  # a frozen encoder's LatentCache (train/latents.py), with data.latent_cache


def setup_run(cfg: TrainConfig, run_dir: Path, env: DistEnv, *, allow_config_change: bool = False) -> Run:
    """Build the model, shard it, make optimizer, schedule and loader, and resume if a checkpoint exists."""
    world = env.world_size
    accum = cfg.accumulation(world)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
        if torch.cuda.is_available():
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and env.device.type == "cuda")

    meta = cfg.parallel.meta_init
    if meta is None:
        meta = env.device.type == "cuda" and not cfg.model.init_from
    qlora = cfg.lora.r > 0 and cfg.lora.quantize == "nf4"
    if qlora:  # NF4 weights compute in bf16 themselves; FSDP cannot shard them
        from videollama.train.lora import require_qlora

        require_qlora()
        if world > 1 or cfg.parallel.fsdp or not cfg.model.init_from:
            raise ValueError("lora.quantize nf4 (QLoRA) runs in one process without FSDP, from model.init_from")
        meta, bf16 = False, False
    model, model_cfg = build_model(cfg, meta=meta)
    if cfg.lora.r:
        from videollama.train.lora import apply_lora, frozen_count

        apply_lora(model, cfg.lora, base=cfg.model.init_from, seed=cfg.seed)  # before fully_shard
        frozen = frozen_count(model)
    else:
        frozen = freeze(model, cfg.freeze)
    n_params = sum(p.numel() for p in model.parameters())
    tokenizer_path = resolve_tokenizer(cfg)
    check_same_model(run_dir, model_cfg)  # before anything in run_dir is overwritten
    # Every rank checks the recorded settings (and raises alike); rank 0 writes the record.
    if env.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    change = keep_config(run_dir, cfg.to_dict(), allow_change=allow_config_change, write=env.rank == 0)
    if env.rank == 0:
        model_cfg.save(run_dir / "model_config.json")
        if tokenizer_path:
            shutil.copyfile(tokenizer_path, run_dir / "tokenizer.json")

    # bf16 compute (with fp32 master weights) comes from FSDP's MixedPrecisionPolicy.
    use_fsdp = cfg.parallel.fsdp if cfg.parallel.fsdp is not None else (world > 1 or bf16)
    if not use_fsdp and (world > 1 or bf16):
        raise ValueError("parallel.fsdp=false works only on a single rank in fp32")
    mesh = build_mesh(env.device.type, world, env.local_world_size) if use_fsdp else None
    if not meta:
        model.to(env.device)
    parallelize(model, mesh, activation_checkpointing=cfg.parallel.activation_checkpointing,
                compile=cfg.parallel.compile, bf16=bf16, reshard_after_forward=cfg.parallel.reshard_after_forward,
                encoder_outside_forward=cfg.data.latent_cache)
    if meta and cfg.lora.r:
        from videollama.train.lora import reset_lora, without_adapters

        model.to_empty(device=env.device)  # the adapters too
        with without_adapters(model):  # the base weights drawn as without LoRA
            materialize(model, env.device, cfg.seed)
        reset_lora(model)  # then the adapters, as peft draws them (B = 0)
    elif meta:
        materialize(model, env.device, cfg.seed)
    # After fully_shard: it replaces every parameter by a sharded DTensor parameter.
    optimizer = build_optimizer(model, cfg.optimizer)
    warmup = cfg.schedule.warmup_for(cfg.max_steps)
    scheduler = build_scheduler(optimizer, peak_lr=cfg.optimizer.lr, warmup_steps=warmup,
                                max_steps=cfg.max_steps, min_lr=cfg.schedule.min_lr)
    loader = build_loader(cfg, model_cfg, env, tokenizer_path)
    run = Run(cfg=cfg, env=env, run_dir=run_dir, model=model, model_cfg=model_cfg, optimizer=optimizer,
              scheduler=scheduler, loader=loader, mesh=mesh, use_fsdp=use_fsdp, accumulation=accum,
              trainable=[p for p in model.parameters() if p.requires_grad], n_params=n_params,
              frozen_params=frozen, flops_per_sample=_flops_per_sample(model_cfg), config_change=change,
              warnings=schedule_warnings(peak_lr=cfg.optimizer.lr, warmup_steps=warmup,
                                         max_steps=cfg.max_steps, min_lr=cfg.schedule.min_lr))
    seed_everything(cfg.seed, env.rank)
    resume(run)
    run.latents = build_latent_cache(cfg, model, env, precision="bf16" if bf16 else "fp32", sharded=use_fsdp)
    return run


def resume(run: Run) -> None:
    """Continue from RUN_DIR/checkpoints/latest, if there is one: weights, optimizer, schedule,
    and (same world size) this rank's data position and RNG state. An unreadable checkpoint
    (damaged, tampered) is passed over for the newest intact one before it, and the run says so."""
    try:
        latest = ckpt.latest_checkpoint(run.run_dir)
    except ValueError as e:  # a bad `latest` pointer: the step folders themselves may be fine
        print(f"rank {run.env.rank}: {e}; looking for the newest intact checkpoint", file=sys.stderr)
        latest = None
    candidates = ckpt.intact_checkpoints(run.run_dir)
    if latest is not None:
        candidates = [latest] + [c for c in candidates if c != latest]
    elif not candidates:
        return
    for path in candidates:
        try:
            meta, rank_state = ckpt.load_checkpoint(path, model=run.model, optimizer=run.optimizer,
                                                    scheduler=run.scheduler)
            if rank_state is not None:
                run.loader.load_state_dict(rank_state["loader"])
                set_rng_state(rank_state["rng"])
            failed = 0.0
        except Exception as e:  # noqa: BLE001 - any damage: try the one before it
            print(f"rank {run.env.rank}: cannot resume from {path}: {e}; trying an older checkpoint",
                  file=sys.stderr)
            failed = 1.0
        # Every rank takes the same checkpoint: one rank's damaged state file moves them all on.
        if all_reduce_sum([failed], run.env)[0] == 0:
            break
    else:
        raise TrainingStopped(f"{run.run_dir}: no checkpoint could be read (tried {[p.name for p in candidates]}); "
                              "move the checkpoints/ folder away to start over")
    run.step = run.start_step = meta["step"]
    if rank_state is None:
        print(f"rank {run.env.rank}: {path} has no state for this rank (written by {meta['world_size']} ranks); "
              "the data loader starts over", file=sys.stderr)
    if run.env.rank == 0:
        print(f"resumed from {path} at step {run.start_step}", file=sys.stderr)


def _flops_per_sample(model_cfg: VideoLlamaConfig) -> float:
    from videollama.plan.info import train_flops_per_sample

    return float(train_flops_per_sample(model_cfg))
