"""The curation pipeline, stage by stage, over one list of typed clip rows (``rows.ClipRow``).

    sources (inputs.py), the --out rule (outdir.py)                          :func:`_prepare`
      -> per video (engine pool / Ray map): probe, scene clips, each clip re-encoded, frames
         sampled for every model's spec, motion score            (cutting.py) :func:`_cut_videos`
      -> cheap filters: duration, resolution, motion             (filters.py) :func:`_cheap_filters`
      -> CLIP similarity per candidate text (--clip)           (clipscore.py) :func:`_model_scores`
      -> PMI per candidate text (--scorer)                          (pmi.py)
      -> alignment filter (threshold or keep-fraction), caption choice,
         automated captions where no candidate passes (--captioner)           :func:`_align_and_caption`
      -> near-duplicate removal, each group keeping its best-aligned clip
                                                                  (dedup.py) :func:`_drop_duplicates`
      -> shards, clips.parquet, stats.json, stats.png            (output.py) :func:`_write_outputs`

Every stage fills in its own columns of the rows and reports its counts and timings to the
run's ``RunStats`` (run_stats.py, what stats.json holds). Per-video and per-batch work leaves
completion records under ``OUT/.work`` (records.py), read back by this module whatever engine
ran them; the cheap stages after them are recomputed on every run. So a killed run, rerun with
the same command, redoes only unfinished work and ends with the same output. (An ``--overwrite``
run works the same way in the staging folder beside ``OUT``, swapped in when complete.)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from videollama.curate.clipfiles import Spec, load_frames
from videollama.curate.config import PMI_EXTRA_COLUMNS, CurateConfig, FilterSection
from videollama.curate.filters import alignment_threshold, best_clip_of_texts, cheap_filter, choose_caption
from videollama.curate.records import make_batches, read_record, video_record
from videollama.curate.rows import ClipRow, DropReason
from videollama.curate.run_stats import RunStats
from videollama.data.read_policy import ReadPolicy

log = logging.getLogger(__name__)

Embeddings = dict[str, dict[str, list[float]]]  # model stage -> clip id -> the clip's embedding


def curate(input_path: str | Path, out: str | Path, cfg: CurateConfig, *, overwrite: bool = False) -> dict[str, Any]:
    """Run (or resume) curation of ``input_path`` into ``out``; returns the stats written to stats.json.

    ``out`` follows ``outdir.py``'s rule: new or empty, the same run resumed, or with
    ``overwrite`` a previous curate output replaced whole once the new run is complete."""
    from videollama.curate.engines import make_engine
    from videollama.curate.outdir import swap_in

    stats = RunStats(cfg.engine)
    input_path, out = Path(input_path), Path(out)
    sources, skips, target = _prepare(input_path, out, cfg, overwrite)
    work = target / ".work"
    specs = _specs(cfg)
    engine = make_engine(cfg.engine, cfg.workers)
    try:
        rows = _cut_videos(engine, sources, skips, _video_settings(cfg, specs), work, stats)
        live = _cheap_filters(rows, cfg.filter, stats)
        embeddings = _model_scores(engine, live, cfg, work, stats)
        live = _align_and_caption(engine, live, cfg, work, stats)
    finally:
        engine.close()
    _drop_duplicates(live, embeddings, cfg, specs["motion"], work, stats)
    report = _write_outputs(rows, sources, target, work, cfg, stats)
    if target != out:
        swap_in(target, out)
    return report


# ---- inputs and checks ----------------------------------------------------------------------
def _prepare(input_path: Path, out: Path, cfg: CurateConfig, overwrite: bool
             ) -> tuple[list[dict], list[tuple[str, str, str]], Path]:
    """Check the settings and the folders, read the sources; returns (sources, skipped inputs
    as (reason, where, message), the folder the run writes into). Nothing is computed before
    these checks."""
    from videollama.curate.inputs import read_inputs
    from videollama.curate.outdir import choose_target, run_record
    from videollama.curate.records import write_record

    _check_models(cfg)
    sources, skips = read_inputs(input_path, policy=ReadPolicy(allow_outside_root=cfg.allow_outside_root))
    identity = json.loads(json.dumps({"input": str(input_path.resolve()), "config": {
        k: v for k, v in cfg.to_dict().items() if k not in ("engine", "workers")}}))
    target = choose_target(input_path, out, identity, overwrite)
    (target / ".work").mkdir(parents=True, exist_ok=True)
    if read_record(run_record(target)) is None:  # a new run (a resumed one has its record already)
        write_record(run_record(target), identity)
    return sources, skips, target


def _check_models(cfg: CurateConfig) -> None:
    """Settings that need a model must have it, before any work is done."""
    need = {"pmi": (cfg.scorer.model, "--scorer"), "clip": (cfg.clip.model, "--clip")}
    if cfg.metric is not None and not need[cfg.metric][0]:
        raise ValueError(f"filter.metric {cfg.metric} needs {need[cfg.metric][1]} (or filter.metric=auto)")
    if cfg.dedup.enabled and cfg.dedup.embedding != "pixels":
        stage = "pmi" if cfg.dedup.embedding == "scorer" else "clip"
        if not need[stage][0]:
            raise ValueError(f"dedup.embedding {cfg.dedup.embedding} needs {need[stage][1]}")


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


class _Progress:
    def __init__(self, total: int, desc: str):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, disable=None, leave=False)

    def __call__(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


# ---- per video ------------------------------------------------------------------------------
def _video_settings(cfg: CurateConfig, specs: dict[str, Spec]) -> dict[str, Any]:
    """``cutting.process_video``'s settings (the motion spec first, then each other distinct spec)."""
    return {"min_clip_s": cfg.scenes.min_clip_s, "max_clip_s": cfg.scenes.max_clip_s,
            "threshold": cfg.scenes.threshold, "crf": cfg.encode.crf,
            "max_frames": cfg.encode.max_frames_per_video,
            "specs": [list(s) for s in dict.fromkeys(specs.values())]}


