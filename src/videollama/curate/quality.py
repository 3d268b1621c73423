"""Score a finished ``videollama curate`` run on the web Shapes corpus against its truth.json.

    python -m videollama.curate.quality --corpus data/web --out curated   (prints JSON)
    python -m videollama.curate.quality --corpus data/web --out curated --sweep   (caption
        precision / recall of each PMI prior and reduction at a range of thresholds, as a table)

Used by ``make demo`` (the curation figures of runs/demo/report.json), bench/bench_curate.py and
bench/bench_curation_value.py; a function per figure, each explained in its docstring.
Clips are matched to truth scenes by (source id, start time) within half a frame.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from videollama.curate.output import read_rows
from videollama.curate.rows import CHEAP_DROPS, ClipRow, DropReason
from videollama.data.tokenizer import normalize_answer

FRAME_S = 1 / 25


def _scene_of(rows: list[ClipRow], truth: dict) -> dict[str, tuple[str, int] | None]:
    """clip_id -> (video id, scene index) of the truth scene it is, or None (no scene starts there)."""
    found = {}
    for row in rows:
        scenes = truth["videos"][row.source_id]["scenes"]
        match = [j for j, s in enumerate(scenes) if abs(s["start_s"] - row.start_s) < FRAME_S / 2
                 and abs(s["end_s"] - row.end_s) < FRAME_S / 2]
        found[row.clip_id] = (row.source_id, match[0]) if match else None
    return found


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def _good_texts(truth: dict, where: tuple[str, int]) -> set[str]:
    """The candidate texts that truth says describe scene ``where`` (a caption, maybe decorated)."""
    video, scene = where
    return {t["text"] for t in truth["videos"][video]["texts"] if t["correct"] and t["scene"] == scene}


def evaluate(corpus: Path, out: Path) -> dict[str, Any]:
    """Every figure of the run in ``out`` against ``corpus``'s truth.json (one function a figure)."""
    truth = json.loads((corpus / "truth.json").read_text())
    stats = json.loads((out / "stats.json").read_text())
    rows = read_rows(out / "clips.parquet")
    scene = _scene_of(rows, truth)
    return {"clips": len(rows), "clips_matching_a_scene": sum(v is not None for v in scene.values()),
            "scenes": sum(len(v["scenes"]) for v in truth["videos"].values() if not v["corrupt"]),
            **_corrupt_figures(truth, stats), **_static_figures(rows, scene, truth),
            **_alignment_figures(rows, scene, truth, stats), "duplicates": _duplicate_figures(rows, scene, truth),
            "counts": stats["counts"], "dropped": stats["dropped"]}


def _corrupt_figures(truth: dict, stats: dict) -> dict[str, Any]:
    """Corrupt files: every one skipped with the reason truth.json gives, and nothing else skipped."""
    expected: dict[str, int] = {}
    for reason in truth["corrupt"].values():
        expected[reason] = expected.get(reason, 0) + 1
    expected = dict(sorted(expected.items()))
    return {"corrupt_expected": expected, "corrupt_counted": stats["corrupt"],
            "corrupt_all_counted": stats["corrupt"] == expected and set(stats["skipped_sources"]) == set(truth["corrupt"])}


def _static_figures(rows: list[ClipRow], scene: dict, truth: dict) -> dict[str, int]:
    """Static slideshows: clips of scenes where nothing moves are dropped as static, and only they."""
    static = [r for r in rows if scene[r.clip_id] and
              truth["videos"][r.source_id]["scenes"][scene[r.clip_id][1]]["static"]]
    dropped = sum(r.drop_reason == DropReason.STATIC for r in static)
    return {"static_scenes": len(static), "static_dropped": dropped,
            "moving_dropped_as_static": sum(r.drop_reason == DropReason.STATIC for r in rows) - dropped}


