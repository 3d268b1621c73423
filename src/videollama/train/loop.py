"""``videollama train``: the one training loop, for pre-training and fine-tuning alike.

Runs as one process or under ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE
in the environment), set up by ``distributed.py``; a single process skips FSDP sharding unless
``parallel.fsdp`` is true or it computes in bf16.

One optimizer step:
  1. take ``accumulation`` micro-batches on every rank (global = micro * world * accumulation);
  2. all-reduce the number of label tokens, so every micro-batch's summed loss is divided by
     the token count of the whole global batch: the gradient, and the logged loss, are then
     exactly the mean over all label tokens of the step, however the batch is split over
     ranks and micro-batches (which is what makes 1-rank and 2-rank curves agree);
  3. clip the gradient norm; if the loss or the norm is not finite on ANY rank (an
     all-reduced flag), skip the update everywhere and count it; stop after
     ``guards.max_bad_steps`` in a row;
  4. step the LR schedule, append a line to RUN_DIR/metrics.jsonl (rank 0), checkpoint
     every ``checkpoint.every`` steps and on SIGTERM or SIGINT (then stop).
A restart with the same command resumes from RUN_DIR/checkpoints/latest by itself.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from videollama.config import VideoLlamaConfig
from videollama.train import checkpoint as ckpt
from videollama.train.build import build_loader, build_model, check_same_model, materialize, resolve_tokenizer
from videollama.train.distributed import (
    DistEnv,
    TrainingStopped,
    all_reduce_sum,
    monitored_barrier,
    setup_distributed,
)
from videollama.train.metrics import MetricsLog, SpikeDetector
from videollama.train.optim import build_optimizer, freeze
from videollama.train.parallel import build_mesh, parallelize
from videollama.train.recipe import TrainConfig
from videollama.train.rng import rng_state, seed_everything, set_rng_state
from videollama.train.schedule import build_scheduler

__all__ = ["TrainingStopped", "build_model", "materialize", "train"]


# ---- set-up --------------------------------------------------------------------------------------


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


def setup_run(cfg: TrainConfig, run_dir: Path, env: DistEnv) -> Run:
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
    if env.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "train_config.json")
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
                compile=cfg.parallel.compile, bf16=bf16, reshard_after_forward=cfg.parallel.reshard_after_forward)
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
    scheduler = build_scheduler(optimizer, peak_lr=cfg.optimizer.lr, warmup_steps=cfg.schedule.warmup_steps,
                                max_steps=cfg.max_steps, min_lr=cfg.schedule.min_lr)
    loader = build_loader(cfg, model_cfg, env, tokenizer_path)
    run = Run(cfg=cfg, env=env, run_dir=run_dir, model=model, model_cfg=model_cfg, optimizer=optimizer,
              scheduler=scheduler, loader=loader, mesh=mesh, use_fsdp=use_fsdp, accumulation=accum,
              trainable=[p for p in model.parameters() if p.requires_grad], n_params=n_params,
              frozen_params=frozen, flops_per_sample=_flops_per_sample(model_cfg))
    seed_everything(cfg.seed, env.rank)
    resume(run)
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


# ---- one optimizer step --------------------------------------------------------------------------


def train_step(run: Run, data_iter) -> dict:
    """Steps 1-3 of the module docstring for ``run.step``; returns the step's metrics record."""
    cfg, env, model = run.cfg, run.env, run.model
    step, world, accum = run.step, env.world_size, run.accumulation
    t0, c0 = time.perf_counter(), time.process_time()
    micro_batches = [_next_batch(data_iter, cfg) for _ in range(accum)]
    if step in cfg.guards.inject_hang_steps and env.rank == cfg.guards.inject_rank:
        time.sleep(cfg.guards.inject_hang_s)  # test hook: this rank is late
    if cfg.guards.barrier_every and step % cfg.guards.barrier_every == 0:
        # Every rank has its batches: a rank stuck in data loading (or dead) is named here
        # instead of leaving the others blocked in an anonymous all-reduce.
        monitored_barrier(env, cfg.guards.timeout_s, f"step {step} (after loading its batches)")
    local_label_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches)
    label_tokens = all_reduce_sum([local_label_tokens], env)[0]
    if label_tokens == 0:
        raise TrainingStopped(f"step {step}: the global batch has no label tokens (all -100)")

    loss_sum = torch.zeros((), dtype=torch.float32, device=env.device)  # no GPU sync per micro-batch
    input_tokens = clips = 0
    for m, batch in enumerate(micro_batches):
        # Reduce-scatter gradients once per step, on the last micro-batch only.
        if run.use_fsdp:
            model.set_requires_gradient_sync(m == accum - 1)
        summed = _micro_step(model, batch, env.device)
        if step in cfg.guards.inject_nan_steps and env.rank == cfg.guards.inject_rank:
            summed = summed * float("nan")  # test hook: a poisoned batch on one rank
        # FSDP averages gradients over ranks; the x world undoes that, so the gradient
        # is the sum over every token of the global batch divided by its token count.
        (summed * (world / label_tokens)).backward()
        loss_sum += summed.detach().float()
        input_tokens += batch["input_ids"].numel()
        clips += batch["video"].shape[0] if batch.get("video") is not None else batch["input_ids"].shape[0]

    grad_norm = torch.nn.utils.clip_grad_norm_(run.trainable, cfg.clip_grad)
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    local_bad = not (math.isfinite(float(loss_sum)) and math.isfinite(grad_norm))
    totals = all_reduce_sum([float(loss_sum), input_tokens, clips, float(local_bad),
                             float(bool(run.preempted["flag"])), _skipped(run.loader)], env)
    loss = totals[0] / label_tokens
    bad = totals[3] > 0  # some rank saw a non-finite value: every rank skips
    lr = run.scheduler.get_last_lr()[0]
    if bad:
        run.bad_in_row += 1
        run.bad_total += 1
    else:
        run.optimizer.step()
        run.bad_in_row = 0
        run.last_loss = loss
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    run.step += 1
    dt, cpu_dt = time.perf_counter() - t0, time.process_time() - c0
    flops = run.flops_per_sample
    return {
        "step": step, "loss": loss if math.isfinite(loss) else None, "lr": lr,
        "grad_norm": grad_norm if math.isfinite(grad_norm) else None,
        "tokens_per_s": totals[1] / dt, "clips_per_s": totals[2] / dt,
        "skipped": int(totals[5]), "bad_step": bad, "bad_steps": run.bad_total, "time_s": dt,
        "cpu_s": cpu_dt,  # this process's CPU time: robust to other work on the machine
        "stop_requested": totals[4] > 0,
        "mfu": flops * totals[2] / dt / (cfg.log.peak_flops * world) if cfg.log.peak_flops > 0 else None,
    }


