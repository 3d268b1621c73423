"""``videollama train``: the one training loop, for pre-training and fine-tuning alike.

Runs as one process or under ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE
in the environment). A single process still joins a one-rank process group (collectives,
DCP checkpoints and guards are the same code at every scale); it skips FSDP sharding unless
``parallel.fsdp`` is true or it computes in bf16. Backend: NCCL with CUDA, gloo otherwise.

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
     every ``checkpoint.every`` steps and on SIGTERM.
A restart with the same command resumes from RUN_DIR/checkpoints/latest by itself.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from videollama.config import VideoLlamaConfig, replace
from videollama.train import checkpoint as ckpt
from videollama.train.parallel import build_mesh, parallelize
from videollama.train.recipe import TrainConfig
from videollama.train.schedule import build_scheduler


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (a guard fired); the message says why."""


# ---- distributed setup ---------------------------------------------------------------------------


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    monitor_group: object  # a gloo group for monitored barriers (works beside NCCL too)
    owns_group: bool  # we created the default process group (and must destroy it)


def setup_distributed(timeout_s: float) -> DistEnv:
    """Join the torchrun job, or make a one-rank group for a plain single process."""
    timeout = timedelta(seconds=timeout_s)
    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if use_cuda else "gloo"
    owns = False
    if not dist.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, timeout=timeout)
        else:
            # A private in-memory store: a single process needs no address or port.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        owns = True
    world = dist.get_world_size()
    monitor = dist.new_group(backend="gloo", timeout=timeout) if world > 1 else None
    return DistEnv(rank=dist.get_rank(), world_size=world, local_rank=local_rank,
                   local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world)),
                   device=device, monitor_group=monitor, owns_group=owns)


def monitored_barrier(env: DistEnv, timeout_s: float, where: str) -> None:
    """A barrier that, on timeout, raises naming the ranks that never arrived."""
    if env.world_size == 1:
        return
    try:
        dist.monitored_barrier(group=env.monitor_group, timeout=timedelta(seconds=timeout_s),
                               wait_all_ranks=True)
    except RuntimeError as e:
        raise TrainingStopped(f"rank {env.rank}: ranks did not reach {where} within {timeout_s:.0f} s "
                              f"(hung or dead rank): {e}") from e


# ---- model ---------------------------------------------------------------------------------------


def build_model(cfg: TrainConfig, *, meta: bool = False) -> tuple[torch.nn.Module, VideoLlamaConfig]:
    """The single-device model, identical on every rank (same seed or same weights).

    ``meta``: parameters on the meta device (no memory, no values); :func:`materialize`
    allocates and initialises them after sharding.
    """
    from videollama.model.videollama import VideoLlama

    if cfg.model.init_from:
        if cfg.model.overrides:
            raise ValueError("model.overrides cannot change a model loaded from model.init_from")
        model = VideoLlama.from_pretrained(cfg.model.init_from)
        return model, model.config
    model_cfg = VideoLlamaConfig.from_name(cfg.model.preset)
    if cfg.model.overrides:
        model_cfg = replace(model_cfg, cfg.model.overrides)
    if meta:
        if model_cfg.decoder.tie_word_embeddings:
            raise ValueError("parallel.meta_init does not support tie_word_embeddings; set it to false")
        with torch.device("meta"):
            return VideoLlama(model_cfg), model_cfg
    torch.manual_seed(cfg.seed)
    return VideoLlama(model_cfg), model_cfg


# Parameters that VideoLlama's constructors initialise themselves (not by module type in
# VideoLlama._init_weights): tanh gates at the config's start value (0 by default), learned embeddings at N(0, 0.02).
_ZERO_INIT = ("gate", "attn_gate", "ff_gate")
_NORMAL_INIT = ("latents", "time_embedding", "class_embedding", "temporal_embedding")
_TYPE_INIT = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding, torch.nn.LayerNorm)


