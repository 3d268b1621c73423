"""The curation pipeline, stage by stage, over one table of clip rows.

    sources (inputs.py)
      -> per video (engine pool / Ray map): probe, scene clips, each clip re-encoded, frames
         sampled for every model's spec, motion score                         (cutting.py)
      -> cheap filters: duration, resolution, motion                          (filters.py)
      -> CLIP similarity per candidate text (--clip)                         (clipscore.py)
      -> PMI per candidate text (--scorer)                                    (pmi.py)
      -> alignment filter (threshold or keep-fraction) and caption choice     (filters.py)
      -> automated captions where no candidate passes (--captioner)           (pmi.py)
      -> near-duplicate removal                                               (dedup.py)
      -> shards, clips.parquet, stats.json, stats.png                         (output.py)

Rows are dicts of JSON-able columns; every stage adds columns. Per-video and per-batch work
leaves completion records under ``OUT/.work`` (records.py), read back by this module whatever
engine ran them; the cheap stages after them are recomputed on every run. So a killed run,
rerun with the same command, redoes only unfinished work and ends with the same output.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from videollama.curate.clipfiles import Spec, load_frames
from videollama.curate.config import PMI_EXTRA_COLUMNS, CurateConfig
from videollama.curate.filters import alignment_threshold, best_clip_of_texts, cheap_filter, choose_caption
from videollama.curate.records import make_batches, read_record, video_record

log = logging.getLogger(__name__)


def _specs(cfg: CurateConfig) -> dict[str, Spec]:
    """The frame specs each stage needs, by stage: models' from their folders (no torch here)."""
    specs: dict[str, Spec] = {"motion": (cfg.motion.num_frames, cfg.motion.fps, cfg.motion.size)}
    if cfg.clip.model:
        from videollama.curate.clipscore import clip_spec

        specs["clip"] = clip_spec(cfg.clip.model, cfg.clip.num_frames, cfg.clip.fps)
    if cfg.scorer.model:
        from videollama.curate.pmi import model_spec

        specs["pmi"] = model_spec(cfg.scorer.model)[0]
    if cfg.captioner.model:
        from videollama.curate.pmi import model_spec

        specs["caption"] = model_spec(cfg.captioner.model)[0]
    return specs


def _check_models(cfg: CurateConfig) -> None:
    """Settings that need a model must have it, before any work is done."""
    need = {"pmi": (cfg.scorer.model, "--scorer"), "clip": (cfg.clip.model, "--clip")}
    if cfg.metric is not None and not need[cfg.metric][0]:
        raise ValueError(f"filter.metric {cfg.metric} needs {need[cfg.metric][1]} (or filter.metric=auto)")
    if cfg.dedup.enabled and cfg.dedup.embedding != "pixels":
        stage = "pmi" if cfg.dedup.embedding == "scorer" else "clip"
        if not need[stage][0]:
            raise ValueError(f"dedup.embedding {cfg.dedup.embedding} needs {need[stage][1]}")


def _check_work(work: Path, cfg: CurateConfig, input_path: Path) -> None:
    """A resumed run must be the same run: refuse an OUT whose records came from other settings."""
    identity = {"input": str(input_path.resolve()),
                "config": {k: v for k, v in cfg.to_dict().items() if k not in ("engine", "workers")}}
    path = work / "run.json"
    if path.exists():
        previous = read_record(path)
        if previous is not None and previous != json.loads(json.dumps(identity)):
            raise ValueError(f"{work.parent} holds a curate run with other input or settings (see {path}); "
                             "use another --out, or delete it to start again")
    else:
        from videollama.curate.records import write_record

        write_record(path, identity)


