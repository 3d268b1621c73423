"""The int8 weight-only product, implementation by implementation, on this machine's ISA(s).

For the decoder's weight shapes of the ``small`` and ``1b`` presets and 1, 8 and 64 rows (a decode
step at batch 1 and 8, a prompt), one thread, median ms per call (tuning.time_calls: interleaved
rounds, this thread's CPU time):

* fp32: ``F.linear`` on the float32 weight (the baseline int8 must beat);
* kernel: our C kernel (inference/int8_kernel.py) for the ISA in use;
* aten: ``torch.ops.aten._weight_int8pack_mm``;
* dequant: ``x @ int8.to(float).T * scale`` (torchao 0.18's weight-only formula, written out);
* torchao: an ``nn.Linear`` after ``quantize_(..., Int8WeightOnlyConfig())``, eager;
* fused (compiled): the inductor reduction of quantize._fused under ``torch.compile`` (rows 1, 8;
  one compile per shape and row count).

and which one ``quantize_model(kernel="auto")`` keeps for each shape (tuning.choose_int8, fresh
cache). On a CPU with AVX-512 the script runs again in a subprocess with ``VIDEOLLAMA_ISA=avx2
ATEN_CPU_CAPABILITY=avx2``, and both ISAs go side by side; a CPU without AVX-512 cannot emulate it
(said under the table). Usage: python bench/bench_int8.py [--quick] (--quick: small shapes only,
no compile). Results: bench/results/int8.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import machine  # noqa: E402
from videollama.inference import host, int8_kernel, tuning  # noqa: E402
from videollama.inference.int8_impls import candidates, product  # noqa: E402

SHAPES = {"small": [(384, 384, "q/k/v/o"), (1024, 384, "gate/up"), (384, 1024, "down"), (8192, 384, "lm_head")],
          "1b": [(2048, 2048, "q/o"), (5632, 2048, "gate/up"), (2048, 5632, "down")]}
ROWS = (1, 8, 64)
FUSED_ROWS = (1, 8)
IMPLS = ("fp32", "kernel", "aten", "dequant", "torchao", "fused")


def torchao_linear(w: torch.Tensor):
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data.copy_(w)
    quantize_(lin, Int8WeightOnlyConfig(set_inductor_config=False))
    return lin


@torch.inference_mode()
def measure_shape(n: int, k: int, compile_fused: bool) -> dict:
    """{rows: {impl: ms}} and the auto choice for one weight [n, k]."""
    g = torch.Generator().manual_seed(n * 7 + k)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    scale = (w.abs().amax(1) / 127).contiguous()
    q = torch.round(w / scale[:, None]).clamp(-128, 127).to(torch.int8).contiguous()
    ao = torchao_linear(w)
    names = candidates(q.device, torch.float32)
    out = {}
    for rows in ROWS:
        x = torch.randn(rows, k, generator=g)
        fns = {"fp32": lambda x=x: F.linear(x, w), "torchao": lambda x=x: ao(x)}
        fns |= {name: (lambda x=x, name=name: product(name, x, q, scale)) for name in names}
        out[rows] = tuning.time_calls(fns)
        if compile_fused and rows in FUSED_ROWS:
            fused = torch.compile(lambda x: product("fused", x, q, scale), dynamic=False)
            fused(x)
            out[rows]["fused"] = tuning.time_calls({"fused": lambda x=x, f=fused: f(x)})["fused"]
    choice = tuning.choose_int8(q, scale, torch.float32, names)
    return {"ms": out, "decode": choice["decode"], "prefill": choice["prefill"]}


def run(quick: bool) -> dict:
    torch.set_num_threads(1)
    host.use_compile_cache()
    torch._dynamo.config.recompile_limit = 64
    presets = ["small"] if quick else list(SHAPES)
    res = {"isa": host.isa(), "aten_isa": host.aten_isa(), "kernel": int8_kernel.kernel_status(), "shapes": []}
    for preset in presets:
        for n, k, what in SHAPES[preset]:
            r = measure_shape(n, k, compile_fused=not quick)
            res["shapes"].append({"preset": preset, "n": n, "k": k, "what": what, **r})
            print(json.dumps(res["shapes"][-1]), flush=True)
    return res


def table(results: list[dict]) -> list[str]:
    head = "| shape (N x K) | rows | " + " | ".join(f"{impl} ({r['isa']})" for r in results for impl in IMPLS) + \
           " | fastest int8 vs fp32 | kept (decode / prompt) |"
    lines = [head, "|" + " --- |" * 2 + " ---: |" * (len(IMPLS) * len(results) + 1) + " --- |"]
    for i, s in enumerate(results[0]["shapes"]):
        for rows in ROWS:
            cells = []
            for r in results:
                ms = r["shapes"][i]["ms"][rows] if rows in r["shapes"][i]["ms"] else r["shapes"][i]["ms"][str(rows)]
                cells += [f"{ms[impl]:.3f}" if impl in ms else "" for impl in IMPLS]
            ms = s["ms"][rows] if rows in s["ms"] else s["ms"][str(rows)]
            best = min(v for name, v in ms.items() if name != "fp32")
            kept = " / ".join(f"{r['shapes'][i]['decode']} / {r['shapes'][i]['prefill']}" for r in results)
            lines.append(f"| {s['preset']} {s['what']} {s['n']} x {s['k']} | {rows} | " + " | ".join(cells) +
                         f" | {ms['fp32'] / best:.1f}x | {kept} |")
    return lines


def report(results: list[dict]) -> str:
    lines = [
        "## int8 weight-only products, implementation by implementation",
        "",
        "`bench/bench_int8.py`: one weight-only int8 product (per-row scales) for each decoder weight shape of the "
        "`small` and `1b` presets, at 1, 8 and 64 rows, one thread, median ms per call (interleaved rounds, the "
        "thread's CPU time; weights hot in cache as in a repeated call). fp32 is `F.linear` on the float weight; "
        "kernel our C kernel (" + "; ".join(f"{r['isa']}: {r['kernel']}" for r in results) + "); aten "
        "`aten._weight_int8pack_mm`; dequant `x @ int8.float().T * scale`; torchao an `nn.Linear` quantized by "
        "torchao's `Int8WeightOnlyConfig`, eager; fused the inductor reduction compiled (rows 1 and 8). An empty "
        "cell was not run. The last column is what `quantize_model(kernel=\"auto\")` keeps for that shape on this "
        "machine (decode rows / prompt rows), measured by `tuning.choose_int8` in a fresh cache.",
        "",
        *table(results),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", type=Path, help="write the raw results here instead of the report (used for the "
                                             "lowered-ISA subprocess)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["VIDEOLLAMA_CACHE"] = cache  # fresh choices: measured in this run
        results = [run(args.quick)]
        if args.json:
            args.json.write_text(json.dumps(results[0]))
            return 0
        if host.isa() == "avx512":
            out = Path(cache) / "avx2.json"
            env = {**os.environ, "VIDEOLLAMA_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2"}
            subprocess.run([sys.executable, __file__, *argv, "--json", str(out)], env=env, check=True)
            results.append(json.loads(out.read_text()))
    text = report(results)
    machine.write_result("int8", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
