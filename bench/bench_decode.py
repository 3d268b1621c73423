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
* --compile (as chosen): ``generate(compile=True)`` as the commands run it: the compiled or the
  eager step, whichever the start-up measurement found faster on this host (a fresh cache
  directory, so the warm-up holds the first start's compile and measurement);
* transformers: ``LlamaForCausalLM.generate`` with our decoder's shapes and weights (text-only,
  our model skips every cross-attention block, so both run the same Llama);
* videollama int8: ``quantize_model(model, "int8")`` (each weight shape's fastest implementation
  on this host, measured at load), eager, as chosen and compiled.

The bound: a decode step at batch 1 must stream every weight it uses once; the copy bandwidth
of a 512 MiB tensor (bytes read + written per second, best of 5, measured in this run) over the
weight bytes read per token gives the bound tokens/s. The per-step overhead: the time of one
decode step minus the time of the same matrix-vector products alone (each linear's F.linear on a
[1, 1, K] input, in the step's order, so each weight comes from memory as in the step).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import machine  # noqa: E402
import reference_decode  # noqa: E402
from videollama.config import VideoLlamaConfig  # noqa: E402
from videollama.inference import generate as gen  # noqa: E402
from videollama.inference.quantize import Int8Linear, quantize_model, weight_bytes  # noqa: E402
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
    # text only: our model skips the cross-attention blocks and the time code (media_time) without a video
    state = {f"model.{k}": v for k, v in model.decoder.state_dict().items()
             if not k.startswith(("cross_attn_layers.", "media_time."))}
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
    gen.COMPILED.clear()

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

    def compiled_rows(label, b):
        """The step as --compile chooses it on this host (the warm-up holds the compile and the
        measurement), then the compiled step forced (the graph is compiled already)."""
        with step_policy("auto"):
            row(f"{label}, --compile (as chosen)", b, ours(b, compile=True), warm)
        key = (b, -(-(PROMPT + new) // 64) * 64)
        chosen = [r for r in gen.step_report() if (r["rows"], r["cache_len"]) == key and not r["media"]]
        res["rows"][-1]["chosen"] = chosen[-1] if chosen else None
        with step_policy("compiled"):
            row(f"{label}, compiled", b, ours(b, compile=True), warm)

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
        compiled_rows("videollama, static cache", b)
    hf = None  # frees nothing of ours: it shared our tensors
    with step_policy("compiled"):
        res["overhead"] = step_overhead(model) if preset == "small" else None
    res["compile_failed"] = gen.COMPILED.get("failed")

    torch._dynamo.reset()
    gen.COMPILED.clear()
    t = time.perf_counter()
    quantize_model(model, "int8")  # kernel="auto": each shape's implementation measured here
    res["int8_choose_s"] = time.perf_counter() - t
    impls = sorted({m.impl for m in model.modules() if isinstance(m, Int8Linear)})
    res["int8_impls"] = ", ".join(impls)
    res["int8_bytes"] = weight_bytes(model.decoder) + weight_bytes(model.lm_head)
    res["int8_bytes_per_token"] = bytes_per_token(model)
    for b in BATCHES:
        row("videollama int8, eager", b, ours(b), 4)
        compiled_rows("videollama int8", b)
    res["int8_compiled_impls"] = ", ".join(sorted({m.compiled_impl for m in model.modules()
                                                   if isinstance(m, Int8Linear)}))
    res["compile_failed"] = res["compile_failed"] or gen.COMPILED.get("failed")
    return res


@contextlib.contextmanager
def step_policy(value: str):
    """Run with $VIDEOLLAMA_STEP=value: "auto" (as --compile does), "compiled" (forced)."""
    before = os.environ.get(gen.STEP_ENV)
    os.environ[gen.STEP_ENV] = value
    try:
        yield
    finally:
        os.environ.pop(gen.STEP_ENV) if before is None else os.environ.__setitem__(gen.STEP_ENV, before)


def report(results: list[dict], samples: list[tuple[float, float]]) -> str:
    bw = max(c for c, _ in samples)
    read_bw = max(r for _, r in samples)
    lines = [
        "## Decoding (text-only, CPU, one thread)",
        "",
        "`bench/bench_decode.py`: greedy generation after a 16-token prompt, fp32 unless marked, "
        "`torch.set_num_threads(1)`; tokens/s = batch x new tokens / process CPU seconds of the whole "
        "`generate` call (prefill included), median of the runs given, after one warm-up run (warm-up s: "
        "page-in, and for compiled rows the compile; for `--compile (as chosen)` rows also the start-up "
        "measurement that chose the compiled or the eager step, in a fresh cache directory: a first start). "
        "`--compile (as chosen)` is what `generate --compile`, `serve --compile` and `BatchDecoder(compile=True)` "
        "run; `compiled` forces the compiled step. int8 rows: `quantize_model(model, \"int8\")`, each weight "
        "shape's implementation measured at load (bench/results/int8.md). The machine's cores may be shared "
        "with other work: compare the rows of one table (measured side by side), not across runs. "
        "Bandwidth, measured before, between and after the presets (512 MiB tensor, one thread, best of 5 each "
        "time): copy (bytes read + written per second) "
        + ", ".join(f"{c / 1e9:.1f}" for c, _ in samples) + " GB/s, read-only (a sum) "
        + ", ".join(f"{r / 1e9:.1f}" for _, r in samples) + " GB/s. Weight streaming only reads, so the bound "
        f"below is the best read-only figure, **{read_bw / 1e9:.1f} GB/s**; the bound at the best copy figure "
        f"({bw / 1e9:.1f} GB/s, read + write) is shown beside it.",
        "",
    ]
    for r in results:
        lines += preset_table(r, read_bw, bw)
    return "\n".join(lines) + "\n"


def _choice(x: dict) -> str:
    c = x.get("chosen")
    if not c:
        return "?"
    ms = c.get("ms")
    return f"{c['choice']}" + (f" ({ms['compiled']:.2f} vs {ms['eager']:.2f} ms/step)" if ms else "")


def preset_table(r: dict, read_bw: float, bw: float) -> list[str]:
    rows = {(x["name"], x["batch"]): x for x in r["rows"]}
    tps = {k: x["tps"] for k, x in rows.items()}
    bound = read_bw / r["bytes_per_token"]
    lines = [f"### `{r['preset']}` preset: {r['new']} new tokens, "
             f"{r['reps']} timed run{'s' if r['reps'] > 1 else ''} per row", "",
             "| implementation | batch | tokens/s (CPU) | per row | wall s | warm-up s | step chosen at start-up "
             "(compiled vs eager) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for x in r["rows"]:
        lines.append(f"| {x['name']} | {x['batch']} | {x['tps']:.1f} | {x['tps'] / x['batch']:.1f} | "
                     f"{x['wall']:.2f} | {x['warm_s']:.1f} | {_choice(x) if 'chosen' in x else ''} |")
    hf1 = tps[("transformers LlamaForCausalLM.generate", 1)]
    fp, i8 = "videollama, static cache", "videollama int8"
    checks = []
    for label in (fp, i8):
        for b in BATCHES:
            eager = tps[(f"{label}, eager", b)]
            as_chosen = rows[(f"{label}, --compile (as chosen)", b)]
            ran = as_chosen["chosen"]["choice"] if as_chosen.get("chosen") else "?"
            checks.append(f"{'fp32' if label == fp else 'int8'} batch {b}: compiled "
                          f"{tps[(f'{label}, compiled', b)] / eager:.2f}x eager, --compile ran {ran} at "
                          f"{as_chosen['tps'] / eager:.2f}x eager")
    best = {b: max(tps[(f"{fp}, eager", b)], tps[(f"{fp}, compiled", b)]) for b in BATCHES}
    chosen = {(lab, b): tps[(f"{lab}, --compile (as chosen)", b)] for lab in (fp, i8) for b in BATCHES}
    int8_best1 = max(tps[(f"{i8}, eager", 1)], chosen[(i8, 1)])
    lines += [
        "",
        f"* weights read per token (text-only step: self-attention, MLPs, norms, lm_head): "
        f"{r['bytes_per_token'] / 1e6:.1f} MB fp32, {r['int8_bytes_per_token'] / 1e6:.1f} MB int8; bound at "
        f"{read_bw / 1e9:.1f} GB/s read-only: **{bound:.0f} tokens/s** fp32, "
        f"{read_bw / r['int8_bytes_per_token']:.0f} int8 (at {bw / 1e9:.1f} GB/s copy: {bw / r['bytes_per_token']:.0f} fp32).",
        f"* batch 1 fp32, ours (best of eager/compiled) {best[1]:.1f} tokens/s = {100 * best[1] / bound:.0f}% of the "
        f"bound; transformers {hf1:.1f} ({100 * hf1 / bound:.0f}%).",
        f"* **int8, batch 1: {int8_best1:.1f} tokens/s = {int8_best1 / hf1:.2f}x transformers fp32** (target >= 2x; "
        f"--compile as chosen {chosen[(i8, 1)] / hf1:.2f}x, eager {tps[(f'{i8}, eager', 1)] / hf1:.2f}x); implementations "
        f"kept: {r['int8_impls']} eagerly, {r['int8_compiled_impls']} inside a compiled step (chosen in "
        f"{r['int8_choose_s']:.1f} s at load); decoder + lm_head weights {r['fp32_bytes'] / 1e6:.1f} MB fp32 -> "
        f"{r['int8_bytes'] / 1e6:.1f} MB int8.",
        "* compiled vs eager, and what --compile ran (target: never below eager): " + "; ".join(checks) + ".",
        f"* **batch 8 vs batch 1, total tokens/s**: fp32 --compile as chosen **{chosen[(fp, 8)] / chosen[(fp, 1)]:.2f}x**"
        f" (best of eager/compiled {best[8] / best[1]:.2f}x), int8 {chosen[(i8, 8)] / chosen[(i8, 1)]:.2f}x "
        "(target >= 5x).",
        f"* greedy tokens equal to transformers' at batch 1: {100 * r['agree']:.0f}% (same weights; float "
        "rounding differs, so a near-tie can flip a token and the paths part from there).",
    ]
    if r["compile_failed"]:
        lines.append(f"* torch.compile FAILED ({r['compile_failed']}): compiled rows ran eager.")
    return lines + overhead_table(r["overhead"]) + [""]


def overhead_table(o: dict | None) -> list[str]:
    if not o:
        return []
    lines = ["", "Per-step time at batch 1 (ms, CPU time, median of 5 x 20 steps at one cache position; "
             "overhead = step minus the same matrix-vector products run alone, F.linear per weight in "
             "the step's order):", "",
             "| step | ms/step | matvecs alone | overhead outside the matvecs |", "| --- | ---: | ---: | ---: |"]
    for k, name in [("dynamic", "dynamic cache, eager (before)"), ("static", "static cache, eager"),
                    ("compiled", "static cache, compiled")]:
        lines.append(f"| {name} | {o[k]:.2f} | {o['matvecs']:.2f} | {o[k] - o['matvecs']:.2f} |")
    return lines


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    presets = argv or list(PLAN)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["VIDEOLLAMA_CACHE"] = cache  # a first start: every choice measured, every graph compiled
        samples = [bandwidth()]
        results = []
        for p in presets:
            results.append(measure(p))
            samples.append(bandwidth())
    text = report(results, samples)
    machine.write_result("decode", text)  # keeps the earlier AVX-512 section below
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