def check_meta_init_covers(model: torch.nn.Module) -> None:
    """Raise unless :func:`materialize` knows how to initialise every parameter of ``model``."""
    from videollama.model.decoder import RMSNorm

    covered = {id(p) for m in model.modules() if isinstance(m, (*_TYPE_INIT, RMSNorm))
               for p in m.parameters(recurse=False)}
    for name, p in model.named_parameters():
        if id(p) not in covered and name.rsplit(".", 1)[-1] not in _ZERO_INIT + _NORMAL_INIT:
            raise ValueError(f"meta-device init does not know how to initialise {name}; "
                             "set parallel.meta_init=false")


def materialize(model: torch.nn.Module, device: torch.device, seed: int) -> None:
    """Allocate a meta-built (and already sharded) model on ``device`` and initialise it as
    VideoLlama's constructor does: its ``_init_weights`` per module, plus the table above."""
    model.to_empty(device=device)
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            model._init_weights(module)
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in _ZERO_INIT:
                # The config's gate start values (0 unless a preset opens them, as `shapes` does).
                cfg = model.config
                p.fill_(cfg.decoder.cross_attn_gate_init if name.startswith("decoder.") else cfg.vision.gate_init)
            elif leaf in _NORMAL_INIT:
                torch.nn.init.normal_(p, std=0.02)


def check_same_model(run_dir: Path, model_cfg: VideoLlamaConfig) -> None:
    """A run directory with checkpoints resumes only the model it was started with."""
    saved = run_dir / "model_config.json"
    if ckpt.latest_checkpoint(run_dir) is None or not saved.exists():
        return
    before = VideoLlamaConfig.load(saved).to_dict()
    now = model_cfg.to_dict()
    if before != now:
        diff = sorted(k for k in before if before[k] != now.get(k))
        raise ValueError(f"{run_dir} holds checkpoints of another model (differs in {diff}); "
                         "use a new --run-dir, or the recipe that started this run")


def part_of(name: str) -> str:
    """The recipe's name (see FREEZABLE) of the model part a parameter belongs to."""
    from videollama.model.info import _part_of

    part = _part_of(name)
    return {"vit": "vision", "llama_blocks": "decoder"}.get(part, part)


