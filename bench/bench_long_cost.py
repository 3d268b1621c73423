"""The cost of a long video on the CPU: our gated cross-attention beside the LLaVA design.

`small` preset shapes, one prompt, fp32. A video of D seconds is ``window_starts(D, 4 s, 900)``
windows (16 frames at 4 FPS each; ``preprocess.max_windows`` raised from 64 to 900 so that an hour is
tiled), 32 latents per window after the resampler: 4 s, 1 min, 10 min and 1 h are 32, 480, 4,800 and
28,800 latents [n, 256].

* **ours**: ``inference.generate.generate(model, ids, visual_latents=latents)``: every cross-attention
  block's keys/values of the latents are projected once, the question is prefilled against them, the
  text's KV cache is as long as the text.
* **in-sequence** (the LLaVA design): transformers' ``LlamaForCausalLM`` with the same decoder shapes
  (hidden 384, 8 layers, 6 heads, intermediate 1024, vocab 8192; the same tensor names and shapes as
  ours through ``convert``'s rename table, checked on the meta device), random weights; the latents
  go through a linear projector (256 -> 384) and are prepended to the question's embeddings
  (``inputs_embeds``), then ``generate`` with its KV cache (transformers' default ``DynamicCache``),
  SDPA attention.

Each point runs in a fresh subprocess (``--threads`` intra-op threads, 1 by default): once timed
(a forward hook on ``lm_head`` stamps every step: time to first token from the latents to the first
new token's logits; per-token decode time, the median step after it; the peak RSS growth during the
first ``generate``, over the RSS once the models and the latents exist), once under ``videollama.plan.memtrace.AllocatorTrace`` (the peak of what torch's CPU
allocator held, weights included). Vision encoding is the same for both designs and timed apart
(chunks of 8 windows). A point that runs past ``--budget`` seconds is stopped; the design's growth
is then fitted on the points that ran and extrapolated (labelled). The hour section decodes a real
generated 1-hour video (96x96, 4 FPS) chunk by chunk through ``data.windows.open_windows``,
encodes it with ``model.encode_video`` and generates: its measured peak against the formula and
``videollama plan``. Writes bench/results/long_cost.md and long_cost.png.

Usage: python bench/bench_long_cost.py [--quick] [--threads N] [--budget S]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from long_cost_hour import hour_section, make_video, measure_hour  # noqa: E402
from long_cost_report import cost_section, fit, machine, plot  # noqa: E402

RESULTS = ROOT / "bench" / "results"
FULL_SECONDS = (4, 60, 600, 3600)
QUICK_SECONDS = (4, 60, 120)
QUESTION, NEW_TOKENS = 16, 16
MAX_WINDOWS = 900
MiB = 2**20


def small_config():
    from videollama.config import VideoLlamaConfig

    return VideoLlamaConfig.from_name("small", **{"preprocess.max_windows": MAX_WINDOWS})


def windows_for(seconds: float) -> int:
    from videollama.data.windows import window_starts

    pre = small_config().preprocess
    return len(window_starts(seconds, pre.window_s, pre.max_windows))


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def in_sequence_model(cfg, max_len: int):
    """LlamaForCausalLM with our decoder's shapes, and the LLaVA projector."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    d = cfg.decoder
    hf_cfg = LlamaConfig(vocab_size=d.vocab_size, hidden_size=d.hidden_size, intermediate_size=d.intermediate_size,
                         num_hidden_layers=d.num_layers, num_attention_heads=d.num_heads,
                         num_key_value_heads=d.kv_heads, max_position_embeddings=max_len,
                         rms_norm_eps=d.rms_norm_eps, rope_theta=d.rope_theta,
                         tie_word_embeddings=d.tie_word_embeddings, attention_bias=False, mlp_bias=False)
    hf_cfg._attn_implementation = "sdpa"
    hf = LlamaForCausalLM(hf_cfg).eval()
    hf.generation_config.eos_token_id = None   # no early stop: every point decodes NEW_TOKENS
    hf.generation_config.pad_token_id = d.pad_token_id
    return hf, torch.nn.Linear(cfg.vision.hidden_size, d.hidden_size)


def check_same_shapes() -> int:
    """Every tensor of the in-sequence model is one of our decoder's (convert's rename table), same
    shape, and ours has nothing else but the cross-attention blocks and the time stamp. Returns the
    in-sequence model's parameter count."""
    import torch

    from videollama.convert import LLAMA_RENAMES, rename
    from videollama.model.videollama import VideoLlama

    cfg = small_config()
    with torch.device("meta"):
        hf, _ = in_sequence_model(cfg, 64)
        ours = {k: v.shape for k, v in VideoLlama(cfg).state_dict().items()}
    theirs = {rename(k, LLAMA_RENAMES): v.shape for k, v in hf.state_dict().items() if rename(k, LLAMA_RENAMES)}
    extra = {k for k in ours if k.startswith(("decoder.", "lm_head.")) and k not in theirs}
    bad = [k for k, shape in theirs.items() if ours.get(k) != shape]
    if bad or any(not k.startswith(("decoder.cross_attn_layers.", "decoder.media_time.")) for k in extra):
        raise SystemExit(f"in-sequence model differs from our decoder: {bad or sorted(extra)[:5]}")
    return sum(p.numel() for p in hf.parameters())


