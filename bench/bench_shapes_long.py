"""Shapes-Long generation speed: encoder settings on 30 s and 600 s videos, and the evaluation grid.

Writes bench/results/shapes_long.md. Times are process CPU seconds (children included, for the
worker pool) beside wall seconds: the 2 cores are often shared, and CPU time is what the
generator itself costs. Encoder rows encode the same spec with the generator's frames (one
colour conversion per distinct picture) under each x264 preset and CRF; quality compares every
10th decoded frame with the frame drawn from the spec.
Usage: python bench/bench_shapes_long.py [--quick]
"""

from __future__ import annotations

import io
import os
import platform
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
from scipy import ndimage

from videollama.data import shapes_long as sl
from videollama.data import shapes_long_synth as synth

OUT = Path(__file__).resolve().parent / "results" / "shapes_long.md"
SETTINGS = [("ultrafast", 18), ("ultrafast", 23), ("superfast", 20), ("veryfast", 18), ("veryfast", 23)]


def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn, *args, **kwargs):
    cpu, wall = cpu_seconds(), time.perf_counter()
    result = fn(*args, **kwargs)
    return result, cpu_seconds() - cpu, time.perf_counter() - wall


def encode_with(frames, preset: str, crf: int) -> bytes:
    """The generator's encoder loop (shapes.encode_mp4) with the preset and CRF as parameters."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=sl.FPS)
        stream.width, stream.height, stream.pix_fmt = sl.WIDTH, sl.HEIGHT, "yuv420p"
        stream.codec_context.thread_count = 1
        stream.options = {"preset": preset, "crf": str(crf), "threads": "1"}
        for i, frame in enumerate(frames):
            if not isinstance(frame, av.VideoFrame):
                frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def quality(spec: sl.LongSpec, mp4: bytes) -> tuple[float, float]:
    """PSNR (dB, RGB) over every 10th frame, and the largest error inside objects (2 px from edges)."""
    mse, worst = [], 0
    with av.open(io.BytesIO(mp4)) as container:
        for k, frame in enumerate(container.decode(video=0)):
            if k % 10:
                continue
            got = frame.to_ndarray(format="rgb24").astype(np.int32)
            want = sl.render_frame(spec, k / sl.FPS).astype(np.int32)
            mse.append(((got - want) ** 2).mean())
            inside = ndimage.binary_erosion((want != spec.background).any(-1), iterations=2)
            if inside.any():
                worst = max(worst, int(np.abs(got - want)[inside].max()))
    return 10 * np.log10(255**2 / max(np.mean(mse), 1e-12)), worst


def spec_with_events(duration: int, seed: int) -> sl.LongSpec:
    """A drawn video with three objects and three events (the most motion a video can hold)."""
    while True:
        spec = sl.sample_long_spec(random.Random(seed), duration)
        if len(spec.events()) == 3:
            return spec
        seed += 1


def encoder_table(repeats: int) -> list[str]:
    lines = ["| video | preset | CRF | CPU ms/frame | wall ms/frame | kB | PSNR dB | max error inside objects |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for duration in (30, 600):
        spec = spec_with_events(duration, seed=duration)
        rows = [("RGB every frame (v1's path)", "ultrafast", 18, lambda s: (f.copy() for f, _ in sl.iter_frames(s)))]
        rows += [("incremental", p, c, sl.iter_encoder_frames) for p, c in SETTINGS]
        for label, preset, crf, frames in rows:
            runs = [timed(encode_with, frames(spec), preset, crf) for _ in range(repeats)]
            mp4 = runs[0][0]
            cpu = statistics.median(r[1] for r in runs) / spec.num_frames * 1e3
            wall = statistics.median(r[2] for r in runs) / spec.num_frames * 1e3
            psnr, worst = quality(spec, mp4)
            lines.append(f"| {duration} s, {label} | {preset} | {crf} | {cpu:.3f} | {wall:.3f} | "
                         f"{len(mp4) / 1e3:.0f} | {psnr:.1f} | {worst} |")
            print(lines[-1], flush=True)
    return lines


def generation_rows(quick: bool) -> list[str]:
    lines = ["| what | videos | video seconds | workers | CPU s | wall s |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    spec = spec_with_events(600, seed=600)
    runs = [timed(synth.make_sample, ("v", spec)) for _ in range(3)]
    lines.append(f"| one 600 s video (3 events: render, encode, texts), median of 3 | 1 | 600 | 1 | "
                 f"{statistics.median(r[1] for r in runs):.2f} | {statistics.median(r[2] for r in runs):.2f} |")
    print(lines[-1], flush=True)
    cases = [("needle grid, per-cell 1", 1, 0, 1), ("needle grid, per-cell 1", 1, 0, 2),
             ("needle grid, per-cell 4", 4, 0, 1), ("needle grid, per-cell 4", 4, 0, 2),
             ("whole split, per-duration 4", 0, 4, 2)]
    for label, per_cell, per_duration, workers in cases[:2] if quick else cases:
        with tempfile.TemporaryDirectory() as out:
            stats, cpu, wall = timed(
                synth.synthesize_long, out, train=0, durations=synth.TrainDurations("30"),
                eval_durations=synth.EVAL_DURATIONS, depths=synth.EVAL_DEPTHS, per_cell=per_cell,
                per_duration=per_duration, seed=0, workers=workers)
        videos = stats.get("needle", stats.get("whole"))["videos"]
        lines.append(f"| {label} (durations 30-600 s) | {videos} | {stats['video_seconds']} | {workers} | "
                     f"{cpu:.1f} | {wall:.1f} |")
        print(lines[-1], flush=True)
    return lines


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    load_before = os.getloadavg()
    encoders = encoder_table(1 if quick else 3)
    generation = generation_rows(quick)
    load_after = os.getloadavg()
    text = f"""## Shapes-Long generation

`bench/bench_shapes_long.py` ({platform.machine()}, {os.cpu_count()} cores, PyAV {av.__version__}): the
generator's cost per frame for x264 presets and CRFs, and the time to make the evaluation grid
(durations 30, 60, 120, 300, 600 s x depths 0, 0.25, 0.5, 0.75, 1). CPU s counts the process and
its workers; load average {load_before[0]:.1f} before and {load_after[0]:.1f} after the run (the cores were
shared: wall times are longer than CPU times by the other work). Encoder rows: median of
{1 if quick else 3} encodes of one drawn video with three events; the generation rows are single runs
unless they say otherwise.

### Encoder settings (one thread; PSNR and error against the frames drawn from the spec)

{chr(10).join(encoders)}

* The generator encodes with x264 `ultrafast`, CRF 18 (version 1's settings): the least CPU of
  the presets tried and the cleanest flat colours inside the shapes; `veryfast` makes smaller
  30 s files but costs 2-3x the CPU and leaves larger errors inside objects; CRF 23 saves
  little time and 10-20 % of the bytes. Frames are mostly still, so a long video costs about
  the encoder's per-frame floor for a repeated picture; converting only the distinct pictures
  to yuv420p (instead of every RGB frame inside the encoder) is the main saving, with the same
  bytes (tests/test_shapes_long.py checks the equality).

### Generating videos

{chr(10).join(generation)}
"""
    OUT.parent.mkdir(parents=True, exist_ok=True)
    from machine import stamped  # bench/machine.py: the CPU, its ISA, measured peak and bandwidth
    OUT.write_text(stamped(text))
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