def freeze(model: torch.nn.Module, parts: list[str]) -> int:
    """Turn off gradients of the named parts; returns the number of frozen parameters."""
    n = 0
    for name, p in model.named_parameters():
        if part_of(name) in parts:
            p.requires_grad_(False)
            n += p.numel()
    return n


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into decayed (matrices) and not decayed groups.

    No decay on: vectors and scalars (norm weights, biases, tanh gates, class/temporal
    embeddings) and embedding tables (token and position embeddings). Call it after FSDP:
    the optimizer must hold the sharded parameters that fully_shard put in place.
    """
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or id(p) in embedding_params else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---- data ----------------------------------------------------------------------------------------


class SyntheticClips:
    """Random clips and token ids, a pure function of (seed, sample index): no files.

    Rank ``r`` of ``w`` takes global micro-batch ``n * w + r`` as its ``n``-th batch, so a
    global step covers the same samples whatever the number of ranks: a 1-rank run and a
    2-rank run with the same global batch see the same data. ``state_dict`` is the position.
    """

    def __init__(self, *, model_cfg: VideoLlamaConfig, batch_size: int, seq_len: int, seed: int,
                 rank: int, world_size: int):
        self.cfg = model_cfg
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.batches_taken = 0
        self.skipped: dict[str, int] = {}

    def state_dict(self) -> dict:
        return {"batches_taken": self.batches_taken}

    def load_state_dict(self, state: dict) -> None:
        self.batches_taken = int(state["batches_taken"])

    def sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        pre = self.cfg.preprocess
        video = torch.randn(pre.num_frames, 3, pre.size, pre.size, generator=g)  # [F, 3, H, W]
        ids = torch.randint(3, self.cfg.decoder.vocab_size, (self.seq_len,), generator=g)  # [T]
        labels = ids.clone()
        labels[: self.seq_len // 4] = -100  # a "prompt" that carries no loss, as in fine-tuning
        return video, ids, labels

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        first = (self.batches_taken * self.world_size + self.rank) * self.batch_size
        samples = [self.sample(first + i) for i in range(self.batch_size)]
        self.batches_taken += 1
        video, ids, labels = (torch.stack(x) for x in zip(*samples))
        return {"video": video, "input_ids": ids, "labels": labels}


def build_loader(cfg: TrainConfig, model_cfg: VideoLlamaConfig, env: DistEnv, tokenizer_path: str | None):
    if cfg.data.kind == "synthetic":
        return SyntheticClips(model_cfg=model_cfg, batch_size=cfg.micro_batch, seq_len=cfg.data.synthetic_seq_len,
                              seed=cfg.seed, rank=env.rank, world_size=env.world_size)
    from videollama.data.shards import VideoTextLoader
    from videollama.data.tokenizer import load_tokenizer

    if tokenizer_path is None:
        raise ValueError("no tokenizer: set `tokenizer:` in the recipe or use model.init_from a model dir")
    return VideoTextLoader(cfg.data.sources, tokenizer=load_tokenizer(tokenizer_path),
                           preprocess=model_cfg.preprocess, task=cfg.data.task, batch_size=cfg.micro_batch,
                           max_len=cfg.data.max_len or model_cfg.decoder.max_seq_len, seed=cfg.seed,
                           rank=env.rank, world_size=env.world_size, num_workers=cfg.data.num_workers,
                           train=True, skip_budget=cfg.data.skip_budget, cache_dir=cfg.data.cache_dir,
                           texts_per_clip=cfg.data.texts_per_clip)


def resolve_tokenizer(cfg: TrainConfig) -> str | None:
    if cfg.tokenizer:
        return cfg.tokenizer
    if cfg.model.init_from and (Path(cfg.model.init_from) / "tokenizer.json").exists():
        return str(Path(cfg.model.init_from) / "tokenizer.json")
    return None


# ---- RNG state (per rank, saved with every checkpoint) -------------------------------------------


def rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int, rank: int) -> None:
    # Ranks draw different numbers (dropout, augmentation) but reproducibly.
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


# ---- metrics -------------------------------------------------------------------------------------


class MetricsLog:
    """RUN_DIR/metrics.jsonl (every step) and TensorBoard scalars, on rank 0 only."""

    TB_KEYS = ("loss", "lr", "grad_norm", "tokens_per_s", "clips_per_s", "mfu", "skipped", "bad_steps")

    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool, resume_step: int):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if resume_step > 0 and self.path.exists():
            # Steps after the checkpoint were lost with the crash and will be logged again.
            kept = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln)["step"] < resume_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key in self.TB_KEYS:
                if record.get(key) is not None:
                    self.tb.add_scalar(f"train/{key}", record[key], record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class SpikeDetector:
    """Flags a loss far above the mean of the recent good steps (logged, not acted on)."""

    def __init__(self, factor: float, window: int):
        self.factor = factor
        self.recent: deque[float] = deque(maxlen=window)

    def check(self, loss: float) -> bool:
        full = len(self.recent) == self.recent.maxlen
        spike = full and loss > self.factor * (sum(self.recent) / len(self.recent))
        self.recent.append(loss)
        return spike


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
    rank, world = env.rank, env.world_size
    accum = cfg.accumulation(world)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
        if torch.cuda.is_available():
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and env.device.type == "cuda")

    meta = cfg.parallel.meta_init
    if meta is None:
        meta = env.device.type == "cuda" and not cfg.model.init_from
    model, model_cfg = build_model(cfg, meta=meta)
    if meta:
        check_meta_init_covers(model)
    frozen = freeze(model, cfg.freeze)
    n_params = sum(p.numel() for p in model.parameters())
    tokenizer_path = resolve_tokenizer(cfg)
    check_same_model(run_dir, model_cfg)  # before anything in run_dir is overwritten
    if rank == 0:
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
    if meta:
        materialize(model, env.device, cfg.seed)
    # After fully_shard: it replaces every parameter by a sharded DTensor parameter.
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = param_groups(model, cfg.optimizer.weight_decay)
    # fused: one kernel per parameter instead of a dozen elementwise ops, each of which costs a
    # DTensor dispatch on sharded parameters (supported on CPU and CUDA).
    optimizer = torch.optim.AdamW(groups, lr=cfg.optimizer.lr, betas=cfg.optimizer.betas,
                                  eps=cfg.optimizer.eps, fused=True)
    scheduler = build_scheduler(optimizer, peak_lr=cfg.optimizer.lr, warmup_steps=cfg.schedule.warmup_steps,
                                max_steps=cfg.max_steps, min_lr=cfg.schedule.min_lr)
    loader = build_loader(cfg, model_cfg, env, tokenizer_path)

    seed_everything(cfg.seed, rank)
    start_step = 0
    latest = ckpt.latest_checkpoint(run_dir)
    if latest is not None:
        meta, rank_state = ckpt.load_checkpoint(latest, model=model, optimizer=optimizer, scheduler=scheduler)
        start_step = meta["step"]
        if rank_state is None:
            print(f"rank {rank}: {latest} has no state for this rank (written by {meta['world_size']} ranks); "
                  "the data loader starts over", file=sys.stderr)
        else:
            loader.load_state_dict(rank_state["loader"])
            set_rng_state(rank_state["rng"])
        if rank == 0:
            print(f"resumed from {latest} at step {start_step}", file=sys.stderr)

    log = MetricsLog(run_dir, enabled=rank == 0, tensorboard=cfg.log.tensorboard, resume_step=start_step)
    spikes = SpikeDetector(cfg.guards.spike_factor, cfg.guards.spike_window)
    flops_per_sample = _flops_per_sample(model_cfg)
    preempted = {"flag": False}
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: preempted.update(flag=True))
    progress = _progress(cfg, rank, start_step)

    bad_in_row, bad_total, last_loss = 0, 0, float("nan")
    data_iter = iter(loader)
    step = start_step
    try:
        while step < cfg.max_steps:
            t0, c0 = time.perf_counter(), time.process_time()
            micro_batches = [_next_batch(data_iter, cfg) for _ in range(accum)]
            if step in cfg.guards.inject_hang_steps and rank == cfg.guards.inject_rank:
                time.sleep(cfg.guards.inject_hang_s)  # test hook: this rank is late
            if cfg.guards.barrier_every and step % cfg.guards.barrier_every == 0:
                # Every rank has its batches: a rank stuck in data loading (or dead) is named here
                # instead of leaving the others blocked in an anonymous all-reduce.
                monitored_barrier(env, cfg.guards.timeout_s, f"step {step} (after loading its batches)")
            local_label_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches)
            label_tokens = _all_reduce([local_label_tokens], env)[0]
            if label_tokens == 0:
                raise TrainingStopped(f"step {step}: the global batch has no label tokens (all -100)")

            loss_sum = torch.zeros((), dtype=torch.float32, device=env.device)  # no GPU sync per micro-batch
            input_tokens = clips = 0
            for m, batch in enumerate(micro_batches):
                # Reduce-scatter gradients once per step, on the last micro-batch only.
                if use_fsdp:
                    model.set_requires_gradient_sync(m == accum - 1)
                summed = _micro_step(model, batch, env.device)
                if step in cfg.guards.inject_nan_steps and rank == cfg.guards.inject_rank:
                    summed = summed * float("nan")  # test hook: a poisoned batch on one rank
                # FSDP averages gradients over ranks; the x world undoes that, so the gradient
                # is the sum over every token of the global batch divided by its token count.
                (summed * (world / label_tokens)).backward()
                loss_sum += summed.detach().float()
                input_tokens += batch["input_ids"].numel()
                clips += batch["video"].shape[0] if batch.get("video") is not None else batch["input_ids"].shape[0]

            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.clip_grad)
            grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            local_bad = not (math.isfinite(float(loss_sum)) and math.isfinite(grad_norm))
            totals = _all_reduce([float(loss_sum), input_tokens, clips, float(local_bad),
                                  float(preempted["flag"]), _skipped(loader)], env)
            loss = totals[0] / label_tokens
            bad = totals[3] > 0  # some rank saw a non-finite value: every rank skips
            lr = scheduler.get_last_lr()[0]
            if bad:
                bad_in_row += 1
                bad_total += 1
            else:
                optimizer.step()
                bad_in_row = 0
                last_loss = loss
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            dt, cpu_dt = time.perf_counter() - t0, time.process_time() - c0

            record = {
                "step": step - 1, "loss": loss if math.isfinite(loss) else None, "lr": lr,
                "grad_norm": grad_norm if math.isfinite(grad_norm) else None,
                "tokens_per_s": totals[1] / dt, "clips_per_s": totals[2] / dt,
                "skipped": int(totals[5]), "bad_step": bad, "bad_steps": bad_total, "time_s": dt,
                "cpu_s": cpu_dt,  # this process's CPU time: robust to other work on the machine
                "spike": (not bad) and spikes.check(loss),
                "mfu": (flops_per_sample * totals[2] / dt / (cfg.log.peak_flops * world)
                        if cfg.log.peak_flops > 0 else None),
            }
            log.write(record)
            if progress is not None:
                progress.update(1)
                if step % cfg.log.every == 0:
                    progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", gnorm=f"{grad_norm:.2f}")
                if record["spike"]:
                    progress.write(f"step {step - 1}: loss spike {loss:.4f} (> {cfg.guards.spike_factor}x recent mean)")
                if bad:
                    progress.write(f"step {step - 1}: non-finite loss or gradient norm; update skipped")

            if bad_in_row >= cfg.guards.max_bad_steps:
                raise TrainingStopped(f"{bad_in_row} non-finite steps in a row (last at step {step - 1}); "
                                      "weights are unchanged since the last good step")
            stop = totals[4] > 0
            due = cfg.checkpoint.every and step % cfg.checkpoint.every == 0
            at_end = step == cfg.max_steps and cfg.checkpoint.at_end
            if due or at_end or stop:
                monitored_barrier(env, cfg.guards.timeout_s, f"checkpoint at step {step}")
                ckpt.save_checkpoint(run_dir, step=step, model=model, optimizer=optimizer, scheduler=scheduler,
                                     rank_state={"loader": loader.state_dict(), "rng": rng_state()},
                                     world_size=world, keep=cfg.checkpoint.keep)
            if stop:
                if rank == 0:
                    print(f"SIGTERM: checkpoint written at step {step}; stopping", file=sys.stderr)
                break
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        log.close()
        if progress is not None:
            progress.close()
    summary = {"steps": step, "start_step": start_step, "loss": last_loss, "bad_steps": bad_total,
               "params": n_params, "frozen_params": frozen, "accumulation": accum, "world_size": world,
               "mesh": dict(zip(mesh.mesh_dim_names, mesh.shape)) if mesh is not None else None, "preempted": bool(preempted["flag"])}
    if rank == 0:
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


def _all_reduce(values: list[float], env: DistEnv) -> list[float]:
    """Sum a few scalars over all ranks in one collective (float64, so counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64)
    if env.world_size > 1:
        if env.device.type == "cuda":
            t = t.to(env.device)
        dist.all_reduce(t)
    return t.cpu().tolist()


def _skipped(loader) -> float:
    return float(sum(getattr(loader, "skipped", {}).values()))


def _flops_per_sample(model_cfg: VideoLlamaConfig) -> float:
    from videollama.model.info import train_flops_per_sample

    return float(train_flops_per_sample(model_cfg))


def _progress(cfg: TrainConfig, rank: int, start_step: int):
    if rank != 0 or not cfg.log.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.max_steps, initial=start_step, desc="train", dynamic_ncols=True)


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
