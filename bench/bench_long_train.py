"""Training on whole Shapes-Long videos: seconds per step with and without the latent cache.

Writes bench/results/long_train.md. A Shapes-Long training set (`synthesize_long`, 40 videos of
30-300 s, seed 0) and a tokenizer on its texts are made in a temporary folder. For each preset
(`shapes`, the demo's: 4 s windows of 4 frames at 1 FPS, no resampler; `tiny`: 4 s windows of 16
frames at 4 FPS, 16 resampled latents, at most 8 windows), the real loop (`train()`) runs the
same steps twice from the same seed, vision side frozen, whole-video mode (at most 4 videos and
`PRESETS` windows per micro-batch, every text of a video): without and with
`data.latent_cache`. The decoded-window cache is filled first (its time is reported), so that
the steps time training, not decoding. Figures per step are medians over the steps, of process
CPU seconds (one thread; the cores are shared, so CPU time is what the step itself costs) and of
wall seconds. "Distinct" counts windows of different pixels over the whole set, as the cache keys
them. A breakdown times, on the first batches, the encoder alone (`window_latents` on every
window, no gradient) and everything after it (stamp, decoder forward and backward).
Usage: python bench/bench_long_train.py [--quick]
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from videollama.config import VideoLlamaConfig  # noqa: E402
from videollama.data.loader import VideoTextLoader  # noqa: E402
from videollama.data.sources import expand_sources, index_units, read_sample  # noqa: E402
from videollama.data.window_cache import whole_video  # noqa: E402
from videollama.model.videollama import VideoLlama, lm_loss  # noqa: E402
from videollama.train.latents import LatentCache, visual_inputs, window_key  # noqa: E402
from videollama.train.loop import train  # noqa: E402
from videollama.train.optim import freeze  # noqa: E402
from videollama.train.recipe import TrainConfig  # noqa: E402

OUT = ROOT / "bench" / "results" / "long_train.md"
# Windows per micro-batch: shapes tiles up to 160 (Shapes-Long videos average about 40 here); tiny
# spreads every video over its 8, so 32 lets 4 videos share a step as they do for shapes.
PRESETS = {"shapes": 160, "tiny": 32}
VISION_SIDE = ["vision", "temporal", "resampler"]


def make_corpus(root: Path, videos: int, durations: str) -> None:
    from videollama.data.shapes_long_synth import TrainDurations, synthesize_long
    from videollama.data.tokenizer import iter_training_texts, train_tokenizer

    synthesize_long(root / "long", train=videos, durations=TrainDurations(durations), eval_durations=[], depths=[],
                    per_cell=0, per_duration=0, seed=0, shard_size=100)
    train_tokenizer(iter_training_texts([root / "long" / "train"]), 1024).save(str(root / "tokenizer.json"))


def fill_window_cache(root: Path, preset: str) -> dict:
    """Decode every video once into the preset's window cache; count windows and distinct windows."""
    pre = VideoLlamaConfig.from_name(preset).preprocess
    cpu, wall = time.process_time(), time.perf_counter()
    windows, keys, seconds = 0, set(), 0.0
    for ref in index_units(expand_sources([str(root / "long" / "train")])):
        meta, video = read_sample(ref)
        frames, _ = whole_video(video, preprocess=pre, name=ref.key, window_budget=pre.max_windows,
                                cache_dir=str(root / f"windows-{preset}"), identity=(ref.source, ref.key))
        windows += frames.shape[0]
        keys |= {window_key(w) for w in frames}
        seconds += float(meta["duration_s"])
    return {"windows": windows, "distinct": len(keys), "video_s": seconds,
            "decode_cpu_s": time.process_time() - cpu, "decode_wall_s": time.perf_counter() - wall}


def recipe(root: Path, preset: str, steps: int, cached: bool) -> TrainConfig:
    return TrainConfig.from_dict({
        "model": {"preset": preset}, "tokenizer": str(root / "tokenizer.json"),
        "data": {"kind": "webdataset", "sources": [str(root / "long" / "train")], "task": "caption+videoqa",
                 "texts_per_clip": 0, "max_len": 64, "windows": "whole", "window_budget": PRESETS[preset], "num_workers": 0,
                 "cache_dir": str(root / f"windows-{preset}"), "latent_cache": cached},
        "optimizer": {"lr": 1e-3}, "schedule": {"warmup_steps": 2},
        "global_batch": 4, "micro_batch": 4, "max_steps": steps, "freeze": VISION_SIDE,
        "log": {"tensorboard": False, "progress": False}, "checkpoint": {"every": 0, "at_end": False}, "seed": 0,
    })


