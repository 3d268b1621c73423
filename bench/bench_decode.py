"""Text-only decode speed: our generate (eager / compiled static step) vs transformers, int8, the bound.

One thread (torch.set_num_threads(1)), fp32, a 16-token prompt, greedy, a fixed number of new
tokens (128 at `small`; fewer at `1b`, where one run takes tens of seconds). Every row of a
preset is measured in the same process, side by side; the machine's 2 cores are shared with
other work, so figures move between runs and the ratios are the thing to read.

Rows:
* videollama, dynamic cache: the growing-slice step (the code before the static cache, kept as
  the tests' reference in tests/reference_decode.py);
* videollama, static cache, eager / compiled: :func:`decode_step` with fixed shapes, eager or
  through ``torch.compile(dynamic=False)`` (compile time reported separately, not in tokens/s);
* transformers: ``LlamaForCausalLM.generate`` with our decoder's shapes and weights (text-only,
  our model skips every cross-attention block, so both run the same Llama);
* videollama int8: ``quantize_model(model, "int8")`` (torchao int8 weight-only, fused kernel)
  with the compiled step.

The bound: a decode step at batch 1 must stream every weight it uses once; the copy bandwidth
of a 512 MiB tensor (bytes read + written per second, best of 5, measured in this run) over the
weight bytes read per token gives the bound tokens/s. The per-step overhead: the time of one
decode step minus the time of the same matrix-vector products alone (each linear's F.linear on a
[1, 1, K] input, in the step's order, so each weight comes from memory as in the step).
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

import reference_decode  # noqa: E402
from videollama.config import VideoLlamaConfig  # noqa: E402
from videollama.inference import generate as gen  # noqa: E402
from videollama.inference.quantize import quantize_model, weight_bytes  # noqa: E402
from videollama.model.videollama import VideoLlama  # noqa: E402

PROMPT = 16
PLAN = {"small": {"new": 128, "reps": 3}, "1b": {"new": 32, "reps": 1}}
if os.environ.get("BENCH_QUICK"):  # a smoke run of the script itself, figures meaningless
    PLAN = {"small": {"new": 8, "reps": 1}, "1b": {"new": 4, "reps": 1}}
BATCHES = (1, 8)


def timed(fn) -> tuple[float, float]:
    """(process CPU seconds, wall seconds) of one call."""
    c0, w0 = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - c0, time.perf_counter() - w0


def median_time(fn, reps: int) -> tuple[float, float]:
    runs = [timed(fn) for _ in range(reps)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def bandwidth(nbytes: int = 512 * 2**20) -> tuple[float, float]:
    """(copy, read) bandwidth in bytes/s of a large tensor: a copy's bytes read + written per
    second, and a sum's bytes read per second; best of 5 each."""
    a = torch.ones(nbytes // 4)
    b = torch.empty_like(a)
    b.copy_(a)
    copy = min(timed(lambda: b.copy_(a))[1] for _ in range(5))
    read = min(timed(lambda: a.sum())[1] for _ in range(5))
    return 2 * nbytes / copy, nbytes / read


def step_linears(model: VideoLlama) -> list[nn.Module]:
    """The linears one text-only decode step runs, in order (no cross-attention without video)."""
    out = []
    for layer in model.decoder.layers:
        a, m = layer.self_attn, layer.mlp
        out += [a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj]
    return out + [model.lm_head]


def bytes_per_token(model: VideoLlama) -> int:
    """Weight bytes one text-only decode step reads: its linears, norms, one embedding row."""
    d = model.config.decoder
    lin = sum(weight_bytes(m) for m in step_linears(model))
    norms = sum(weight_bytes(m) for layer in model.decoder.layers
                for m in (layer.input_layernorm, layer.post_attention_layernorm)) + weight_bytes(model.decoder.norm)
    return lin + norms + d.hidden_size * model.decoder.embed_tokens.weight.element_size()


def hf_twin(model: VideoLlama):
    """LlamaForCausalLM with our decoder's shapes, sharing our weight tensors (no copy)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    d = model.config.decoder
    cfg = LlamaConfig(vocab_size=d.vocab_size, hidden_size=d.hidden_size, intermediate_size=d.intermediate_size,
                      num_hidden_layers=d.num_layers, num_attention_heads=d.num_heads,
                      num_key_value_heads=d.kv_heads, max_position_embeddings=d.max_seq_len,
                      rms_norm_eps=d.rms_norm_eps, rope_theta=d.rope_theta,
                      tie_word_embeddings=d.tie_word_embeddings, attention_bias=False, mlp_bias=False)
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        hf = LlamaForCausalLM(cfg)
    state = {f"model.{k}": v for k, v in model.decoder.state_dict().items() if not k.startswith("cross_attn_layers.")}
    state["lm_head.weight"] = model.lm_head.weight
    hf.load_state_dict(state, strict=True, assign=True)
    hf.model.rotary_emb = LlamaRotaryEmbedding(config=cfg)  # its buffer was built on meta
    if d.tie_word_embeddings:
        hf.tie_weights()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf.eval()


def prompts(b: int, vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (b, PROMPT), generator=torch.Generator().manual_seed(b))


@torch.inference_mode()
def step_overhead(model: VideoLlama) -> dict[str, float]:
    """ms per decode step at batch 1 (eager dynamic, eager static, compiled static) and of its
    matrix-vector products alone; CPU time, median of 5 x 20 steps."""
    t, n = PROMPT, 20
    max_len = t + 64
    x = prompts(1, model.config.decoder.vocab_size)
    caches = model.decoder.new_kv_cache(1, max_len)
    gen.prefill(model, x, attention_mask=torch.ones_like(x), media=None, kv_caches=caches)
    tok, pos = x[:, -1:], torch.full((1, 1), t)
    key_mask = torch.zeros(1, max_len, dtype=torch.bool)
    key_mask[:, :t + 1] = True
    write = torch.full((1,), t)

    def static(compiled):
        step = gen.compiled_decode_step() if compiled else gen.decode_step
        return lambda: [step(model, tok, position=pos, write_pos=write, key_mask=key_mask, media=None,
                             kv_caches=caches) for _ in range(n)]

    grown = key_mask[:, :t + 1]  # the growing-slice step reads slots 0..t
    dynamic = lambda: [reference_decode.decode_one_token(model, tok, position=pos, key_mask=grown,  # noqa: E731
                                                         media=None, kv_caches=caches, start=t) for _ in range(n)]
    ws = [(m.weight, torch.randn(1, 1, m.weight.shape[1])) for m in step_linears(model)]
    matvecs = lambda: [[F.linear(v, w) for w, v in ws] for _ in range(n)]  # noqa: E731
    out = {}
    for name, fn in [("dynamic", dynamic), ("static", static(False)), ("compiled", static(True)),
                     ("matvecs", matvecs)]:
        fn()  # warm (compiles the compiled step)
        out[name] = 1e3 * median_time(fn, 5)[0] / n
    return out


@torch.inference_mode()
def measure(preset: str) -> dict:
    plan = PLAN[preset]
    new, reps = plan["new"], plan["reps"]
    torch.manual_seed(0)
    model = VideoLlama(VideoLlamaConfig.from_name(preset)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # decisive logits: greedy paths are not near-ties
    vocab = model.config.decoder.vocab_size
    res = {"preset": preset, "new": new, "reps": reps, "rows": [], "bytes_per_token": bytes_per_token(model),
           "fp32_bytes": weight_bytes(model.decoder) + weight_bytes(model.lm_head)}
    torch._dynamo.reset()
    gen._COMPILED.clear()

    def ours(b, compile=False):
        x = prompts(b, vocab)
        return lambda n=new: gen.generate(model, x, max_new_tokens=n, compile=compile)

    def before(b):
        x = prompts(b, vocab)
        return lambda n=new: reference_decode.reference_generate(model, x, max_new_tokens=n)

    def row(name, b, fn, warm_new):
        c, w = timed(lambda: fn(warm_new))  # warm-up: page-in, and the compile where there is one
        cpu, wall = median_time(fn, reps)
        res["rows"].append({"name": name, "batch": b, "cpu": cpu, "wall": wall, "tps": b * new / cpu,
                            "warm_s": w})

    # A warm-up in the same 64-slot cache bucket as the timed run compiles the same graph.
    warm = 4 if -(-(PROMPT + 4) // 64) == -(-(PROMPT + new) // 64) else new
    hf = hf_twin(model)
    for b in BATCHES:
        x = prompts(b, vocab)
        hf_fn = lambda n=new, x=x: hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,  # noqa: E731
                                               min_new_tokens=n, do_sample=False)
        if b == 1:
            a = ours(1)()
            h = hf_fn()[:, PROMPT:]
            res["agree"] = float((a == h).float().mean())
        row("transformers LlamaForCausalLM.generate", b, hf_fn, 4)
        row("videollama, dynamic cache (before)", b, before(b), 4)
        row("videollama, static cache, eager", b, ours(b), 4)
        row("videollama, static cache, compiled", b, ours(b, compile=True), warm)
    hf = None  # frees nothing of ours: it shared our tensors
    res["overhead"] = step_overhead(model) if preset == "small" else None
    res["compile_failed"] = gen._COMPILED.get("failed")

    torch._dynamo.reset()
    gen._COMPILED.clear()
    quantize_model(model, "int8")
    res["int8_bytes"] = weight_bytes(model.decoder) + weight_bytes(model.lm_head)
    res["int8_bytes_per_token"] = bytes_per_token(model)
    for b in BATCHES:
        row("videollama int8 (fused), compiled", b, ours(b, compile=True), warm)
    res["compile_failed"] = res["compile_failed"] or gen._COMPILED.get("failed")
    return res


def report(results: list[dict], samples: list[tuple[float, float]]) -> str:
    bw = max(c for c, _ in samples)
    read_bw = max(r for _, r in samples)
    lines = [
        "## Decoding (text-only, CPU, one thread)",
        "",
        "`bench/bench_decode.py`: greedy generation after a 16-token prompt, fp32 unless marked, "
        "`torch.set_num_threads(1)`; tokens/s = batch x new tokens / process CPU seconds of the whole "
        "`generate` call (prefill included), median of the runs given, after one warm-up run (for "
        "compiled rows the warm-up holds the compile, shown as warm-up s). The machine's 2 cores were "
        "shared with other work (other builds and a training demo) during the run, which perturbs caches and "
        "memory bandwidth: compare the rows of one table (measured side by side), not across runs. "
        "Bandwidth, measured before, between and after the presets (512 MiB tensor, one thread, best of 5 each "
        "time): copy (bytes read + written per second) "
        + ", ".join(f"{c / 1e9:.1f}" for c, _ in samples) + " GB/s, read-only (a sum) "
        + ", ".join(f"{r / 1e9:.1f}" for _, r in samples) + " GB/s. Weight streaming only reads, so the bound "
        f"below is the best read-only figure, **{read_bw / 1e9:.1f} GB/s** (the machine when least loaded in "
        f"this run; a loaded moment gives less); the bound at the best copy figure ({bw / 1e9:.1f} GB/s, "
        "read + write) is shown beside it.",
        "",
    ]
    for r in results:
        rows = {(x["name"], x["batch"]): x for x in r["rows"]}
        bound = read_bw / r["bytes_per_token"]
        lines += [f"### `{r['preset']}` preset: {r['new']} new tokens, "
                  f"{r['reps']} timed run{'s' if r['reps'] > 1 else ''} per row", "",
                  "| implementation | batch | tokens/s (CPU) | per row | wall s | warm-up s |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for x in r["rows"]:
            lines.append(f"| {x['name']} | {x['batch']} | {x['tps']:.1f} | {x['tps'] / x['batch']:.1f} | "
                         f"{x['wall']:.2f} | {x['warm_s']:.1f} |")
        hf1 = rows[("transformers LlamaForCausalLM.generate", 1)]["tps"]
        eager1 = rows[("videollama, static cache, eager", 1)]["tps"]
        comp1 = rows[("videollama, static cache, compiled", 1)]["tps"]
        best1 = max(eager1, comp1)
        best8 = max(rows[("videollama, static cache, eager", 8)]["tps"],
                    rows[("videollama, static cache, compiled", 8)]["tps"])
        int8 = rows[("videollama int8 (fused), compiled", 1)]["tps"]
        lines += [
            "",
            f"* weights read per token (text-only step: self-attention, MLPs, norms, lm_head): "
            f"{r['bytes_per_token'] / 1e6:.1f} MB fp32, {r['int8_bytes_per_token'] / 1e6:.1f} MB int8; bound at "
            f"{read_bw / 1e9:.1f} GB/s read-only: **{bound:.0f} tokens/s** fp32, "
            f"{read_bw / r['int8_bytes_per_token']:.0f} int8 (at {bw / 1e9:.1f} GB/s copy, read + write: "
            f"{bw / r['bytes_per_token']:.0f} fp32).",
            f"* achieved weight streaming rate at batch 1 (bytes per token x tokens/s): transformers "
            f"{rows[('transformers LlamaForCausalLM.generate', 1)]['tps'] * r['bytes_per_token'] / 1e9:.1f} GB/s, "
            f"ours {max(rows[('videollama, static cache, eager', 1)]['tps'], rows[('videollama, static cache, compiled', 1)]['tps']) * r['bytes_per_token'] / 1e9:.1f} GB/s.",
            f"* batch 1 fp32, ours (best of eager/compiled) {best1:.1f} tokens/s = **{100 * best1 / bound:.0f}% of "
            f"the bound** (target >= 85%); transformers {hf1:.1f} ({100 * hf1 / bound:.0f}%). Ours / transformers: "
            f"eager {eager1 / hf1:.2f}x, compiled {comp1 / hf1:.2f}x.",
            f"* batch 8 vs batch 1 total tokens/s (ours, best of eager/compiled): **{best8 / best1:.2f}x** (target >= 5x).",
            f"* int8 weights, compiled, batch 1: {int8:.1f} tokens/s = **{int8 / hf1:.2f}x transformers fp32** "
            f"(target >= 2x); decoder + lm_head weights {r['fp32_bytes'] / 1e6:.1f} MB fp32 -> "
            f"{r['int8_bytes'] / 1e6:.1f} MB int8 ({r['int8_bytes'] / r['fp32_bytes']:.2f}x; the embedding table "
            "stays fp32).",
            f"* greedy tokens equal to transformers' at batch 1: {100 * r['agree']:.0f}% (same weights; float "
            "rounding differs, so a near-tie can flip a token and the paths part from there).",
        ]
        if r["compile_failed"]:
            lines.append(f"* torch.compile FAILED ({r['compile_failed']}): compiled rows ran eager.")
        o = r["overhead"]
        if o:
            lines += [
                "",
                "Per-step time at batch 1 (ms, CPU time, median of 5 x 20 steps at one cache position; "
                "overhead = step minus the same matrix-vector products run alone, F.linear per weight in "
                "the step's order):",
                "",
                "| step | ms/step | matvecs alone | overhead outside the matvecs |",
                "| --- | ---: | ---: | ---: |",
            ]
            for k, name in [("dynamic", "dynamic cache, eager (before)"), ("static", "static cache, eager"),
                            ("compiled", "static cache, compiled")]:
                lines.append(f"| {name} | {o[k]:.2f} | {o['matvecs']:.2f} | {o[k] - o['matvecs']:.2f} |")
            lines.append(f"\nOverhead, compiled vs before: {(o['compiled'] - o['matvecs']):.2f} ms vs "
                         f"{(o['dynamic'] - o['matvecs']):.2f} ms (target: half).")
        lines.append("")
    lines.append(f"_{platform.machine()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}._")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    presets = argv or list(PLAN)
    samples = [bandwidth()]
    results = []
    for p in presets:
        results.append(measure(p))
        samples.append(bandwidth())
    text = report(results, samples)
    out = ROOT / "bench" / "results" / "decode.md"
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