class _Progress:
    def __init__(self, total: int, desc: str):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, disable=None, leave=False)

    def __call__(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def curate(input_path: str | Path, out: str | Path, cfg: CurateConfig) -> dict[str, Any]:
    """Run (or resume) curation of ``input_path`` into ``out``; returns the stats written to stats.json."""
    from videollama.curate.engines import make_engine
    from videollama.curate.inputs import read_inputs
    from videollama.curate.output import plot_stats, write_shards_of, write_stats, write_table
    from videollama.data.writer import parse_size

    t_start = time.perf_counter()
    input_path, out = Path(input_path), Path(out)
    _check_models(cfg)
    sources, skips = read_inputs(input_path, allow_outside_root=cfg.allow_outside_root)
    if out.resolve() == input_path.resolve() or input_path.resolve().is_relative_to(out.resolve()):
        raise ValueError(f"--out {out} holds the input {input_path}; write somewhere else")
    work = out / ".work"
    work.mkdir(parents=True, exist_ok=True)
    _check_work(work, cfg, input_path)
    specs = _specs(cfg)
    seconds: dict[str, float] = {}
    stats: dict[str, Any] = {"engine": cfg.engine, "resumed_batches": {}, "seconds": seconds}

    engine = make_engine(cfg.engine, cfg.workers)
    try:
        # ---- per video ------------------------------------------------------------------------
        settings = {"min_clip_s": cfg.scenes.min_clip_s, "max_clip_s": cfg.scenes.max_clip_s,
                    "threshold": cfg.scenes.threshold, "crf": cfg.encode.crf,
                    "max_frames": cfg.encode.max_frames_per_video,
                    "specs": [list(s) for s in dict.fromkeys(specs.values())]}
        todo = [s for s in sources if read_record(video_record(work, s["source_id"])) is None]
        stats["resumed_videos"] = len(sources) - len(todo)
        t0 = time.perf_counter()
        progress = _Progress(len(todo), "videos")
        engine.map_videos(todo, settings, str(work), progress)
        progress.close()
        seconds["videos_wall"] = time.perf_counter() - t0
        rows, skipped, by_reason = [], {}, {}
        video_errors = 0
        for s in sources:
            record = read_record(video_record(work, s["source_id"]))
            for stage, sec in record["seconds"].items():
                seconds[stage] = seconds.get(stage, 0.0) + sec
            if record["error"]:
                reason, message = record["error"]
                video_errors += 1
                by_reason[reason] = by_reason.get(reason, 0) + 1
                skipped[s["source_id"]] = [reason, message]
            rows.extend(record["rows"])
        for reason, where, message in skips:
            by_reason[reason] = by_reason.get(reason, 0) + 1
            skipped[where] = [reason, message]
        rows.sort(key=lambda r: r["clip_id"])
        metas = {s["source_id"]: s["meta"] for s in sources}
        for row in rows:
            row.update(scores=[{"text": t, "clip": None, "pmi": None, **dict.fromkeys(PMI_EXTRA_COLUMNS)}
                                   for t in row["texts"]], kept=False,
                       drop_reason=cheap_filter(row, cfg.filter), caption=None, caption_source=None,
                       duplicate_of=None)
        counts = {"sources": len(sources) + len(skips), "sources_ok": len(sources) - video_errors,
                  "corrupt": sum(by_reason.values()), "clips": len(rows)}
        live = [r for r in rows if r["drop_reason"] is None]
        counts["after_filters"] = len(live)

        # ---- model scores ---------------------------------------------------------------------
        embeddings: dict[str, dict[str, list[float]]] = {}
        for stage, section in (("clip", cfg.clip), ("pmi", cfg.scorer)):
            if not section.model:
                continue
            model_settings = {"model": section.model, "device": cfg.device, "torch_threads": cfg.torch_threads,
                              "num_frames": getattr(section, "num_frames", 0), "fps": getattr(section, "fps", 0.0)}
            reference = reference_clips(live, cfg.scorer.reference_clips) if stage == "pmi" else None
            if reference:
                stats["reference_clips"] = reference
            results = _run_stage(engine, stage, model_settings, [(r["clip_id"], r["texts"]) for r in live],
                                 section.batch_size, work, stats, seconds, reference=reference)
            embeddings[stage] = {}
            for row in live:
                result = results[row["clip_id"]]
                for j, (entry, score) in enumerate(zip(row["scores"], result["scores"])):
                    entry[stage] = score
                    if stage == "pmi":  # the other priors and reductions (filter.pmi_prior, pmi_reduce)
                        for column in PMI_EXTRA_COLUMNS:
                            entry[column] = result[column][j]
                embeddings[stage][row["clip_id"]] = result["embedding"]

        # ---- alignment and captions ----------------------------------------------------------
        metric = cfg.score_column  # the score column thresholded (pmi, pmi_sum, pmi_span or clip)
        threshold = alignment_threshold(live, metric, cfg.filter) if metric else None
        stats.update(metric=metric, threshold=threshold, assign=cfg.filter.assign,
                     pmi_prior=cfg.filter.pmi_prior, pmi_reduce=cfg.filter.pmi_reduce)
        need_caption = []
        assigned = best_clip_of_texts(live, metric) if metric and cfg.filter.assign == "best_clip" else None
        for row in live:
            caption = choose_caption(row, metric, threshold, assigned)
            if caption is not None:
                row.update(caption=caption, caption_source="input")
            else:
                need_caption.append(row)
        counts["aligned"] = len(live) - len(need_caption)
        if cfg.captioner.model:
            model_settings = {"model": cfg.captioner.model, "device": cfg.device,
                              "torch_threads": cfg.torch_threads, "max_new_tokens": cfg.captioner.max_new_tokens}
            results = _run_stage(engine, "caption", model_settings, [(r["clip_id"], []) for r in need_caption],
                                 cfg.captioner.batch_size, work, stats, seconds)
            for row in need_caption:
                caption = results[row["clip_id"]]["caption"].strip()
                if caption:
                    row.update(caption=caption, caption_source="generated")
                else:
                    row["drop_reason"] = "empty_caption"
        else:
            for row in need_caption:
                row["drop_reason"] = "misaligned" if row["texts"] else "no_text"
        counts["captioned"] = sum(r["caption_source"] == "generated" for r in live)
        live = [r for r in live if r["drop_reason"] is None]
    finally:
        engine.close()

    # ---- near-duplicates -----------------------------------------------------------------------
    t0 = time.perf_counter()
    if cfg.dedup.enabled and live:
        from videollama.curate.dedup import near_duplicates, pixel_embedding

        ids = [r["clip_id"] for r in live]
        kind = cfg.dedup.embedding
        if kind == "pixels":
            vectors = np.stack([pixel_embedding(load_frames(work, specs["motion"], i)) for i in ids])
        else:
            stage = "pmi" if kind == "scorer" else "clip"
            vectors = np.array([embeddings[stage][i] for i in ids])
        duplicates = near_duplicates(ids, vectors, cfg.dedup.threshold)
        for row in live:
            if row["clip_id"] in duplicates:
                row.update(drop_reason="duplicate", duplicate_of=duplicates[row["clip_id"]])
    seconds["dedup"] = time.perf_counter() - t0
    for row in live:
        row["kept"] = row["drop_reason"] is None
    counts["kept"] = sum(r["kept"] for r in rows)
    counts["duplicates"] = sum(r["drop_reason"] == "duplicate" for r in rows)

    # ---- output ---------------------------------------------------------------------------------
    t0 = time.perf_counter()
    shards = write_shards_of(rows, metas, out, work, max_bytes=parse_size(cfg.output.shard_size),
                             max_count=cfg.output.max_count, prefix=cfg.output.prefix)
    write_table(rows, out / "clips.parquet")
    seconds["output"] = time.perf_counter() - t0
    dropped: dict[str, int] = {}
    for row in rows:
        if row["drop_reason"]:
            dropped[row["drop_reason"]] = dropped.get(row["drop_reason"], 0) + 1
    seconds["total_wall"] = time.perf_counter() - t_start
    stats.update(counts=counts, dropped=dict(sorted(dropped.items())), corrupt=dict(sorted(by_reason.items())),
                 skipped_sources=dict(sorted(skipped.items())), shards=len(shards))
    if cfg.output.plot:
        plot_stats(rows, stats, out / "stats.png")
    write_stats(stats, out / "stats.json")
    return stats


def reference_clips(live: list[dict], count: int) -> list[str]:
    """The ``count`` clip ids of the marginal prior's reference set: evenly spaced over the sorted
    ids of the clips that passed the cheap filters (all of them when there are fewer)."""
    ids = sorted(r["clip_id"] for r in live)
    if count <= 0 or not ids:
        return []
    if count >= len(ids):
        return ids
    return [ids[(i * len(ids)) // count] for i in range(count)]


def _run_stage(engine, stage: str, settings: dict, clips: list[tuple[str, list[str]]], batch_size: int,
               work: Path, stats: dict, seconds: dict, reference: list[str] | None = None) -> dict[str, dict]:
    """Run one model stage over ``clips`` in batches (skipping batches with a record); results by clip id."""
    batches = make_batches(stage, clips, batch_size, work, reference=reference)
    todo = [b for b in batches if read_record(Path(b["record"])) is None]
    stats["resumed_batches"][stage] = len(batches) - len(todo)
    t0 = time.perf_counter()
    progress = _Progress(len(todo), stage)
    engine.map_batches(stage, settings, todo, str(work), progress)
    progress.close()
    seconds[f"{stage}_wall"] = time.perf_counter() - t0
    results: dict[str, dict] = {}
    for batch in batches:
        record = read_record(Path(batch["record"]))
        if record is None or record["clip_ids"] != batch["clip_ids"]:
            raise RuntimeError(f"{batch['record']}: the {stage} batch did not complete")
        seconds[stage] = seconds.get(stage, 0.0) + record["seconds"]
        results.update(zip(record["clip_ids"], record["results"]))
    return results
