"""bench_long_cost.py's hour: a real generated video decoded, encoded and asked about, chunk by chunk.

The video (96x96, 4 FPS, x264 ultrafast, a moving pattern) is made once and kept in the temporary
directory. It is opened with ``data.windows.open_windows`` under the small preset's policy with
``max_windows`` 900 (an hour tiled in 4-second windows), decoded 8 windows at a time
(``WholeVideo.chunks``), each chunk encoded with ``model.encode_video(chunk.frames, chunk.times)`` into
one latent buffer [W, 32, 256] and dropped, then ``generate(model, ids, visual_latents=...)``. Run
twice in fresh processes: timed (and the peak RSS growth), and under ``AllocatorTrace`` (its peak and
the phase holding it). Beside it: the formula (what a video holds, item by item) and ``videollama plan``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 2**20


def make_video(seconds: int, fps: int = 4, size: int = 96) -> Path:
    """The test video (cached): a gradient that drifts and a bright square that crosses the frame."""
    import av
    import numpy as np

    path = Path(tempfile.gettempdir()) / "videollama-bench" / f"long_{seconds}s_{size}px_{fps}fps.mp4"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.mp4")
    ys, xs = np.mgrid[0:size, 0:size]
    with av.open(str(partial), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = 10 * fps
        stream.codec_context.options = {"preset": "ultrafast"}
        for i in range(seconds * fps):
            rgb = np.stack([(xs * 2 + i) % 256, (ys * 2 + 3 * i) % 256, np.full_like(xs, (i // fps) % 256)], -1)
            corner = (i * 3) % (size - 16)
            rgb[corner:corner + 16, corner:corner + 16] = 255
            frame = av.VideoFrame.from_ndarray(rgb.astype(np.uint8), format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    partial.rename(path)
    return path


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def hour_child(spec: dict) -> dict:
    """Decode, encode and generate once in this process; what was measured."""
    import torch

    from videollama.config import VideoLlamaConfig
    from videollama.inference.generate import generate
    from videollama.model.videollama import VideoLlama
    from videollama.plan.memtrace import AllocatorTrace

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    cfg = VideoLlamaConfig.from_name("small", **{"preprocess.max_windows": spec["max_windows"]})
    trace = AllocatorTrace() if spec["how"] == "allocator" else None
    if trace is not None:
        trace.__enter__()
    model = VideoLlama(cfg).eval()
    ids = torch.randint(3, cfg.decoder.vocab_size, (1, spec["question"]))
    rss0 = _status("VmRSS")   # the model exists: RSS grows by what the video makes the run hold
    Path("/proc/self/clear_refs").write_text("5")
    stamps: list[float] = []
    model.lm_head.register_forward_hook(lambda *_: stamps.append(time.perf_counter()))
    start = time.perf_counter()
    with AllocatorTrace.phase("decoding and encoding"):
        latents, windows = _encode_video(model, spec["video"])
    encoded = time.perf_counter()
    rss_encoding = _status("VmHWM") - rss0
    with AllocatorTrace.phase("generate"):
        generate(model, ids, visual_latents=latents, max_new_tokens=spec["new_tokens"])
    out = {"windows": windows, "latents": latents.shape[1], "encode_s": encoded - start,
           "ttft_s": stamps[0] - encoded, "rss_growth": _status("VmHWM") - rss0, "rss_encoding": rss_encoding}
    if trace is not None:
        trace.__exit__(None, None, None)
        out.update(allocator_peak=trace.peak, peak_phase=trace.peak_phase)
    return out


def _encode_video(model, video: str):
    """The video's windows encoded 8 at a time into one buffer: (latents [1, W * L, D_v], W)."""
    import torch

    from videollama.data.windows import open_windows

    # no wall-clock budget: on a loaded CPU the encoder between chunks takes longer than the default
    with torch.inference_mode(), open_windows(video, model.config.preprocess, time_budget_s=None) as whole:
        latents = None
        for chunk in whole.chunks(windows_per_chunk=8):
            encoded = model.encode_video(chunk.frames, chunk.times)  # [w, L, D_v]
            if latents is None:
                latents = encoded.new_empty(whole.num_windows, *encoded.shape[1:])
            latents[chunk.first:chunk.first + len(encoded)] = encoded
            del chunk, encoded
        return latents.view(1, -1, latents.shape[-1]), whole.num_windows