def _cut_videos(engine, sources: list[dict], skips: list[tuple[str, str, str]], settings: dict[str, Any],
                work: Path, stats: RunStats) -> list[ClipRow]:
    """Every source without a record through ``process_video`` (on the engine); then every
    source's clip rows from the records, sorted by clip id. Unusable sources are counted."""
    todo = [s for s in sources if read_record(video_record(work, s["source_id"])) is None]
    stats.resumed_videos = len(sources) - len(todo)
    with stats.timed("videos_wall"):
        progress = _Progress(len(todo), "videos")
        engine.map_videos(todo, settings, str(work), progress)
        progress.close()
    rows: list[ClipRow] = []
    video_errors = 0
    for source in sources:
        record = read_record(video_record(work, source["source_id"]))
        for stage, seconds in record["seconds"].items():
            stats.add_seconds(stage, seconds)
        if record["error"]:
            reason, message = record["error"]
            video_errors += 1
            stats.skip_source(source["source_id"], reason, message)
        for reason, n in record.get("dropped_scenes", {}).items():  # (records of older runs have none)
            stats.drop_scenes(reason, n)
        rows.extend(ClipRow.from_record(r) for r in record["rows"])
    for reason, where, message in skips:
        stats.skip_source(where, reason, message)
    rows.sort(key=lambda r: r.clip_id)
    stats.count("sources", len(sources) + len(skips))
    stats.count("sources_ok", len(sources) - video_errors)
    stats.count("corrupt", video_errors + len(skips))
    stats.count("scenes", len(rows) + sum(stats.dropped_scenes.values()))
    stats.count("clips", len(rows))
    return rows


# ---- filters, scores, captions ----------------------------------------------------------------
def _cheap_filters(rows: list[ClipRow], cfg: FilterSection, stats: RunStats) -> list[ClipRow]:
    """Drop what fails the filters that need no model; returns the rows left (the same objects)."""
    for row in rows:
        row.drop_reason = cheap_filter(row, cfg)
    live = [r for r in rows if r.drop_reason is None]
    stats.count("after_filters", len(live))
    return live


