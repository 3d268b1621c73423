"""The server's memory on a 1-hour video: `videollama serve` answering one question about it.

A random ``small``-preset model directory with ``preprocess.max_windows`` 900 (a 1-hour video is
tiled by 900 4-second windows, as in bench_long_cost.py) is served by ``videollama serve`` in its
own process (one torch thread), the video allowed through ``--allowed-local-media-path`` and the
limits raised for an hour of video on a CPU (duration 3600 s, request and decode deadlines
1800 s). One request through the ``openai`` client asks one question about the generated 1-hour
video (bench/long_cost_hour.py's, 96x96 at 4 FPS, cached under the temporary folder) and
16 new tokens. While it runs, the server's RSS and that of every process under it (the sandboxed
decoder) are sampled every 0.2 s; the server's own peak is its ``VmHWM``.

Reported: the windows and frame timestamps the answer carried, the request's wall time, the
server's RSS before and its peak, the decoder processes' peak, and the formula of what the video
makes the server hold (long_cost_hour.formula less the weights), as in
bench/results/long_cost.md for ``generate``. Writes bench/results/long_serve.md.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import machine  # noqa: E402
from bench_serve import build  # noqa: E402
from hostile_serve import Server, _rss_mb  # noqa: E402
from long_cost_hour import formula, make_video  # noqa: E402

SECONDS, MAX_WINDOWS, QUESTION, NEW = 3600, 900, 16, 16
MiB = 2**20


def held_for_video() -> tuple[dict[str, int], int]:
    """What generation with the video holds, item by item (long_cost_hour.formula, from the shapes),
    and its number of latents."""
    from videollama.config import VideoLlamaConfig
    from videollama.plan.estimate import estimate
    from videollama.plan.planner import settings_for

    cfg = VideoLlamaConfig.from_name("small", **{"preprocess.max_windows": MAX_WINDOWS})
    s = settings_for(cfg, mode="infer", precision="fp32", tokens=QUESTION, new_tokens=NEW,
                     video_seconds=float(SECONDS))
    items = {k: v for k, v in formula(cfg, s, estimate(cfg, s)).items() if k != "weights"}
    return items, s.windows * cfg.resampler.num_latents


def _tree(pid: int) -> list[int]:
    """Every process under pid."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    children = [int(c) for c in f.read().split()]
                out += children
                todo += children
        except OSError:
            continue
    return out


def _rss_or_zero(pid: int) -> float:
    try:
        return _rss_mb(pid)
    except (OSError, StopIteration):  # a decoder that has just exited
        return 0.0


def main() -> int:
    from openai import OpenAI

    video = make_video(SECONDS)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        build(work / "model", **{"preprocess.max_windows": MAX_WINDOWS})
        server = Server(["serve", "--model", str(work / "model"), "--allowed-local-media-path", str(video.parent),
                         "--max-video-duration-s", str(SECONDS), "--request-timeout-s", "1800",
                         "--decode-timeout-s", "1800", "--max-model-len", "128"], work)
        try:
            before = _rss_mb(server.proc.pid)
            peaks = {"decoders": 0.0}
            done = threading.Event()

            def sample() -> None:
                while not done.is_set():
                    peaks["decoders"] = max([peaks["decoders"], *map(_rss_or_zero, _tree(server.proc.pid))])
                    time.sleep(0.2)

            watcher = threading.Thread(target=sample, daemon=True)
            watcher.start()
            client = OpenAI(base_url=server.url + "/v1", api_key="none", timeout=1900)
            t0 = time.perf_counter()
            reply = client.chat.completions.create(model="model", max_tokens=NEW, messages=[
                {"role": "user", "content": [{"type": "video_url", "video_url": {"url": video.as_uri()}},
                                             {"type": "text", "text": "what moves?"}]}])
            wall = time.perf_counter() - t0
            done.set()
            watcher.join()
            hwm = _rss_mb(server.proc.pid, "VmHWM")
            stamps = reply.model_extra.get("frame_timestamps_s") or []  # per window: its frames' times
        finally:
            server.stop()
    items, latents = held_for_video()
    held = sum(items.values()) / MiB
    frames = [t for window in stamps for t in (window if isinstance(window, list) else [window])]
    text = "\n".join([
        "## The server on a 1-hour video (`bench/bench_long_serve.py`)",
        "",
        f"`videollama serve` (one torch thread) with a random `small`-preset model, `preprocess.max_windows` "
        f"{MAX_WINDOWS}; one request through the `openai` client: a generated {SECONDS // 60}-minute video "
        f"({video.stat().st_size / MiB:.1f} MiB, 96x96, 4 FPS, x264) by `file://` URL and a question, {NEW} new "
        "tokens. RSS sampled every 0.2 s for the server and every process under it (the sandboxed decoder); the "
        "server's peak is its `VmHWM`.",
        "",
        "| what | value |",
        "| --- | ---: |",
        f"| frame timestamps in the answer (`frame_timestamps_s`) | {len(stamps):,} windows, {len(frames):,} frames, "
        f"{min(frames, default=0):g} s to {max(frames, default=0):g} s |",
        f"| request wall time (decode, encode {MAX_WINDOWS} windows, generate) | {wall:.1f} s |",
        f"| server RSS before the request | {before:.1f} MiB |",
        f"| server peak RSS (VmHWM) | **{hwm:.1f} MiB** (+{hwm - before:.1f}) |",
        f"| decoder processes' peak RSS (sampled) | {peaks['decoders']:.1f} MiB |",
        "| what the video makes it hold (formula: "
        + " + ".join(f"{name} {v / MiB:.1f}" for name, v in items.items()) + f") | {held:.1f} MiB |",
        "",
        f"The server's growth over its idle RSS is {(hwm - before) / held:.2f}x the formula for its "
        f"{latents:,} latents, and below what the frames alone would take ({SECONDS * 4:,} frames of 96x96: "
        f"{SECONDS * 4 * 3 * 96 * 96 * 4 / MiB:,.0f} MiB as float32); one point does not show how it scales. The growth past the formula is not "
        "broken down here (candidates: the video cache's copy of the latents and keys/values, the allocator "
        "keeping the encoder's freed chunk memory, the batch decoder's buffers); `generate` on the same video "
        "holds the formula (bench/results/long_cost.md).",
    ])
    machine.write_result("long_serve", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
