"""Completion records under ``OUT/.work/``, and the model-stage batches that write them.

Every finished unit of work leaves one JSON file, written whole or not at all (temp file, then
``os.replace``): ``videos/SOURCE_ID.json`` per source video, ``STAGE/NNNNNN-DIGEST.json`` per
model batch (the digest names the clip ids of the batch, so a batch is reused only for exactly
the clips it scored). A run killed at any point leaves finished records and at most some temp
files; the same command then redoes only what has no record. Both engines run the same
functions here and only differ in where they run them.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from videollama.curate.clipfiles import atomic_write, load_frames

MODEL_STAGES = ("clip", "pmi", "caption")


def write_record(path: Path, value: Any) -> None:
    atomic_write(path, (json.dumps(value, sort_keys=True) + "\n").encode())


def read_record(path: Path) -> Any | None:
    """A finished record, or None when there is none (a damaged one counts as none: redone)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def video_record(work: Path, source_id: str) -> Path:
    return work / "videos" / f"{source_id}.json"


def make_batches(stage: str, clips: list[tuple[str, list[str]]], batch_size: int, work: Path,
                 reference: list[str] | None = None) -> list[dict]:
    """``clips`` (clip id, texts), sorted by id -> batches of ``batch_size``, each with its record path.
    ``reference``: the clip ids of the PMI stage's marginal prior (``curate.pmi``), part of every
    batch and of its record's digest (a batch scored against other reference clips is redone)."""
    batches = []
    for index, first in enumerate(range(0, len(clips), batch_size)):
        part = clips[first:first + batch_size]
        ids = [c for c, _ in part]
        digest = hashlib.sha1("\n".join(ids + ["reference:", *(reference or [])]).encode()).hexdigest()[:12]
        batch = {"stage": stage, "index": index, "clip_ids": ids, "texts": [t for _, t in part],
                 "record": str(work / stage / f"{index:06d}-{digest}.json")}
        if reference:
            batch["reference"] = list(reference)
        batches.append(batch)
    return batches


def build_stage_model(stage: str, settings: dict[str, Any]):
    """The model object of a stage: ``clip`` -> ClipScorer, ``pmi`` -> PmiScorer, ``caption`` -> Captioner."""
    import torch

    torch.set_num_threads(int(settings["torch_threads"]))
    device = settings["device"]
    if stage == "clip":
        from videollama.curate.clipscore import ClipScorer

        return ClipScorer(settings["model"], num_frames=settings["num_frames"], fps=settings["fps"], device=device)
    if stage == "pmi":
        from videollama.curate.pmi import PmiScorer

        return PmiScorer(settings["model"], device=device)
    if stage == "caption":
        from videollama.curate.pmi import Captioner

        return Captioner(settings["model"], device=device, max_new_tokens=settings["max_new_tokens"])
    raise ValueError(f"unknown model stage {stage!r}")


def run_batch(model, batch: dict[str, Any], work: str) -> None:
    """Score (or caption) one batch with a stage's model and write its completion record."""
    t0 = time.perf_counter()
    work_dir = Path(work)
    frames = [load_frames(work_dir, model.spec, clip_id) for clip_id in batch["clip_ids"]]
    if batch["stage"] == "caption":
        results = [{"caption": c} for c in model.caption(frames)]
    else:
        extra = {}  # the PMI stage's marginal prior: its reference clips, encoded once per set
        if batch.get("reference"):
            extra["reference"] = model.reference_latents(
                batch["reference"], [load_frames(work_dir, model.spec, c) for c in batch["reference"]])
        results = model.score(list(zip(frames, batch["texts"])), **extra)
    write_record(Path(batch["record"]), {"clip_ids": batch["clip_ids"], "results": results,
                                         "seconds": time.perf_counter() - t0})
