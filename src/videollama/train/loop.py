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
import contextlib
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.contrib.logging import logging_redirect_tqdm

from videollama.constants import IGNORE_INDEX
from videollama.train import checkpoint as ckpt
from videollama.train.build import build_model, materialize
from videollama.train.distributed import (
    DistEnv,
    TrainingStopped,
    all_reduce_sum,
    monitored_barrier,
    setup_distributed,
)
from videollama.train.metrics import MetricsLog, ProgressBar, SpikeDetector
from videollama.train.recipe import TrainConfig
from videollama.train.record import json_ready, write_summary
from videollama.train.rng import rng_state
from videollama.train.run import Run, setup_run

__all__ = ["Run", "TrainingStopped", "build_model", "materialize", "setup_run", "train"]


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
    local_label_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches)
    label_tokens = all_reduce_sum([local_label_tokens], env)[0]
    if label_tokens == 0:
        raise TrainingStopped(f"step {step}: the global batch has no label tokens (all -100)")

    loss_sum = torch.zeros((), dtype=torch.float32, device=env.device)  # no GPU sync per micro-batch
    input_tokens = clips = 0
    for m, batch in enumerate(micro_batches):
        # Every micro-batch reduce-scatters its gradient, which accumulates sharded; across nodes the
        # all-reduce of the shards waits for the last micro-batch. Syncing on the last micro-batch only
        # would make FSDP2 hold the whole model's gradient unsharded in fp32 on every GPU between
        # micro-batches: the 13B recipe would not fit in 80 GB (bench/results/simulate.md).
        if run.use_fsdp:
            model.set_requires_all_reduce(m == accum - 1)
        summed = micro_step(model, batch, env.device, run.latents)
        if step in cfg.guards.inject_nan_steps and env.rank == cfg.guards.inject_rank:
            summed = summed * float("nan")  # test hook: a poisoned batch on one rank
        # FSDP averages gradients over ranks; the x world undoes that, so the gradient
        # is the sum over every token of the global batch divided by its token count.
        (summed * (world / label_tokens)).backward()
        loss_sum += summed.detach().float()
        input_tokens += batch["input_ids"].numel()
        clips += _videos(batch)

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
    record = {
        "step": step, "loss": loss if math.isfinite(loss) else None, "lr": lr,
        "grad_norm": grad_norm if math.isfinite(grad_norm) else None,
        "tokens_per_s": totals[1] / dt, "clips_per_s": totals[2] / dt,
        "skipped": int(totals[5]), "bad_step": bad, "bad_steps": run.bad_total, "time_s": dt,
        "cpu_s": cpu_dt,  # this process's CPU time: robust to other work on the machine
        "stop_requested": totals[4] > 0,
        "mfu": flops * totals[2] / dt / (cfg.log.peak_flops * world) if cfg.log.peak_flops > 0 else None,
    }
    if run.latents is not None:  # this rank's cache: windows asked for, encoded, hit rate
        record.update(run.latents.record())
    return record


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


def train(cfg: TrainConfig, run_dir: str | Path, *, allow_config_change: bool = False) -> dict:
    """Train (or resume) a run in ``run_dir``; returns a summary. Raises TrainingStopped on a guard, and
    ValueError (naming the keys) when ``run_dir`` holds checkpoints trained with other settings, unless
    ``allow_config_change`` (then both recipes are kept: train/record.py)."""
    env = setup_distributed(cfg.guards.timeout_s)
    try:
        return _train(cfg, Path(run_dir), env, allow_config_change)
    finally:
        if env.owns_group:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, run_dir: Path, env: DistEnv, allow_config_change: bool) -> dict:
    run = setup_run(cfg, run_dir, env, allow_config_change=allow_config_change)
    if env.rank == 0:
        for warning in run.warnings:
            print(f"videollama train: warning: {warning}", file=sys.stderr)
        if run.config_change is not None:
            print(f"videollama train: settings changed from step {run.config_change['step']} "
                  f"({', '.join(run.config_change['changes'])}); the recorded ones are kept in "
                  f"{run_dir / run.config_change['previous']}", file=sys.stderr)
    log = MetricsLog(run_dir, enabled=env.rank == 0, tensorboard=cfg.log.tensorboard, resume_step=run.start_step)
    spikes = SpikeDetector(cfg.guards.spike_factor, cfg.guards.spike_window)
    # SIGTERM (preemption) and SIGINT (Ctrl-C) both finish the step, checkpoint and stop.
    handlers = {sig: signal.signal(sig, lambda signum, _: run.preempted.update(flag=signal.Signals(signum).name))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    progress = ProgressBar.start(cfg, env.rank, run.start_step)
    data_iter = iter(run.loader)
    # A skipped sample's warning (logging) goes on a line of its own above the progress bar.
    redirect = logging_redirect_tqdm() if progress is not None else contextlib.nullcontext()
    try:
        with redirect:
            _loop(run, data_iter, log, spikes, progress)
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
               "preempted": bool(run.preempted["flag"]),
               "skipped_by_reason": _skipped_by_reason(run), "warnings": run.warnings,
               "config_change": run.config_change}
    if env.rank == 0:
        write_summary(run_dir, summary)
    return json_ready(summary)