def checkpoint_if_due(run: Run, *, stop: bool) -> None:
    """Checkpoint every ``checkpoint.every`` steps, at the end, and when asked to stop (collective)."""
    cfg, step = run.cfg, run.step
    due = cfg.checkpoint.every and step % cfg.checkpoint.every == 0
    at_end = step == cfg.max_steps and cfg.checkpoint.at_end
    if due or at_end or stop:
        monitored_barrier(run.env, cfg.guards.timeout_s, f"checkpoint at step {step}")
        ckpt.save_checkpoint(run.run_dir, step=step, model=run.model, optimizer=run.optimizer,
                             scheduler=run.scheduler,
                             rank_state={"loader": run.loader.state_dict(), "rng": rng_state()},
                             world_size=run.env.world_size, keep=cfg.checkpoint.keep)


# ---- the loop ------------------------------------------------------------------------------------


def train(cfg: TrainConfig, run_dir: str | Path) -> dict:
    """Train (or resume) a run in ``run_dir``; returns a summary. Raises TrainingStopped on a guard."""
    env = setup_distributed(cfg.guards.timeout_s)
    try:
        return _train(cfg, Path(run_dir), env)
    finally:
        if env.owns_group:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, run_dir: Path, env: DistEnv) -> dict:
    run = setup_run(cfg, run_dir, env)
    log = MetricsLog(run_dir, enabled=env.rank == 0, tensorboard=cfg.log.tensorboard, resume_step=run.start_step)
    spikes = SpikeDetector(cfg.guards.spike_factor, cfg.guards.spike_window)
    # SIGTERM (preemption) and SIGINT (Ctrl-C) both finish the step, checkpoint and stop.
    handlers = {sig: signal.signal(sig, lambda signum, _: run.preempted.update(flag=signal.Signals(signum).name))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    progress = _progress(cfg, env.rank, run.start_step)
    data_iter = iter(run.loader)
    try:
        while run.step < cfg.max_steps:
            record = train_step(run, data_iter)
            stop = record.pop("stop_requested")
            record["spike"] = (not record["bad_step"]) and spikes.check(record["loss"])
            log.write(record)
            _report(progress, record, cfg)
            if run.bad_in_row >= cfg.guards.max_bad_steps:
                raise TrainingStopped(f"{run.bad_in_row} non-finite steps in a row (last at step {record['step']}); "
                                      "weights are unchanged since the last good step")
            checkpoint_if_due(run, stop=stop)
            if stop:
                if env.rank == 0:
                    why = run.preempted["flag"] or "a signal on another rank"
                    print(f"{why}: checkpoint written at step {run.step}; stopping", file=sys.stderr)
                break
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        log.close()
        if progress is not None:
            progress.close()
    summary = {"steps": run.step, "start_step": run.start_step, "loss": run.last_loss, "bad_steps": run.bad_total,
               "params": run.n_params, "frozen_params": run.frozen_params,
               "trainable_params": sum(p.numel() for p in run.trainable), "accumulation": run.accumulation,
               "world_size": env.world_size,
               "mesh": dict(zip(run.mesh.mesh_dim_names, run.mesh.shape)) if run.mesh is not None else None,
               "preempted": bool(run.preempted["flag"])}
    if env.rank == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _micro_step(model: torch.nn.Module, batch: dict, device: torch.device) -> torch.Tensor:
    """Forward one micro-batch; returns the loss summed over its label tokens (fp32 scalar)."""
    from videollama.model.videollama import lm_loss

    video, video_index = batch.get("video"), batch.get("video_index")
    out = model(input_ids=batch["input_ids"].to(device),
                video=video.to(device) if video is not None else None,
                video_index=video_index.to(device) if video_index is not None and video is not None else None)
    return lm_loss(out.logits.float(), batch["labels"].to(device), reduction="sum")


def _next_batch(data_iter, cfg: TrainConfig) -> dict:
    try:
        return next(data_iter)
    except StopIteration:
        raise TrainingStopped(f"the data ran out ({cfg.data.sources}); the training loader should repeat") from None


def _skipped(loader) -> float:
    return float(sum(getattr(loader, "skipped", {}).values()))


def _flops_per_sample(model_cfg: VideoLlamaConfig) -> float:
    from videollama.plan.info import train_flops_per_sample

    return float(train_flops_per_sample(model_cfg))


def _progress(cfg: TrainConfig, rank: int, start_step: int):
    if rank != 0 or not cfg.log.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.max_steps, initial=start_step, desc="train", dynamic_ncols=True)