# ---- one point, in its own process ----------------------------------------------------------------


def child(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    cfg, design, n = small_config(), spec["design"], spec["latents"]
    if design == "encode":
        return _encode_child(cfg, spec["windows"])
    trace = None
    if spec["how"] == "allocator":
        from videollama.plan.memtrace import AllocatorTrace

        trace = AllocatorTrace()
        trace.__enter__()
    run = _ours(cfg, n) if design == "ours" else _in_sequence(cfg, n)
    rss0 = _status("VmRSS")   # the models and the latents exist: RSS grows by what generation holds
    Path("/proc/self/clear_refs").write_text("5")   # VmHWM := VmRSS
    stamps: list[float] = []
    out: dict = {"ttft_s": [], "per_token_s": []}
    began = time.monotonic()
    for rep in range(spec["reps"] if trace is None else 1):
        if rep and time.monotonic() - began > spec["budget"] / 4:
            break   # a slow point: one run (or two) is enough, and the allocator's run must still fit the budget
        stamps.clear()
        start = time.perf_counter()
        run(stamps)
        out["ttft_s"].append(stamps[0] - start)
        steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
        out["per_token_s"].append(sorted(steps)[len(steps) // 2])
        if rep == 0:
            out["rss_growth"] = _status("VmHWM") - rss0
    if trace is not None:
        trace.__exit__(None, None, None)
        out["allocator_peak"] = trace.peak
    return out


def _ours(cfg, n: int):
    import torch

    from videollama.inference.generate import generate
    from videollama.model.videollama import VideoLlama

    model = VideoLlama(cfg).eval()
    latents = torch.randn(1, n, cfg.vision.hidden_size)   # [1, W * L, D_v]: what the encoder hands over
    ids = torch.randint(3, cfg.decoder.vocab_size, (1, QUESTION))

    def run(stamps: list[float]) -> None:
        handle = model.lm_head.register_forward_hook(lambda *_: stamps.append(time.perf_counter()))
        generate(model, ids, visual_latents=latents, max_new_tokens=NEW_TOKENS)
        handle.remove()
    return run


def _in_sequence(cfg, n: int):
    import torch

    from videollama.model.resampler import PerceiverResampler
    from videollama.model.vision import VisionEncoder

    hf, projector = in_sequence_model(cfg, n + QUESTION + NEW_TOKENS)
    # the same vision side as ours, held (unused from latents) so that both peaks count the same weights
    vision_side = (VisionEncoder(cfg.vision), PerceiverResampler(cfg.resampler, dim=cfg.vision.hidden_size,
                                                                 max_frames=cfg.vision.max_frames))
    latents = torch.randn(1, n, cfg.vision.hidden_size)
    ids = torch.randint(3, cfg.decoder.vocab_size, (1, QUESTION))

    @torch.inference_mode()
    def run(stamps: list[float]) -> None:
        handle = hf.lm_head.register_forward_hook(lambda *_: stamps.append(time.perf_counter()))
        embeds = torch.cat([projector(latents), hf.get_input_embeddings()(ids)], dim=1)  # [1, n + Q, 384]
        mask = torch.ones(embeds.shape[:2], dtype=torch.long)
        hf.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                    min_new_tokens=NEW_TOKENS, do_sample=False)
        handle.remove()
    run.vision_side = vision_side
    return run


def _encode_child(cfg, windows: int) -> dict:
    """Seconds to encode ``windows`` windows of random frames, 8 at a time (the vision side)."""
    import torch

    from videollama.model.videollama import VideoLlama

    model = VideoLlama(cfg).eval()
    pre = cfg.preprocess
    chunk = torch.randn(8, pre.num_frames, 3, pre.size, pre.size)
    with torch.inference_mode():
        model.encode_video(chunk[:1])   # warm-up
        start = time.perf_counter()
        for first in range(0, windows, 8):
            n = min(8, windows - first)
            model.encode_video(chunk[:n], torch.arange(n * pre.num_frames, dtype=torch.float64).view(n, -1) / pre.fps)
        return {"encode_s": time.perf_counter() - start}


def run_child(spec: dict, budget: float) -> dict | None:
    """One point in a fresh process; None when it ran past ``budget`` seconds (or was killed)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT / "src")}
    try:
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                              text=True, env=env, cwd=ROOT, timeout=budget)
    except subprocess.TimeoutExpired:
        return None
    if proc.returncode != 0:
        if proc.returncode < 0:   # killed (out of memory)
            return None
        raise RuntimeError(f"{spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- the sweep ---------------------------------------------------------------------------------------


def sweep(seconds: tuple[int, ...], threads: int, budget: float, encode_windows: int) -> dict:
    latents_per_window = small_config().resampler.num_latents
    points = [{"seconds": s, "windows": windows_for(s), "latents": windows_for(s) * latents_per_window,
               "held": held_bytes(windows_for(s) * latents_per_window)} for s in seconds]
    result = {"points": points, "designs": {}}
    for design in ("ours", "in_sequence"):
        rows, stopped = [], None
        for p in points:
            if stopped is not None:
                rows.append(None)
                continue
            spec = {"design": design, "latents": p["latents"], "threads": threads, "how": "time", "reps": 3,
                    "budget": budget}
            started = time.monotonic()
            timed = run_child(spec, budget)
            took = time.monotonic() - started
            alloc = run_child({**spec, "how": "allocator", "reps": 1}, budget) if timed is not None else None
            if timed is None or alloc is None:
                stopped = p["seconds"]
                rows.append(None)
                print(f"{design} {p['seconds']} s: past the {budget:.0f} s budget", flush=True)
                continue
            row = {"ttft_s": _median(timed["ttft_s"]), "per_token_s": _median(timed["per_token_s"]),
                   "rss_growth": timed["rss_growth"], "allocator_peak": alloc["allocator_peak"], "wall_s": took,
                   "runs": len(timed["ttft_s"])}
            rows.append(row)
            print(design, p["seconds"], {k: round(v, 4) for k, v in row.items()}, flush=True)
        result["designs"][design] = {"rows": rows, "stopped_at": stopped, "fits": _fits(points, rows, design)}
    enc = run_child({"design": "encode", "latents": 0, "windows": encode_windows, "threads": threads,
                     "how": "time", "reps": 1}, budget)
    result["encode_s_per_window"] = enc["encode_s"] / encode_windows if enc else None
    result["encode_windows"] = encode_windows
    return result


def held_bytes(n: int) -> dict[str, int]:
    """What grows with the video, from the shapes (fp32): ours, every cross-attention block's k/v of the
    n latents and the text's KV cache; in-sequence, the KV cache of n + text tokens in every layer."""
    d = small_config().decoder
    blocks, text = len(range(0, d.num_layers, d.cross_attn_every)), QUESTION + NEW_TOKENS
    kv = 2 * d.kv_heads * d.head_dim * 4   # k and v of one position in one layer
    return {"ours": blocks * 2 * n * d.hidden_size * 4 + d.num_layers * text * kv,
            "in_sequence": d.num_layers * (n + text) * kv}


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def _fits(points: list[dict], rows: list, design: str) -> dict:
    """Growth fitted on the points that ran: time to first token quadratic in the latents for the
    in-sequence design (its attention), linear otherwise; memory and per-token time linear."""
    ran = [(p["latents"], r) for p, r in zip(points, rows, strict=True) if r is not None]
    xs = [n for n, _ in ran]
    out = {}
    for key in ("ttft_s", "per_token_s", "allocator_peak", "rss_growth"):
        degree = 2 if key == "ttft_s" and design == "in_sequence" else 1
        out[key] = fit(xs, [r[key] for _, r in ran], degree)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 s, 1 min and 2 min (and a 2-minute 'hour' video)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--budget", type=float, default=None, help="seconds per point (default 600; quick 120)")
    args = parser.parse_args(argv)
    budget = args.budget or (120.0 if args.quick else 600.0)
    seconds = QUICK_SECONDS if args.quick else FULL_SECONDS
    hf_params = check_same_shapes()
    load_before = machine()["load"]
    result = sweep(seconds, args.threads, budget, encode_windows=15 if args.quick else 150)
    hour_s = 120 if args.quick else 3600
    video = make_video(hour_s)
    hour = measure_hour(video, hour_s, args.threads, MAX_WINDOWS, QUESTION, NEW_TOKENS,
                        child_script=Path(__file__), budget=max(budget, 3600.0))
    info = {**machine(), "load_before": load_before, "threads": args.threads, "budget_s": budget,
            "quick": args.quick, "hf_params": hf_params, "question": QUESTION, "new_tokens": NEW_TOKENS}
    RESULTS.mkdir(parents=True, exist_ok=True)
    png = RESULTS / "long_cost.png"
    plot(result, png)
    text = cost_section(result, info, png.name) + "\n" + hour_section(hour, info)
    (RESULTS / "long_cost.md").write_text(text)
    print(f"wrote {RESULTS / 'long_cost.md'} and {png}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        spec = json.loads(sys.argv[2])
        if spec["design"] == "hour":
            from long_cost_hour import hour_child
            print(json.dumps(hour_child(spec)))
        else:
            print(json.dumps(child(spec)))
        sys.exit(0)
    sys.exit(main(sys.argv[1:]))
