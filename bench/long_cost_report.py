"""bench_long_cost.py's report: the machine, the growth fits, the table and the plot."""

from __future__ import annotations

import platform
import re
import subprocess
from pathlib import Path

MiB = 2**20
DESIGNS = {"ours": "ours (cross-attention)", "in_sequence": "in-sequence (LLaVA, HF Llama)"}


def machine() -> dict:
    """The CPU's model name and widest vector ISA, its cores and the load average now."""
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    field = dict(re.findall(r"^([^:]+):\s*(.*)$", lscpu, re.M))
    flags = set(field.get("Flags", "").split())
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "SSE/AVX"
    load = Path("/proc/loadavg").read_text().split()[:3]
    return {"cpu": field.get("Model name", platform.processor()).strip(), "isa": isa,
            "cores": int(field.get("CPU(s)", "0") or 0), "load": " / ".join(load)}


def fit(xs: list[float], ys: list[float], degree: int) -> list[float]:
    """Non-negative least-squares polynomial coefficients [c0, c1, ...] (y = c0 + c1 x + ...): a term
    whose coefficient comes out negative is dropped and the rest refitted (growth never shrinks)."""
    import numpy as np

    degree = min(degree, len(xs) - 1)
    if degree < 0:
        return []
    terms = list(range(degree + 1))
    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    while True:
        coef = np.linalg.lstsq(np.stack([x ** k for k in terms], 1), y, rcond=None)[0]
        if (coef >= 0).all() or len(terms) == 1:
            out = [0.0] * (degree + 1)
            for k, c in zip(terms, coef, strict=True):
                out[k] = float(max(c, 0.0))
            return out
        terms.pop(int(np.argmin(coef)))


def value(coef: list[float], x: float) -> float:
    return sum(c * x ** k for k, c in enumerate(coef))


def _cell(row, coef, key: str, n: int, scale: float, fmt: str) -> str:
    if row is not None:
        return format(row[key] * scale, fmt)
    return f"~{format(value(coef, n) * scale, fmt)} (extrap.)" if coef else "n/a"


def _duration(seconds: int) -> str:
    return f"{seconds} s" if seconds < 60 else f"{seconds // 60} min" if seconds < 3600 else f"{seconds // 3600} h"


