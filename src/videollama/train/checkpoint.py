"""Training checkpoints: sharded, atomic, resumable; and ``videollama export``.

Layout of a run directory::

    RUN_DIR/checkpoints/step-00001000/   one torch.distributed.checkpoint (DCP) folder:
        .metadata, __0_0.distcp, ...     model + optimizer, each rank writing its own shards
        rank-00000.pt ...                per rank: data-loader position and RNG states
        meta.json                        step, LR-scheduler state, world size (rank 0)
    RUN_DIR/checkpoints/latest           the name of the newest complete checkpoint

Atomicity: everything is written into ``.tmp-step-N`` and only then renamed to
``step-N``; ``latest`` is rewritten by writing a temporary file and ``os.replace``-ing it.
A crash at any moment therefore leaves ``latest`` naming a complete checkpoint (the previous
one), and the half-written ``.tmp-*`` folder is removed by the next save. The run directory
must be on a file system every rank can see (as DCP itself requires across nodes).

Per-rank extra state is saved with ``torch.save`` and read back with ``weights_only=True``
(tensors, numbers, strings and containers only: no pickled code).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

CHECKPOINTS = "checkpoints"
LATEST = "latest"


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _write_rank_state(folder: Path, rank: int, state: dict) -> None:
    torch.save(state, folder / f"rank-{rank:05d}.pt")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: str | Path, *, step: int, model, optimizer, scheduler, rank_state: dict,
                    world_size: int, keep: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint folder."""
    root = Path(run_dir) / CHECKPOINTS
    name = step_name(step)
    tmp, final = root / f".tmp-{name}", root / name
    rank = _rank()
    if rank == 0:
        for stale in root.glob(".tmp-*"):  # left by a crash during an earlier save
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()

    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    _write_rank_state(tmp, rank, rank_state)
    _barrier()  # every rank's files are in tmp before it becomes visible

    if rank == 0:
        meta = {"step": step, "world_size": world_size, "scheduler": scheduler.state_dict()}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again after a resume: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _point_latest(root, name)
        _prune(root, keep)
    _barrier()
    return final


def _point_latest(root: Path, name: str) -> None:
    tmp = root / f".{LATEST}.tmp"
    with tmp.open("w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST)
    _fsync_dir(root)


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The folder ``latest`` names, or None for a fresh run."""
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / LATEST
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "meta.json").exists():
        raise ValueError(f"{pointer} names {path}, which is not a complete checkpoint (no meta.json)")
    return path


def find_checkpoint(run_dir: str | Path, step: int | None = None) -> Path:
    if step is None:
        path = latest_checkpoint(run_dir)
        if path is None:
            raise ValueError(f"{run_dir}: no checkpoint ({Path(run_dir) / CHECKPOINTS / LATEST} is missing)")
        return path
    path = Path(run_dir) / CHECKPOINTS / step_name(step)
    if not (path / "meta.json").exists():
        have = sorted(p.name for p in (Path(run_dir) / CHECKPOINTS).glob("step-*"))
        raise ValueError(f"{run_dir}: no complete checkpoint for step {step} (have {have})")
    return path


def load_checkpoint(path: str | Path, *, model, optimizer, scheduler) -> tuple[dict, dict | None]:
    """Collective: load model, optimizer and scheduler in place.

    Returns ``(meta, rank_state)``; ``rank_state`` is None when the checkpoint was written
    by fewer ranks than this rank's index (a resume on a different world size).
    """
    path = Path(path)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    meta = json.loads((path / "meta.json").read_text())
    scheduler.load_state_dict(meta["scheduler"])
    rank_file = path / f"rank-{_rank():05d}.pt"
    rank_state = None
    if meta["world_size"] == (dist.get_world_size() if dist.is_initialized() else 1) and rank_file.exists():
        rank_state = torch.load(rank_file, weights_only=True)
    return meta, rank_state


# ---- export --------------------------------------------------------------------------------------


def export(run_dir: str | Path, out: str | Path, *, step: int | None = None) -> Path:
    """Turn a training checkpoint into a model directory, in one process on CPU.

    The DCP shards are read straight into a model built on CPU (no conversion to a
    torch.save file); then ``save_pretrained`` writes config.json and model.safetensors,
    and the run's tokenizer.json is copied beside them.
    """
    from videollama.config import VideoLlamaConfig
    from videollama.model.videollama import VideoLlama

    run_dir, out = Path(run_dir), Path(out)
    path = find_checkpoint(run_dir, step)
    model_cfg = VideoLlamaConfig.load(run_dir / "model_config.json")
    model = VideoLlama(model_cfg)
    state = {"model": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=str(path), no_dist=True)
    set_model_state_dict(model, state["model"])
    tokenizer = run_dir / "tokenizer.json"
    model.save_pretrained(out, tokenizer=tokenizer if tokenizer.exists() else None)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a training run directory (with checkpoints/)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    parser.add_argument("--out", required=True, help="model directory to write")


def run(args: argparse.Namespace) -> int:
    try:
        out = export(args.run_dir, args.out, step=args.step)
    except ValueError as e:
        print(f"videollama export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