def _alignment_figures(rows: list[ClipRow], scene: dict, truth: dict, stats: dict) -> dict[str, Any]:
    """Alignment, on the clips that were scored (past the cheap filters). A candidate text is
    aligned with a clip when truth says it is that scene's text (a caption, maybe decorated)."""
    tp = fp = fn = 0  # caption choice: kept input caption right / wrong; a right text not chosen
    pairs_tp = pairs_fp = pairs_fn = 0  # every (clip, text) pair passing the threshold or not
    removed_wrong = removed_right = kept_wrong = 0  # every (clip, text) pair: not its caption, or its caption
    no_good, generated_right, generated_total = 0, 0, 0
    threshold, metric = stats["threshold"], stats["metric"]
    for row in rows:
        where = scene[row.clip_id]
        if where is None or row.drop_reason in CHEAP_DROPS:
            continue  # not scored: dropped by a filter that needs no model
        good = _good_texts(truth, where)
        chosen = row.caption if row.caption_source == "input" else None
        for s in row.scores:
            # without a model (metric None) no text is scored: the first text is taken as it is
            passed = metric is not None and s.value(metric) is not None and s.value(metric) >= threshold
            pairs_tp += passed and s.text in good
            pairs_fp += passed and s.text not in good
            pairs_fn += (not passed) and s.text in good
            removed = chosen != s.text
            removed_wrong += removed and s.text not in good
            removed_right += removed and s.text in good
            kept_wrong += (not removed) and s.text not in good
        if row.caption_source == "input":
            if row.caption in good:
                tp += 1
            else:
                fp += 1
        if good and chosen not in good:
            fn += 1  # a right text was there and not chosen (a generated caption equal to it does not count)
        if not good:
            no_good += 1
            if row.caption_source == "generated":
                generated_total += 1
                generated_right += normalize_answer(row.caption) == normalize_answer(
                    truth["videos"][where[0]]["scenes"][where[1]]["caption"])
    # Misaligned-text removal, per (scored clip, candidate text) pair: a text is removed from a
    # clip unless it became the clip's caption; it is misaligned unless it is that scene's text.
    return {"caption_choice": {"precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn),
                               "right": tp, "wrong": fp, "good_text_missed": fn},
            "text_pairs": {"precision": _ratio(pairs_tp, pairs_tp + pairs_fp),
                           "recall": _ratio(pairs_tp, pairs_tp + pairs_fn),
                           "passed_right": pairs_tp, "passed_wrong": pairs_fp, "failed_right": pairs_fn},
            "misaligned_removal": {"precision": _ratio(removed_wrong, removed_wrong + removed_right),
                                   "recall": _ratio(removed_wrong, removed_wrong + kept_wrong),
                                   "removed_misaligned": removed_wrong, "removed_aligned": removed_right,
                                   "kept_misaligned": kept_wrong},
            "generated": {"clips_without_good_text": no_good, "generated": generated_total,
                          "equal_to_truth": generated_right, "share_equal": _ratio(generated_right, no_good)}}


def _duplicate_figures(rows: list[ClipRow], scene: dict, truth: dict) -> dict[str, Any]:
    """Near-duplicates, among the clips that reached dedup (not dropped for another reason first)."""
    at_dedup = {r.clip_id: r for r in rows if r.drop_reason in (None, DropReason.DUPLICATE)}
    group_of: dict[tuple[str, int], int] = {}
    for g, group in enumerate(truth["duplicate_groups"]):
        for m in group:
            group_of[(m["video"], m["scene"])] = g
    clip_group = {c: group_of.get(scene[c]) if scene[c] else None for c in at_dedup}
    expected = 0
    for g in range(len(truth["duplicate_groups"])):
        members = [c for c, cg in clip_group.items() if cg == g]
        expected += max(0, len(members) - 1)
    marked = [r for r in at_dedup.values() if r.duplicate_of]
    right = sum(clip_group[r.clip_id] is not None and clip_group[r.clip_id] == clip_group.get(r.duplicate_of)
                for r in marked)
    return {"expected": expected, "marked": len(marked), "right": right,
            "recall": _ratio(right, expected), "false_merges": len(marked) - right,
            "false_merge_share": _ratio(len(marked) - right, len(at_dedup))}


# The curation targets that ``make demo`` reports against.
CURATION_TARGETS = {"caption_precision": 0.95, "caption_recall": 0.90, "duplicate_recall": 0.95,
                    "false_merge_share_max": 0.01, "generated_equal": 0.80}


def curation_report(web: Path, curated: Path, curator: Path) -> dict:
    """The curation figures of a ``videollama curate`` run on a web pool against its truth.json
    (:func:`evaluate`), with the curation targets and whether each is met (``make demo``'s report)."""
    q = evaluate(web, curated)
    stats = json.loads((curated / "stats.json").read_text())
    choice, dup, gen = q["caption_choice"], q["duplicates"], q["generated"]
    figures = {
        "caption_precision": choice["precision"], "caption_recall": choice["recall"],
        "duplicate_recall": dup["recall"], "false_merge_share": dup["false_merge_share"],
        "generated_equal": gen["share_equal"],
    }
    t = CURATION_TARGETS
    met = {
        "caption_precision": (figures["caption_precision"] or 0) >= t["caption_precision"],
        "caption_recall": (figures["caption_recall"] or 0) >= t["caption_recall"],
        "duplicate_recall": (figures["duplicate_recall"] or 0) >= t["duplicate_recall"],
        "false_merge_share": (figures["false_merge_share"] or 0) <= t["false_merge_share_max"],
        "corrupt_all_counted": bool(q["corrupt_all_counted"]),
        "static_dropped": q["static_dropped"] == q["static_scenes"] and q["moving_dropped_as_static"] == 0,
        "generated_equal": (figures["generated_equal"] or 0) >= t["generated_equal"],
    }
    return {"curator": str(curator), "figures": figures, "targets": t, "targets_met": met,
            "counts": stats["counts"], "dropped": stats["dropped"], "corrupt": stats["corrupt"],
            "caption_choice": choice, "duplicates": dup, "generated": gen,
            "static": {"scenes": q["static_scenes"], "dropped": q["static_dropped"],
                       "moving_dropped_as_static": q["moving_dropped_as_static"]},
            "filter": {"metric": stats["metric"], "threshold": stats["threshold"],
                       "pmi_prior": stats.get("pmi_prior"), "pmi_reduce": stats.get("pmi_reduce")},
            "seconds": {k: round(v, 1) for k, v in stats.get("seconds", {}).items()}}


