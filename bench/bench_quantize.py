"""int8 weight-only quantization of the demo model: held-out accuracy, weight memory, decode speed.

Runs the demo's held-out VideoQA evaluation (``videollama eval --task videoqa``, all frames, the
same harness call ``make demo`` makes) twice on the same model directory: fp32, and after
``quantize_model(model, "int8")``; then the weight bytes of the quantized modules and of the whole
model, and decode tokens/s at batch 1 (one video, a 16-token question, 32 new tokens, one
thread): fp32 eager, fp32 compiled, int8 compiled.

Usage: python bench/bench_quantize.py [--model runs/demo/model] [--data data/shapes]
Without a trained model (run ``make demo`` first) it says so and leaves the results file alone.
"""

from __future__ import annotations

import argparse
import copy
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

from videollama.data.tokenizer import load_tokenizer  # noqa: E402
from videollama.eval.harness import evaluate  # noqa: E402
from videollama.inference import generate as gen  # noqa: E402
from videollama.inference.quantize import Int8Linear, quantize_model, weight_bytes  # noqa: E402
from videollama.model.videollama import VideoLlama  # noqa: E402

NEW = 32


def accuracy(model, tokenizer, data: Path, out: Path) -> dict:
    m = evaluate(model, tokenizer, "videoqa", data / "eval" / "videoqa.jsonl", None, out, batch_size=32,
                 meteor=False, progress=False)
    preds = [json.loads(line)["prediction"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    return {"accuracy": m["accuracy"], "by_kind": m.get("accuracy_by_kind", {}), "evaluated": m["evaluated"],
            "predictions": preds}


@torch.inference_mode()
def tokens_per_s(model, compile: bool, reps: int = 5) -> float:
    cfg = model.config
    x = torch.randint(3, cfg.decoder.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    video = torch.randn(1, cfg.preprocess.num_frames, 3, cfg.vision.image_size, cfg.vision.image_size,
                        generator=torch.Generator().manual_seed(1))
    latents = model.encode_video(video)  # once per video, as a server does; the decode is timed

    def run():
        gen.generate(model, x, visual_latents=latents, max_new_tokens=NEW, compile=compile)

    run()  # warm-up (and compile)
    times = []
    for _ in range(reps):
        c0 = time.process_time()
        run()
        times.append(time.process_time() - c0)
    return NEW / statistics.median(times)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=ROOT / "runs" / "demo" / "model")
    p.add_argument("--data", type=Path, default=ROOT / "data" / "shapes")
    args = p.parse_args(argv)
    if not (args.model / "config.json").is_file() or not (args.data / "eval" / "videoqa.jsonl").is_file():
        print(f"bench_quantize: no trained model at {args.model} or no eval set under {args.data} "
              "(run `make demo` first); results left as they were")
        return 0
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(args.model)
    fp32 = VideoLlama.from_pretrained(args.model).eval()
    int8 = quantize_model(copy.deepcopy(fp32), "int8")
    names = [n for n, m in int8.named_modules() if isinstance(m, Int8Linear)]
    lin_fp32 = sum(weight_bytes(fp32.get_submodule(n)) for n in names)
    lin_int8 = sum(weight_bytes(int8.get_submodule(n)) for n in names)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        acc_fp32 = accuracy(fp32, tokenizer, args.data, Path(tmp) / "fp32")
        t1 = time.perf_counter()
        acc_int8 = accuracy(int8, tokenizer, args.data, Path(tmp) / "int8")
        t2 = time.perf_counter()
    speed = {"fp32 eager": tokens_per_s(fp32, False), "fp32 compiled": tokens_per_s(fp32, True)}
    torch._dynamo.reset()
    gen.COMPILED.clear()
    speed["int8 compiled"] = tokens_per_s(int8, True)
    speed["int8 eager"] = tokens_per_s(int8, False, reps=2)
    failed = gen.COMPILED.get("failed")
    same = sum(a == b for a, b in zip(acc_fp32.pop("predictions"), acc_int8.pop("predictions")))
    result = {"same_predictions": same, "fp32": acc_fp32, "int8": acc_int8, "linear_bytes": [lin_fp32, lin_int8],
              "model_bytes": [weight_bytes(fp32), weight_bytes(int8)], "tokens_per_s": speed,
              "eval_s": [t1 - t0, t2 - t1]}
    print(json.dumps(result, indent=2))

    delta = 100 * (acc_int8["accuracy"] - acc_fp32["accuracy"])
    kinds = sorted(set(acc_fp32["by_kind"]) | set(acc_int8["by_kind"]))
    lines = [
        "## int8 weight-only quantization (the demo model)",
        "",
        "`bench/bench_quantize.py`: the `make demo` model (`runs/demo/model`), its held-out VideoQA set "
        f"({acc_fp32['evaluated']} questions, all frames, the demo's `videollama eval` harness call), evaluated "
        "in fp32 and after `quantize_model(model, \"int8\")` (torchao int8 weight-only, one scale per output "
        "row, on every decoder linear and the lm_head; the vision encoder, resampler and embedding stay fp32). "
        "The 2 CPU cores were shared with other work during the run.",
        "",
        "| | fp32 | int8 | difference |",
        "| --- | ---: | ---: | ---: |",
        f"| held-out VideoQA accuracy | {acc_fp32['accuracy']:.3f} | {acc_int8['accuracy']:.3f} | "
        f"**{delta:+.1f} points** |",
    ]
    for k in kinds:
        a, b = acc_fp32["by_kind"].get(k, 0.0), acc_int8["by_kind"].get(k, 0.0)
        lines.append(f"| accuracy, {k} questions | {a:.3f} | {b:.3f} | {100 * (b - a):+.1f} points |")
    lines += [
        f"| quantized linears' weights | {lin_fp32 / 1e6:.2f} MB | {lin_int8 / 1e6:.2f} MB | "
        f"{lin_int8 / lin_fp32:.2f}x |",
        f"| whole model (vision, embedding and norms stay fp32) | {result['model_bytes'][0] / 1e6:.2f} MB | "
        f"{result['model_bytes'][1] / 1e6:.2f} MB | {result['model_bytes'][1] / result['model_bytes'][0]:.2f}x |",
        "",
        f"Target: int8 within 1 point of fp32: **{'met' if abs(delta) <= 1.0 else 'not met'}** ({delta:+.1f}). "
        f"Identical answers (the generated text) on {same} of {acc_fp32['evaluated']} questions.",
        "",
        f"Decode speed at batch 1 (one video encoded once, 16-token prompt, {NEW} new tokens, one thread, "
        "process CPU time, median of 5 after a warm-up):",
        "",
        "| weights, step | tokens/s |",
        "| --- | ---: |",
    ]
    lines += [f"| {k} | {v:.1f} |" for k, v in speed.items()]
    lines += [
        "",
        "This model is tiny (hidden size 96, 2 layers: about 2 MB of decoder weights, which stay in cache), so "
        "its decode step costs per-op overhead more than weight traffic: compiling the step is what speeds it "
        f"up ({speed['fp32 compiled'] / speed['fp32 eager']:.2f}x fp32), and int8 adds "
        f"{speed['int8 compiled'] / speed['fp32 compiled']:.2f}x on top; the weight-bandwidth gains of int8 are "
        "measured at the `small` and `1b` presets in bench/results/decode.md. Eager int8 dequantizes each weight "
        "at every call (as torchao's own weight-only linear does), so eager it is no faster than fp32: int8 is "
        "for the compiled step.",
    ]
    if failed:
        lines.append(f"\ntorch.compile FAILED ({failed}): compiled rows ran eager.")
    lines.append(f"\n_{platform.machine()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}._")
    from machine import stamped  # bench/machine.py: the CPU, its ISA, measured peak and bandwidth
    (ROOT / "bench" / "results" / "quantize.md").write_text(stamped("\n".join(lines) + "\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