def _loop(run: Run, data_iter, log: MetricsLog, spikes: SpikeDetector, progress) -> None:
    """Steps until max_steps, a guard, or a stop signal (checkpointed first)."""
    cfg, env = run.cfg, run.env
    while run.step < cfg.max_steps:
        record = train_step(run, data_iter)
        stop = record.pop("stop_requested")
        record["spike"] = (not record["bad_step"]) and spikes.check(record["loss"])
        log.write(record)
        if progress is not None:
            progress.report(record)
        if run.bad_in_row >= cfg.guards.max_bad_steps:
            raise TrainingStopped(f"{run.bad_in_row} non-finite steps in a row (last at step {record['step']}); "
                                  "weights are unchanged since the last good step")
        checkpoint_if_due(run, stop=stop)
        if stop:
            if env.rank == 0:
                why = run.preempted["flag"] or "a signal on another rank"
                print(f"{why}: checkpoint written at step {run.step}; stopping", file=sys.stderr)
            break


def micro_step(model: torch.nn.Module, batch: dict, device: torch.device, latents=None) -> torch.Tensor:
    """Forward one micro-batch; returns the loss summed over its label tokens (fp32 scalar).

    A batch of whole videos carries ``windows`` (times [N, F], video [N]) for the rows of
    ``video``; with a frozen encoder's ``latents`` cache the videos come in as cached latents
    (train/latents.py) and only the time code, cross-attention and decoder run with gradients."""
    from videollama.model.videollama import Windows, lm_loss
    from videollama.train.latents import visual_inputs

    video, video_index, windows = batch.get("video"), batch.get("video_index"), batch.get("windows")
    input_ids = batch["input_ids"].to(device)
    if latents is not None and video is not None:
        out = model(input_ids=input_ids, **visual_inputs(model, batch, device, latents))
    elif windows is not None:
        out = model(input_ids=input_ids, video=video.to(device), video_index=video_index.to(device),
                    windows=Windows(windows["times"].to(device), windows["video"].to(device)))
    else:
        out = model(input_ids=input_ids,
                    video=video.to(device) if video is not None else None,
                    video_index=video_index.to(device) if video_index is not None and video is not None else None)
    return lm_loss(out.logits.float(), batch["labels"].to(device), reduction="sum")


def _videos(batch: dict) -> int:
    """The videos (clips, or whole videos) of a micro-batch, for the clips_per_s figure."""
    if batch.get("windows") is not None:
        return len(batch["keys"])
    return batch["video"].shape[0] if batch.get("video") is not None else batch["input_ids"].shape[0]


def _next_batch(data_iter, cfg: TrainConfig) -> dict:
    try:
        return next(data_iter)
    except StopIteration:
        raise TrainingStopped(f"the data ran out ({cfg.data.sources}); the training loader should repeat") from None


def _skipped(loader) -> float:
    return float(sum(getattr(loader, "skipped", {}).values()))


def _skipped_by_reason(run: Run) -> dict[str, int]:
    """The loader's skip counts by reason, summed over every rank (collective)."""
    mine = dict(getattr(run.loader, "skipped", {}))
    if run.env.world_size == 1 or not dist.is_initialized():
        return dict(sorted(mine.items()))
    every: list[dict] = [{} for _ in range(run.env.world_size)]
    dist.all_gather_object(every, mine)  # plain str -> int dicts from our own ranks
    total: dict[str, int] = {}
    for counts in every:
        for reason, n in counts.items():
            total[reason] = total.get(reason, 0) + int(n)
    return dict(sorted(total.items()))


# ---- command line --------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="recipe YAML (see configs/)")
    parser.add_argument("--run-dir", help="where metrics, TensorBoard logs and checkpoints go "
                                          "(default runs/<recipe name>)")
    parser.add_argument("--data", help="data source (shard folder/glob or eval JSONL); replaces data.sources")
    parser.add_argument("--max-steps", type=int, help="replaces max_steps")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume a run's checkpoints with settings other than those they were trained with "
                             "(both recipes are kept; config_history.json says from which step)")
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
        summary = train(cfg, run_dir, allow_config_change=args.allow_config_change)
    except TrainingStopped as e:
        print(f"videollama train: stopped: {e}", file=sys.stderr)
        return 3
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(summary, allow_nan=False))
    return 0
