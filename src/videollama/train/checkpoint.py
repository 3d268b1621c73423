"""Training checkpoints: sharded, atomic, resumable; and ``videollama export``.

Layout of a run directory::

    RUN_DIR/checkpoints/step-00001000/   one torch.distributed.checkpoint (DCP) folder:
        .metadata, __0_0.distcp, ...     model + optimizer tensors, each rank writing its own shards
        rank-00000.json ...              per rank: data-loader position and RNG states
        meta.json                        step, LR-scheduler state, optimizer hyper-parameters, world size
    RUN_DIR/checkpoints/latest           the name of the newest complete checkpoint (a step-N folder)

Atomicity: everything is written into ``.tmp-step-N`` and only then renamed to
``step-N``; ``latest`` is rewritten by writing a temporary file and ``os.replace``-ing it.
A crash at any moment therefore leaves ``latest`` naming a complete checkpoint (the previous
one), and the half-written ``.tmp-*`` folder is removed by the next save. The run directory
must be on a file system every rank can see (as DCP itself requires across nodes).

No code from files: the DCP folders hold tensors only and are read through
:class:`videollama.train.safe_dcp.SafeReader` (DCP's own reader unpickles its metadata and
every non-tensor item); everything else (per-rank state, optimizer hyper-parameters, the
schedule) is JSON. ``latest`` must name a step folder directly inside ``checkpoints/``. A resume
whose newest checkpoint is unreadable falls back to the newest intact one, and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from videollama.train import safe_dcp

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
    (folder / f"rank-{rank:05d}.json").write_text(json.dumps(state) + "\n")


def _tensor_only(optim_sd: dict) -> tuple[dict, list]:
    """Split an optimizer state dict into its tensors (for DCP) and its param_groups (for JSON)."""
    for fqn, entry in optim_sd["state"].items():
        for key, value in entry.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"optimizer state {fqn}.{key} is a {type(value).__name__}, not a tensor; "
                                "checkpoints hold tensors only")
    return {"state": optim_sd["state"]}, optim_sd["param_groups"]


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
    optim_tensors, param_groups = _tensor_only(optim_sd)
    dcp.save({"model": model_sd, "optim": optim_tensors}, checkpoint_id=str(tmp))
    _write_rank_state(tmp, rank, rank_state)
    _barrier()  # every rank's files are in tmp before it becomes visible

    if rank == 0:
        meta = {"step": step, "world_size": world_size, "scheduler": scheduler.state_dict(),
                "optimizer_param_groups": param_groups}
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


_STEP_NAME = re.compile(r"step-\d{8}")


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The folder ``latest`` names, or None for a fresh run.

    It must name a step folder directly inside ``checkpoints/`` (``step-00001000``): an edited
    pointer cannot send a run to a checkpoint elsewhere."""
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / LATEST
    if not pointer.exists():
        return None
    from videollama.data.errors import BadSample
    from videollama.data.safe_io import read_bounded

    try:  # a regular file of a few bytes: a FIFO or a device here is a bad pointer, not a hang
        name = read_bounded(pointer, 4096, "checkpoint pointer").decode(errors="replace")[:64].strip()
    except BadSample as e:
        raise ValueError(f"{pointer} is not a step name: {e}") from e
    if not _STEP_NAME.fullmatch(name):
        raise ValueError(f"{pointer} must name a step folder of this run (like step-00001000), not {name!r}")
    path = root / name
    if path.is_symlink() or not (path / "meta.json").is_file():
        raise ValueError(f"{pointer} names {path}, which is not a complete checkpoint (no meta.json)")
    return path


