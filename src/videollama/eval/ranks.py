"""Evaluation across ranks: ``torchrun --nproc-per-node N -m videollama.cli eval ...``.

Each rank loads the model and answers the items of its share of the VIDEOS (video j, in order of
first appearance in the file, goes to rank j mod N, so a video is decoded and encoded by one rank
only and its questions are batched together as in one process); rank 0 gathers every rank's
records and skips (``torch.distributed.gather_object`` over a gloo group, which carries Python
objects on CPU whatever device the model runs on), puts them in the file's order, scores them and
writes ``predictions.jsonl`` and ``metrics.json``: the same files, byte for byte, as one process
writes (the answers do not depend on which other questions share a batch: the harness tests check
that batching and padding change no answer).

The process group is set up by :func:`init_from_env` when torchrun's ``WORLD_SIZE`` is above 1;
:func:`evaluate` reads it from ``torch.distributed`` (a caller may set one up itself).
"""

from __future__ import annotations

import os
from typing import Any

from videollama.data.evalset import EvalItem


def init_from_env() -> bool:
    """Join torchrun's process group (gloo) when ``WORLD_SIZE`` > 1; whether one was joined here."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    dist.init_process_group(backend="gloo")
    return True


def local_device(device: str) -> str:
    """Under torchrun, ``cuda`` means this rank's GPU (``cuda:LOCAL_RANK``); anything else as given."""
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_by_video(items: list[EvalItem], rank: int, world: int) -> list[EvalItem]:
    """The items of ``rank``'s videos (video j in order of first appearance -> rank j mod world)."""
    owner: dict[str, int] = {}
    for it in items:
        owner.setdefault(it.video, len(owner) % world)
    return [it for it in items if owner[it.video] == rank]


def gather_to_first(records: dict[int, dict], skipped: dict[int, Any], world: int
                    ) -> tuple[dict[int, dict], dict[int, Any]] | None:
    """Every rank's ``(records, skipped)`` merged on rank 0 (None on the other ranks)."""
    import torch.distributed as dist

    if world == 1:
        return records, skipped
    rank = dist.get_rank()
    parts: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object((records, skipped), parts, dst=0)
    if rank != 0:
        return None
    merged_records: dict[int, dict] = {}
    merged_skipped: dict[int, Any] = {}
    for part_records, part_skipped in parts:
        merged_records.update(part_records)
        merged_skipped.update(part_skipped)
    return merged_records, merged_skipped


__all__ = ["gather_to_first", "init_from_env", "local_device", "rank_and_world", "shard_by_video"]