def _model_settings(cfg: CurateConfig, stage: str) -> dict[str, Any]:
    """What ``records.build_stage_model`` needs to build a stage's model (in any engine's worker)."""
    base = {"device": cfg.device, "torch_threads": cfg.torch_threads}
    if stage == "caption":
        return {"model": cfg.captioner.model, **base, "max_new_tokens": cfg.captioner.max_new_tokens}
    section = cfg.clip if stage == "clip" else cfg.scorer
    return {"model": section.model, **base, "num_frames": getattr(section, "num_frames", 0),
            "fps": getattr(section, "fps", 0.0)}


def _model_scores(engine, live: list[ClipRow], cfg: CurateConfig, work: Path, stats: RunStats) -> Embeddings:
    """Each model stage that has a model (CLIP, then PMI) scores every candidate text of the live
    rows into their ``scores``; returns each stage's clip embeddings (for dedup)."""
    embeddings: Embeddings = {}
    for stage, section in (("clip", cfg.clip), ("pmi", cfg.scorer)):
        if not section.model:
            continue
        reference = reference_clips(live, cfg.scorer.reference_clips) if stage == "pmi" else None
        if reference:
            stats.note(reference_clips=reference)
        results = _run_stage(engine, stage, _model_settings(cfg, stage), [(r.clip_id, r.texts) for r in live],
                             section.batch_size, work, stats, reference=reference)
        embeddings[stage] = {}
        for row in live:
            result = results[row.clip_id]
            for j, (entry, score) in enumerate(zip(row.scores, result["scores"])):
                entry.set(stage, score)
                if stage == "pmi":  # the other priors and reductions (filter.pmi_prior, pmi_reduce)
                    for column in PMI_EXTRA_COLUMNS:
                        entry.set(column, result[column][j])
            embeddings[stage][row.clip_id] = result["embedding"]
    return embeddings


def _align_and_caption(engine, live: list[ClipRow], cfg: CurateConfig, work: Path,
                       stats: RunStats) -> list[ClipRow]:
    """Each live row's caption: its best candidate text that passes the alignment filter, else one
    the captioner writes (without a captioner the row is dropped). Returns the rows left."""
    metric = cfg.score_column  # the score column thresholded (pmi, pmi_sum, pmi_span or clip)
    threshold = alignment_threshold(live, metric, cfg.filter) if metric else None
    stats.note(metric=metric, threshold=threshold, assign=cfg.filter.assign,
               pmi_prior=cfg.filter.pmi_prior, pmi_reduce=cfg.filter.pmi_reduce, texts_scored=metric is not None)
    if metric is None:
        stats.warn("no text was scored (no --scorer or --clip): each clip's first candidate text became its "
                   "caption unchecked, misaligned texts included; give --scorer MODEL_DIR (or --clip) to filter them")
    assigned = best_clip_of_texts(live, metric) if metric and cfg.filter.assign == "best_clip" else None
    need_caption = []
    for row in live:
        caption = choose_caption(row, metric, threshold, assigned)
        if caption is not None:
            row.caption, row.caption_source = caption, "input"
        else:
            need_caption.append(row)
    # Without a metric no caption was checked: they are counted apart, never as aligned.
    stats.count("aligned", len(live) - len(need_caption) if metric else 0)
    stats.count("unscored_captions", 0 if metric else len(live) - len(need_caption))
    if cfg.captioner.model:
        results = _run_stage(engine, "caption", _model_settings(cfg, "caption"),
                             [(r.clip_id, []) for r in need_caption], cfg.captioner.batch_size, work, stats)
        for row in need_caption:
            caption = results[row.clip_id]["caption"].strip()
            if caption:
                row.caption, row.caption_source = caption, "generated"
            else:
                row.drop_reason = DropReason.EMPTY_CAPTION
    else:
        for row in need_caption:
            row.drop_reason = DropReason.MISALIGNED if row.texts else DropReason.NO_TEXT
    stats.count("captioned", sum(r.caption_source == "generated" for r in live))
    return [r for r in live if r.drop_reason is None]