def print_curation(c: dict) -> None:
    f, met, n = c["figures"], c["targets_met"], c["counts"]

    def mark(ok: bool) -> str:
        return "met" if ok else "NOT met"

    print(f"\ncuration: {n['sources']} uploads ({n['corrupt']} corrupt, skipped and counted: {c['corrupt']}) -> "
          f"{n['clips']} clips -> {n['kept']} kept; dropped {c['dropped']}")
    print(f"  input captions: precision {f['caption_precision'] or 0:.3f} (>= 0.95: {mark(met['caption_precision'])}), "
          f"recall {f['caption_recall'] or 0:.3f} (>= 0.90: {mark(met['caption_recall'])})")
    print(f"  near-duplicates: recall {f['duplicate_recall'] or 0:.3f}, false merges {f['false_merge_share'] or 0:.3f}; "
          f"static scenes dropped {c['static']['dropped']}/{c['static']['scenes']}")
    print(f"  generated captions equal to the truth: {f['generated_equal'] or 0:.3f} "
          f"(>= 0.80: {mark(met['generated_equal'])})")


def threshold_sweep(corpus: Path, out: Path, thresholds: list[float], assign: str = "best_clip",
                    column: str | None = None) -> list[dict]:
    """Caption-choice precision / recall at other thresholds of a score column (default: the run's;
    ``pmi``, ``pmi_sum``, ``pmi_span``: the three ``filter.pmi_reduce`` choices), re-filtered from
    clips.parquet alone (no score recomputed): what a run's table allows."""
    from videollama.curate.filters import best_clip_of_texts, choose_caption

    truth = json.loads((corpus / "truth.json").read_text())
    stats = json.loads((out / "stats.json").read_text())
    metric = column or stats["metric"]
    rows = [r for r in read_rows(out / "clips.parquet") if r.drop_reason not in CHEAP_DROPS]
    scene = _scene_of(rows, truth)
    sweep = []
    for threshold in thresholds:
        assigned = best_clip_of_texts(rows, metric) if assign == "best_clip" else None
        tp = fp = fn = 0
        for row in rows:
            if scene[row.clip_id] is None:
                continue
            good = _good_texts(truth, scene[row.clip_id])
            caption = choose_caption(row, metric, threshold, assigned)
            tp += caption is not None and caption in good
            fp += caption is not None and caption not in good
            fn += bool(good) and caption not in good
        sweep.append({"threshold": threshold, "precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn)})
    return sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sweep", action="store_true", help="print the pmi / pmi_sum / pmi_span threshold sweep")
    args = parser.parse_args()
    if not args.sweep:
        print(json.dumps(evaluate(args.corpus, args.out), indent=1))
        return
    print(sweep_table(args.corpus, args.out))


SWEEP = (("text_only", "mean", "pmi", [0, 1, 2, 3, 3.5, 4]),
         ("text_only", "sum", "pmi_sum", [0, 10, 20, 25, 30, 40, 60]),
         ("text_only", "max_span", "pmi_span", [0, 10, 20, 25, 30, 40, 50, 55, 60]),
         ("marginal", "mean", "pmi_marginal", [-0.5, -0.25, 0, 0.1, 0.25, 0.5]),
         ("marginal", "sum", "pmi_marginal_sum", [0, 0.5, 1, 1.5, 2, 2.5, 3, 4]),
         ("marginal", "max_span", "pmi_marginal_span", [2, 3, 3.5, 4, 5]))


def sweep_table(corpus: Path, out: Path) -> str:
    """The filter.pmi_prior x filter.pmi_reduce sweep as a markdown table (columns left empty by
    the run, e.g. the marginal ones without scorer.reference_clips, are left out)."""
    lines = ["| filter.pmi_prior | filter.pmi_reduce (column) | threshold | caption precision | caption recall |",
             "| --- | --- | ---: | ---: | ---: |"]
    rows = read_rows(out / "clips.parquet")
    for prior, reduce, column, thresholds in SWEEP:
        if not any(s.value(column) is not None for r in rows for s in r.scores):
            continue
        for p in threshold_sweep(corpus, out, [float(t) for t in thresholds], column=column):
            lines.append(f"| {prior} | {reduce} ({column}) | {p['threshold']:g} | {p['precision'] or 0:.3f} | "
                         f"{p['recall'] or 0:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