def measure_hour(video: Path, seconds: int, threads: int, max_windows: int, question: int, new_tokens: int, *,
                 child_script: Path, budget: float) -> dict:
    """The timed run, the allocator run, the formula and the plan."""
    from videollama.config import VideoLlamaConfig
    from videollama.plan.estimate import estimate
    from videollama.plan.planner import settings_for

    spec = {"design": "hour", "video": str(video), "threads": threads, "max_windows": max_windows,
            "question": question, "new_tokens": new_tokens}
    root = child_script.resolve().parent.parent
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(root / "src")}
    runs = {}
    for how in ("time", "allocator"):
        proc = subprocess.run([sys.executable, str(child_script), "--child", json.dumps({**spec, "how": how})],
                              capture_output=True, text=True, env=env, cwd=root, timeout=budget)
        if proc.returncode != 0:
            raise RuntimeError(f"hour ({how}) failed:\n{proc.stderr[-3000:]}")
        runs[how] = json.loads(proc.stdout.strip().splitlines()[-1])
        print("hour", how, runs[how], flush=True)
    cfg = VideoLlamaConfig.from_name("small", **{"preprocess.max_windows": max_windows})
    s = settings_for(cfg, mode="infer", precision="fp32", tokens=question, new_tokens=new_tokens,
                     video_seconds=float(seconds))
    e = estimate(cfg, s)
    return {"seconds": seconds, "video_bytes": video.stat().st_size, "runs": runs, "plan": e, "formula": formula(cfg, s, e)}


def formula(cfg, s, e) -> dict[str, int]:
    """What generation with the video holds, item by item (fp32), from the shapes alone."""
    d, n = cfg.decoder, s.windows * cfg.resampler.num_latents
    blocks = len(range(0, d.num_layers, d.cross_attn_every))
    heads = d.cross_attn_heads or d.num_heads
    return {"weights": e.totals["parameters"],
            "latents [W*L, D_v]": n * cfg.vision.hidden_size * 4,
            f"cross-attention k/v: {blocks} blocks x 2 x [{heads}, W*L, {d.hidden_size // heads}]":
                blocks * 2 * heads * n * (d.hidden_size // heads) * 4,
            "one chunk of frames [8, F, 3, S, S]": min(8, s.windows) * s.frames * 3 * cfg.vision.image_size ** 2 * 4,
            "text KV cache": d.num_layers * 2 * d.kv_heads * d.head_dim * (s.tokens + s.new_tokens) * 4}


def hour_section(hour: dict, info: dict) -> str:
    t, a, e = hour["runs"]["time"], hour["runs"]["allocator"], hour["plan"]
    items = hour["formula"]
    bound = sum(items.values())
    minutes = hour["seconds"] / 60
    lines = [f"### Peak memory of `generate` on a {minutes:g}-minute video, bounded by latents", "",
             f"A generated {minutes:g}-minute video ({hour['video_bytes'] / MiB:.1f} MiB, 96x96, 4 FPS, x264) through "
             f"`open_windows(...).chunks(8)` (small preset, max_windows 900): {t['windows']} windows, {t['latents']:,} "
             "latents; each chunk encoded with `model.encode_video(chunk.frames, chunk.times)` into one buffer, then "
             f"`generate` with a {info['question']}-token question and {info['new_tokens']} new tokens. "
             "fp32, one process per run.", "",
             "| what the video holds (formula) | MiB |", "| --- | ---: |",
             *[f"| {k} | {v / MiB:.1f} |" for k, v in items.items()],
             f"| **sum** | **{bound / MiB:.1f}** |", "",
             "| measured / planned | MiB | at |", "| --- | ---: | --- |",
             f"| allocator peak (`AllocatorTrace`, weights included) | **{a['allocator_peak'] / MiB:.1f}** | "
             f"{a['peak_phase']} |",
             f"| peak RSS growth over the built model (whole run; while decoding and encoding), against the "
             f"formula less the weights ({(bound - items['weights']) / MiB:.1f}) | "
             f"{t['rss_growth'] / MiB:.1f} ({t['rss_encoding'] / MiB:.1f}) | |",
             f"| `videollama plan --mode infer --video-seconds {hour['seconds']}` (fp32, max_windows 900) | "
             f"{e.peak / MiB:.1f} | {e.phase} |", "",
             f"Measured / formula: {a['allocator_peak'] / bound:.3f}; measured / plan: {a['allocator_peak'] / e.peak:.3f}. "
             "The formula is what the video makes the run hold; the plan adds the largest working memory alive at "
             f"its peak ({e.at_peak['transient'] / MiB:.1f} MiB at {e.phase}: the encoder's on one chunk while "
             "encoding, a block's activations during the prefill) and counts only what is alive then (the chunk "
             "of frames is gone once generation starts). "
             f"The frames never exist all at once: one chunk of 8 windows ({items['one chunk of frames [8, F, 3, S, S]'] / MiB:.1f} "
             f"MiB as float32) at a time, against {t['windows'] * 16 * 3 * 96 * 96 * 4 / MiB:,.0f} MiB for every frame "
             f"of the video. Wall time (timed run): decoding and encoding {t['encode_s']:.0f} s, then time to first token "
             f"{t['ttft_s']:.2f} s.", ""]
    return "\n".join(lines)