def _report(progress, record: dict, cfg: TrainConfig) -> None:
    if progress is None:
        return
    step, loss = record["step"], _nan_if_none(record["loss"])
    progress.update(1)
    if (step + 1) % cfg.log.every == 0:
        progress.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}",
                             gnorm=f"{_nan_if_none(record['grad_norm']):.2f}")
    if record["spike"]:
        progress.write(f"step {step}: loss spike {loss:.4f} (> {cfg.guards.spike_factor}x recent mean)")
    if record["bad_step"]:
        progress.write(f"step {step}: non-finite loss or gradient norm; update skipped")


def _nan_if_none(x: float | None) -> float:
    return float("nan") if x is None else x


# ---- command line --------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="recipe YAML (see configs/)")
    parser.add_argument("--run-dir", help="where metrics, TensorBoard logs and checkpoints go "
                                          "(default runs/<recipe name>)")
    parser.add_argument("--data", help="data source (shard folder/glob or eval JSONL); replaces data.sources")
    parser.add_argument("--max-steps", type=int, help="replaces max_steps")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="recipe overrides, values parsed as YAML (e.g. optimizer.lr=1e-4)")


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.data:
        overrides += ["data.kind=webdataset", f"data.sources=[{json.dumps(args.data)}]"]
    if args.max_steps is not None:
        overrides.append(f"max_steps={args.max_steps}")
    cfg = TrainConfig.from_yaml(args.config, overrides)
    run_dir = Path(args.run_dir or Path("runs") / Path(args.config).stem)
    try:
        summary = train(cfg, run_dir)
    except TrainingStopped as e:
        print(f"videollama train: stopped: {e}", file=sys.stderr)
        return 3
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(summary))
    return 0