def cost_section(result: dict, info: dict, png: str) -> str:
    points, enc = result["points"], result["encode_s_per_window"]
    lines = ["## Long video cost: gated cross-attention beside the in-sequence (LLaVA) design, CPU", "",
             f"`bench/bench_long_cost.py`{' --quick' if info['quick'] else ''}. {info['cpu']} ({info['isa']}, "
             f"{info['cores']} cores), {info['threads']} intra-op thread(s); **load average {info['load_before']} "
             f"before, {info['load']} after** (a shared machine: absolute times are slow and noisy, the ratios "
             "between the designs are the result). `small` preset shapes, fp32, random weights, batch 1, a "
             f"{info['question']}-token question, {info['new_tokens']} new tokens (no early stop). A video is 4-second "
             "windows (16 frames at 4 FPS) under the model's policy with `preprocess.max_windows` 900, 32 latents "
             "each. **Ours**: `generate(model, ids, visual_latents=[1, W*32, 256])`: 2 cross-attention blocks' "
             "keys/values projected once, the text's own KV cache. **In-sequence**: transformers' `LlamaForCausalLM` "
             f"with our decoder's shapes ({info['hf_params'] / 1e6:.2f} M parameters; every tensor one of ours under "
             "`convert`'s rename table), the latents projected by a linear layer (256 -> 384) and prepended as "
             "`inputs_embeds`, then `generate` with its default `DynamicCache`, SDPA. Both processes hold the same "
             "vision encoder and resampler weights.", "",
             "Time to first token: from the latents to the first new token's logits (ours: projecting the keys/values "
             "+ prefill; in-sequence: projecting the latents + prefill of latents and question), median of 3 runs "
             "(fewer where a run takes over a quarter of the budget: the `runs` column). **With encoding** adds the vision side, the same for both "
             f"designs: {f'{enc:.3f} s per window' if enc else 'n/a'}, measured over "
             f"{result['encode_windows']} windows of random frames in chunks of 8, times the windows (each window is "
             "encoded alone: linear by construction). Per token: the median decode step. Peak: torch's CPU "
             "allocator (`AllocatorTrace`, from before the model is built, weights included) and the process's peak "
             "RSS growth during `generate` (over its RSS once the models and the latents exist; malloc returns "
             "freed blocks at once, `MALLOC_MMAP_THRESHOLD_=65536`). Held: what grows with the video, from the shapes (ours: k/v of "
             f"the latents in 2 blocks; in-sequence: the KV cache in 8 layers). Budget {info['budget_s']:.0f} s per "
             "point; `(extrap.)`: the design did not finish the point within it, the value is the growth fitted on "
             "the points that ran (time to first token: quadratic in the latents for the in-sequence design, "
             "linear otherwise; memory and per-token time linear), extrapolated.", "",
             "| video | windows | latents | design | runs | first token from latents (s) | with encoding (s) | "
             "per token (ms) | peak, allocator (MiB) | RSS growth in generate (MiB) | held for the video (MiB) |",
             "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for i, p in enumerate(points):
        for design, name in DESIGNS.items():
            d = result["designs"][design]
            row, fits, n = d["rows"][i], d["fits"], p["latents"]
            ttft = row["ttft_s"] if row else value(fits["ttft_s"], n) if fits["ttft_s"] else None
            with_enc = f"{ttft + enc * p['windows']:.2f}" if ttft is not None and enc else "n/a"
            if row is None and ttft is not None:
                with_enc = "~" + with_enc
            lines.append(f"| {_duration(p['seconds'])} | {p['windows']} | {n:,} | {name} | {row['runs'] if row else 0} | "
                         f"{_cell(row, fits['ttft_s'], 'ttft_s', n, 1, '.3f')} | {with_enc} | "
                         f"{_cell(row, fits['per_token_s'], 'per_token_s', n, 1000, '.1f')} | "
                         f"{_cell(row, fits['allocator_peak'], 'allocator_peak', n, 1 / MiB, '.1f')} | "
                         f"{_cell(row, fits['rss_growth'], 'rss_growth', n, 1 / MiB, '.1f')} | "
                         f"{p['held'][design] / MiB:.1f} |")
    lines += ["", *growth_lines(result), "", f"![cost against video length]({Path('bench/results') / png})", ""]
    return "\n".join(lines)


def growth_lines(result: dict) -> list[str]:
    out = ["Growth fitted on the points each design ran (n = latents; per 1,000 latents = 2 min 5 s of video):"]
    for design, name in DESIGNS.items():
        d = result["designs"][design]
        f = d["fits"]
        if not f["ttft_s"]:
            continue
        ttft = f["ttft_s"]
        quad = f" + {ttft[2] * 1e6:.3f} s per (1,000 latents)^2" if len(ttft) > 2 else ""
        stop = (f"; stopped at {d['stopped_at']} s of video (past the budget)" if d["stopped_at"] is not None
                else "; every point ran")
        out.append(f"- {name}: first token {ttft[0]:.3f} s + {ttft[1] * 1e3:.3f} s per 1,000 latents{quad}; "
                   f"peak {f['allocator_peak'][0] / MiB:.1f} MiB + {f['allocator_peak'][1] * 1e3 / MiB:.2f} MiB per "
                   f"1,000 latents; per token {f['per_token_s'][0] * 1e3:.1f} ms + "
                   f"{f['per_token_s'][1] * 1e6:.2f} ms per 1,000 latents{stop}.")
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points, enc = result["points"], result["encode_s_per_window"]
    xs = [p["seconds"] for p in points]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = (("ttft_s", "time to first token (s)", 1), ("allocator_peak", "peak memory, allocator (MiB)", 1 / MiB),
              ("per_token_s", "per-token decode time (ms)", 1000))
    for ax, (key, label, scale) in zip(axes, panels, strict=True):
        for (design, name), colour in zip(DESIGNS.items(), ("tab:blue", "tab:red"), strict=True):
            d = result["designs"][design]
            ran = [(x, r[key] * scale) for x, r in zip(xs, d["rows"], strict=True) if r is not None]
            ax.plot(*zip(*ran, strict=True), "o-", color=colour, label=name)
            missing = [(x, value(d["fits"][key], p["latents"]) * scale)
                       for x, p, r in zip(xs, points, d["rows"], strict=True) if r is None and d["fits"][key]]
            if missing:
                ax.plot(*zip(*([ran[-1]] + missing), strict=True), "o--", mfc="none", color=colour,
                        label=f"{name}, extrapolated")
            if key == "ttft_s" and enc and d["fits"][key]:
                ax.plot(xs, [(r[key] if r is not None else value(d["fits"][key], p["latents"])) + enc * p["windows"]
                             for p, r in zip(points, d["rows"], strict=True)],
                        ":", color=colour, alpha=0.6, label=f"{name}, with encoding")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("video length (s)")
        ax.set_title(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