def intact_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete step folders of a run, newest first (what a resume falls back to)."""
    root = Path(run_dir) / CHECKPOINTS
    found = [p for p in root.glob("step-*") if _STEP_NAME.fullmatch(p.name) and not p.is_symlink()
             and (p / "meta.json").is_file()]
    return sorted(found, reverse=True)


def find_checkpoint(run_dir: str | Path, step: int | None = None) -> Path:
    if step is None:
        path = latest_checkpoint(run_dir)
        if path is None:
            raise ValueError(f"{run_dir}: no checkpoint ({Path(run_dir) / CHECKPOINTS / LATEST} is missing)")
        return path
    path = Path(run_dir) / CHECKPOINTS / step_name(step)
    if path.is_symlink() or not (path / "meta.json").is_file():
        have = sorted(p.name for p in (Path(run_dir) / CHECKPOINTS).glob("step-*"))
        raise ValueError(f"{run_dir}: no complete checkpoint for step {step} (have {have})")
    return path


def load_checkpoint(path: str | Path, *, model, optimizer, scheduler) -> tuple[dict, dict | None]:
    """Collective: load model, optimizer and scheduler in place.

    Returns ``(meta, rank_state)``; ``rank_state`` is None when the checkpoint was written
    by fewer ranks than this rank's index (a resume on a different world size).
    """
    path = Path(path)
    meta = _read_json(path / "meta.json")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    optim_tensors, _ = _tensor_only(optim_sd)
    state = {"model": model_sd, "optim": optim_tensors}
    safe_dcp.load(state, path)
    groups = meta.get("optimizer_param_groups")
    if not isinstance(groups, list):
        raise ValueError(f"{path / 'meta.json'}: no optimizer_param_groups (written by an older version?)")
    for group in groups:  # JSON made the betas a list; AdamW keeps a tuple
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict={"state": state["optim"]["state"], "param_groups": groups})
    scheduler.load_state_dict(meta["scheduler"])
    rank_file = path / f"rank-{_rank():05d}.json"
    rank_state = None
    if meta["world_size"] == (dist.get_world_size() if dist.is_initialized() else 1) and rank_file.exists():
        rank_state = _read_json(rank_file)
    return meta, rank_state


def _read_json(path: Path) -> dict:
    from videollama.data.safe_io import read_json_object

    try:
        return read_json_object(path, "checkpoint state", limit=64 << 20)
    except OSError as e:
        raise ValueError(f"{path}: not readable JSON ({e})") from e


# ---- export --------------------------------------------------------------------------------------


def export(run_dir: str | Path, out: str | Path, *, step: int | None = None, merged: bool = False) -> Path:
    """Turn a training checkpoint into a model directory, in one process on CPU.

    The DCP shards are read straight into a model built on CPU (no conversion to a
    torch.save file); then ``save_pretrained`` writes config.json and model.safetensors,
    and the run's tokenizer.json is copied beside them. A LoRA run (``lora.r > 0`` in its
    train_config.json) gives its adapter in peft's format instead (``videollama.train.lora``:
    adapter_config.json + adapter_model.safetensors, only the adapter tensors are read), or with
    ``merged`` a plain model directory with the adapter folded into the weights.
    """
    from videollama.config import VideoLlamaConfig
    from videollama.model.videollama import VideoLlama

    run_dir, out = Path(run_dir), Path(out)
    path = find_checkpoint(run_dir, step)
    model_cfg = VideoLlamaConfig.load(run_dir / "model_config.json")
    lora = _run_lora(run_dir)
    with torch.device("meta"):  # no memory until the checkpoint is known to fit the config
        model = VideoLlama(model_cfg)
    tuner = None
    if lora is not None:
        from videollama.train.lora import apply_lora, is_lora_param

        if merged and lora.quantize != "none":
            raise ValueError(f"{run_dir} is a QLoRA run (base weights in NF4): export its adapter and use "
                             "`videollama merge --model BASE` with the full-precision base")
        tuner = apply_lora(model, lora, quantize=False)
    wanted = {k: tuple(t.shape) for k, t in model.state_dict().items()
              if merged or lora is None or is_lora_param(k)}
    safe_dcp.check_shapes(path, {f"model.{k}": v for k, v in wanted.items()},
                          needed_by=str(run_dir / "model_config.json"))
    model.to_empty(device="cpu")
    model.tie_weights()
    state = {"model": {k: v for k, v in get_model_state_dict(model).items() if k in wanted}}
    safe_dcp.load(state, path, no_dist=True)
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    tokenizer = run_dir / "tokenizer.json"
    if lora is not None and not merged:
        from videollama.train.lora import save_adapter

        base = _train_config(run_dir).model.init_from
        return save_adapter(model, lora, out, base=base)
    if tuner is not None:
        model = tuner.merge_and_unload()
    model.save_pretrained(out, tokenizer=tokenizer if tokenizer.exists() else None)
    return out


def _train_config(run_dir: Path):
    from videollama.train.recipe import TrainConfig

    return TrainConfig.load(run_dir / "train_config.json")


def _run_lora(run_dir: Path):
    """The run's LoraSection, or None for a run without LoRA (or one older than train_config.json)."""
    if not (run_dir / "train_config.json").is_file():
        return None
    lora = _train_config(run_dir).lora
    return lora if lora.r > 0 else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a training run directory (with checkpoints/)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    parser.add_argument("--out", required=True, help="model directory to write (a LoRA run: its adapter)")
    parser.add_argument("--merged", action="store_true",
                        help="a LoRA run: write a plain model directory with the adapter merged in")
    parser.add_argument("--overwrite", action="store_true", help="replace the model or adapter directory already "
                        "in --out (whole: written beside it, then swapped)")


def run(args: argparse.Namespace) -> int:
    from videollama.data.safe_io import written_beside
    from videollama.train.out_dir import check_out, is_adapter_dir, is_model_dir

    out = Path(args.out)
    # `export RUN --out RUN/model` is usual: inside the run is allowed, the run folder itself is not.
    check_out(out, overwrite=args.overwrite, inputs={"run directory": Path(args.run_dir)}, command="export",
              replaceable={"a model directory": is_model_dir, "an adapter directory": is_adapter_dir},
              inside_allowed=("run directory",))
    with written_beside(out) as staging:  # a ValueError is one line from the command line
        export(args.run_dir, staging, step=args.step, merged=args.merged)
    print(f"wrote {out}")
    return 0