def reference_clips(live: list[ClipRow], count: int) -> list[str]:
    """The ``count`` clip ids of the marginal prior's reference set: evenly spaced over the sorted
    ids of the clips that passed the cheap filters (all of them when there are fewer)."""
    ids = sorted(r.clip_id for r in live)
    if count <= 0 or not ids:
        return []
    if count >= len(ids):
        return ids
    return [ids[(i * len(ids)) // count] for i in range(count)]


def _run_stage(engine, stage: str, settings: dict, clips: list[tuple[str, list[str]]], batch_size: int,
               work: Path, stats: RunStats, reference: list[str] | None = None) -> dict[str, dict]:
    """Run one model stage over ``clips`` in batches (skipping batches with a record); results by clip id."""
    batches = make_batches(stage, clips, batch_size, work, reference=reference)
    todo = [b for b in batches if read_record(Path(b["record"])) is None]
    stats.resumed_batches[stage] = len(batches) - len(todo)
    with stats.timed(f"{stage}_wall"):
        progress = _Progress(len(todo), stage)
        engine.map_batches(stage, settings, todo, str(work), progress)
        progress.close()
    results: dict[str, dict] = {}
    for batch in batches:
        record = read_record(Path(batch["record"]))
        if record is None or record["clip_ids"] != batch["clip_ids"]:
            raise RuntimeError(f"{batch['record']}: the {stage} batch did not complete")
        stats.add_seconds(stage, record["seconds"])
        results.update(zip(record["clip_ids"], record["results"]))
    return results


# ---- near-duplicates and output -------------------------------------------------------------
def _drop_duplicates(live: list[ClipRow], embeddings: Embeddings, run: CurateConfig, motion_spec: Spec,
                     work: Path, stats: RunStats) -> None:
    """Mark near-duplicates among the live rows (``dedup.py``): each group keeps its best-aligned
    member (then the largest, then the longest: ``dedup.keep_preference``); every other live row
    is kept."""
    cfg = run.dedup
    with stats.timed("dedup"):
        if cfg.enabled and live:
            from videollama.curate.dedup import keep_preference, near_duplicates, pixel_embedding

            ids = [r.clip_id for r in live]
            if cfg.embedding == "pixels":
                vectors = np.stack([pixel_embedding(load_frames(work, motion_spec, i)) for i in ids])
            else:
                stage = "pmi" if cfg.embedding == "scorer" else "clip"
                vectors = np.array([embeddings[stage][i] for i in ids])
            preference = [keep_preference(r, run.score_column, cfg.score_step) for r in live]
            duplicates = near_duplicates(ids, vectors, cfg.threshold, preference=preference)
            for row in live:
                if row.clip_id in duplicates:
                    row.drop_reason, row.duplicate_of = DropReason.DUPLICATE, duplicates[row.clip_id]
    for row in live:
        row.kept = row.drop_reason is None


def _write_outputs(rows: list[ClipRow], sources: list[dict], out: Path, work: Path, cfg: CurateConfig,
                   stats: RunStats) -> dict[str, Any]:
    """Shards of the kept clips, clips.parquet, stats.json (and stats.png); returns the stats."""
    from videollama.curate.output import plot_stats, write_shards_of, write_stats, write_table
    from videollama.data.writer import parse_size

    stats.count("kept", sum(r.kept for r in rows))
    stats.count("duplicates", sum(r.drop_reason == DropReason.DUPLICATE for r in rows))
    metas = {s["source_id"]: s["meta"] for s in sources}
    with stats.timed("output"):
        shards = write_shards_of(rows, metas, out, work, max_bytes=parse_size(cfg.output.shard_size),
                                 max_count=cfg.output.max_count, prefix=cfg.output.prefix)
        write_table([r.table_row() for r in rows], out / "clips.parquet")
    dropped: dict[str, int] = {}
    for row in rows:
        if row.drop_reason:
            dropped[row.drop_reason.value] = dropped.get(row.drop_reason.value, 0) + 1
    report = stats.report(dropped=dropped, shards=len(shards))
    if cfg.output.plot:
        plot_stats(rows, report, out / "stats.png")
    write_stats(report, out / "stats.json")
    return report