def run_steps(root: Path, preset: str, steps: int, cached: bool) -> dict:
    run = root / f"run-{preset}-{cached}"
    train(recipe(root, preset, steps, cached), run)
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {"cpu_s": statistics.median(r["cpu_s"] for r in recs), "wall_s": statistics.median(r["time_s"] for r in recs),
            "losses": [r["loss"] for r in recs], "last": recs[-1]}


def breakdown(root: Path, preset: str, batches: int) -> dict:
    """CPU seconds per batch of the encoder alone and of everything after it, on the first batches."""
    cfg = VideoLlamaConfig.from_name(preset)
    torch.manual_seed(0)
    model = VideoLlama(cfg)
    freeze(model, VISION_SIDE)
    loader = VideoTextLoader([str(root / "long" / "train")], tokenizer=str(root / "tokenizer.json"),
                             preprocess=cfg.preprocess, task="caption+videoqa", texts_per_clip=0, batch_size=4,
                             max_len=64, windows="whole", window_budget=PRESETS[preset],
                             cache_dir=str(root / f"windows-{preset}"), epochs=1, seed=0)
    encoder, rest, windows, latents = [], [], [], 0
    for _, batch in zip(range(batches), loader):
        c0 = time.process_time()
        with torch.no_grad():
            latents = model.window_latents(batch["video"]).shape[1]  # every window, as without a cache
        encoder.append(time.process_time() - c0)
        cache = LatentCache(digest="0" * 64, max_bytes=2**34)
        cache.latents(model, batch["video"], torch.device("cpu"))  # untimed: the rest reads these
        c0 = time.process_time()
        out = model(batch["input_ids"], **visual_inputs(model, batch, torch.device("cpu"), cache))
        lm_loss(out.logits, batch["labels"], reduction="sum").backward()
        rest.append(time.process_time() - c0)
        windows.append(batch["video"].shape[0])
    return {"encoder_s": statistics.median(encoder), "rest_s": statistics.median(rest),
            "windows": statistics.median(windows), "latents_per_window": latents}


def main() -> int:
    quick = "--quick" in sys.argv
    torch.set_num_threads(1)
    videos, durations, steps = (8, "30:60", 6) if quick else (40, "30:300", 24)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_corpus(root, videos, durations)
        for preset in PRESETS:
            counts = fill_window_cache(root, preset)
            plain, cached = run_steps(root, preset, steps, False), run_steps(root, preset, steps, True)
            rows.append((preset, counts, plain, cached, breakdown(root, preset, 3)))
            print(preset, counts, plain["cpu_s"], cached["cpu_s"], cached["last"].get("latent_hit_rate"), flush=True)
    OUT.write_text(report(rows, videos, durations, steps))
    return 0


def report(rows, videos: int, durations: str, steps: int) -> str:
    lines = [
        "## Training on whole Shapes-Long videos",
        "",
        f"`bench/bench_long_train.py` ({platform.machine()}, torch {torch.__version__}, one thread): {videos} "
        f"Shapes-Long videos of {durations.replace(':', '-')} s, whole-video mode (window budget "
        f"{', '.join(f'{p} {b}' for p, b in PRESETS.items())}; at most 4 videos per micro-batch; every text of a video), vision side frozen, "
        f"{steps} steps of the real loop from the same seed, without and with the latent cache. Per step: "
        "medians of process CPU seconds and of wall seconds (the cores are shared). Hit rate: windows "
        "not encoded / windows asked for, over the run (the first epoch meets every distinct window once; "
        "later epochs only hits).",
        "",
        "| preset | windows (distinct) | decode + cache, CPU s | step CPU s, no cache | step CPU s, cache | "
        "step wall s, no cache | step wall s, cache | hit rate | encoded / windows | same losses |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for preset, counts, plain, cached, _ in rows:
        last = cached["last"]
        same = max(abs(a - b) for a, b in zip(plain["losses"], cached["losses"]))
        lines.append(
            f"| {preset} | {counts['windows']} ({counts['distinct']}, {counts['distinct'] / counts['windows']:.0%}) | "
            f"{counts['decode_cpu_s']:.1f} | {plain['cpu_s']:.2f} | {cached['cpu_s']:.2f} | {plain['wall_s']:.2f} | "
            f"{cached['wall_s']:.2f} | {last['latent_hit_rate']:.0%} | {last['latent_encoded']} / "
            f"{last['latent_windows']} | max diff {same:.1e} |")
    lines += ["", "Where a step's CPU time goes (median of the first 3 batches, no cache: the encoder on every "
              "window, no gradient; then stamp + decoder forward and backward):", "",
              "| preset | windows per batch | latents per window | encoder CPU s | the rest CPU s |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for preset, _, _, _, b in rows:
        lines.append(f"| {preset} | {b['windows']:.0f} | {b['latents_per_window']} | {b['encoder_s']:.2f} | "
                     f"{b['rest_s']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
