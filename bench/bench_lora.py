"""LoRA against full fine-tuning on the demo's Shapes VideoQA task: accuracy, trainable
parameters, optimizer memory and step time, written to bench/results/lora.md.

Accuracy: the LoRA fine-tune is `make demo`'s fine-tune stage (configs/demo-finetune.yaml, same
data, same steps, from the same caption-pre-trained model) plus the `lora:` section and LR below;
it is exported as a peft adapter and scored by the demo's own eval command
(`videollama eval --model PRETRAIN --adapter ADAPTER --task videoqa ...`). The full fine-tune's
figures are read from the demo's report.json.

Cost: the two set-ups (full: every weight trains; LoRA: adapters only) are built side by side in
this process from the same pre-trained model and stepped alternately on the same batches (16 clips,
64 tokens: the demo's micro-batch), one thread; medians of process CPU time and wall time per step;
optimizer memory is the bytes of AdamW's state tensors after a step.

    python bench/bench_lora.py                                # uses runs/demo (make demo) and trains LoRA
    python bench/bench_lora.py --demo /work/demo-base --lora-run runs/lora-demo   # reuse finished runs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from videollama.model.videollama import VideoLlama, lm_loss  # noqa: E402
from videollama.train.lora import apply_lora  # noqa: E402
from videollama.train.optim import build_optimizer  # noqa: E402
from videollama.train.recipe import TrainConfig  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "fc1", "fc2", "gate_proj", "up_proj", "down_proj",
           "proj", "to_q", "to_kv", "to_out", "embed_tokens", "lm_head"]
PARTS = ["vision", "temporal", "resampler", "decoder", "cross_attn", "embeddings"]
LORA_OVERRIDES = ["lora.r=16", "lora.alpha=32", "optimizer.lr=5e-3", f"lora.parts=[{','.join(PARTS)}]",
                  f"lora.target_modules=[{','.join(TARGETS)}]"]
STEPS, WARMUP = 12, 2


def cli(*args: str) -> None:
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "PYTHONPATH": str(ROOT / "src")}
    print("$ videollama " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "videollama.cli", *args], check=True, env=env, cwd=ROOT)


def lora_fine_tune(demo: Path, run: Path, out: Path) -> dict:
    """Train (unless ``run`` holds a finished run), export the adapter, evaluate like the demo."""
    recipe = ROOT / "configs" / "demo-finetune.yaml"
    steps = TrainConfig.from_yaml(recipe).max_steps
    if not (run / "summary.json").is_file() or json.loads((run / "summary.json").read_text())["steps"] < steps:
        cli("train", "--config", str(recipe), "--run-dir", str(run), "--data", str(demo / "data/shapes/train"),
            f"model.init_from={demo / 'runs/demo/pretrain-model'}", f"data.cache_dir={demo / 'data/shapes/cache'}",
            *LORA_OVERRIDES)
    cli("export", str(run), "--out", str(out / "adapter"))
    results = {}
    for name, extra in (("all", []), ("1frame", ["--frames", "1"])):
        cli("eval", "--model", str(demo / "runs/demo/pretrain-model"), "--adapter", str(out / "adapter"),
            "--task", "videoqa", "--data", str(demo / "data/shapes/eval/videoqa.jsonl"), "--out",
            str(out / f"eval-{name}"), "--batch-size", "32", "--no-meteor", *extra)
        results[name] = json.loads((out / f"eval-{name}" / "metrics.json").read_text())
    results["summary"] = json.loads((run / "summary.json").read_text())
    results["train_s"] = sum(json.loads(x)["time_s"] for x in (run / "metrics.jsonl").read_text().splitlines())
    return results


def optimizer_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
               if isinstance(t, torch.Tensor) and t.dim() > 0)


def step_costs(pretrain: Path) -> dict:
    """Full vs LoRA, built from the same model, stepped alternately on the same batches."""
    torch.set_num_threads(1)
    cfg = TrainConfig.from_yaml(ROOT / "configs" / "demo-finetune.yaml",
                                [f"model.init_from={pretrain}", *LORA_OVERRIDES])
    setups = {}
    for name in ("full", "lora"):
        model = VideoLlama.from_pretrained(pretrain).train()
        if name == "lora":
            apply_lora(model, cfg.lora, seed=0)
        setups[name] = (model, build_optimizer(model, cfg.optimizer))
    mc = setups["full"][0].config
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(3, mc.decoder.vocab_size, (cfg.micro_batch, 64), generator=g),
                "video": torch.randn(cfg.micro_batch, mc.preprocess.num_frames, 3, mc.vision.image_size,
                                     mc.vision.image_size, generator=g)} for _ in range(4)]
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in setups}
    for i in range(WARMUP + STEPS):
        for name, (model, opt) in setups.items():
            b = batches[i % len(batches)]
            c0, w0 = time.process_time(), time.perf_counter()
            out = model(input_ids=b["input_ids"], video=b["video"])
            lm_loss(out.logits.float(), b["input_ids"]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= WARMUP:
                times[name].append((time.process_time() - c0, time.perf_counter() - w0))
    res = {}
    for name, (model, opt) in setups.items():
        res[name] = {"params": sum(p.numel() for p in model.parameters()),
                     "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                     "optimizer_bytes": optimizer_bytes(opt),
                     "cpu_s": statistics.median(t[0] for t in times[name]),
                     "wall_s": statistics.median(t[1] for t in times[name])}
    return res


def write(full_report: dict, lora: dict, cost: dict, out: Path, demo: Path) -> str:
    f, lo = full_report, lora["all"]
    fk, lk = f["accuracy_by_kind"], lo["accuracy_by_kind"]
    gap = 100 * (f["accuracy"] - lo["accuracy"])
    cf, cl = cost["full"], cost["lora"]
    mib = 2 ** 20
    lines = [
        "## LoRA against full fine-tuning (issue 14)",
        "",
        f"Shapes VideoQA, held-out split ({lo['n']} questions), both fine-tuned for "
        f"{lora['summary']['steps']} steps of 16 clips from the same caption-pre-trained model "
        "(`make demo`'s pretrain-model) with `configs/demo-finetune.yaml`; LoRA adds "
        f"`{' '.join(LORA_OVERRIDES[:3])}` on every linear layer and the token embedding/output head "
        "(`lora.target_modules`, all parts). Full fine-tuning's figures are `make demo`'s report.json "
        f"({demo}); LoRA's were scored by the same eval command with `--adapter`.",
        "",
        "| | accuracy | static | temporal | 1-frame temporal | trainable params | AdamW state | step CPU s | step wall s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| full fine-tune | {f['accuracy']:.3f} | {fk.get('static', 0):.3f} | {fk.get('temporal', 0):.3f} | "
        f"{f['single_frame_accuracy_by_kind'].get('temporal', 0):.3f} | {cf['trainable']:,} | "
        f"{cf['optimizer_bytes'] / mib:.2f} MiB | {cf['cpu_s']:.3f} | {cf['wall_s']:.3f} |",
        f"| LoRA r=16 | {lo['accuracy']:.3f} | {lk.get('static', 0):.3f} | {lk.get('temporal', 0):.3f} | "
        f"{lora['1frame']['accuracy_by_kind'].get('temporal', 0):.3f} | {cl['trainable']:,} | "
        f"{cl['optimizer_bytes'] / mib:.2f} MiB | {cl['cpu_s']:.3f} | {cl['wall_s']:.3f} |",
        f"| LoRA / full | {lo['accuracy'] / f['accuracy']:.3f} | | | | {cl['trainable'] / cf['trainable']:.3f} | "
        f"{cl['optimizer_bytes'] / cf['optimizer_bytes']:.3f} | {cl['cpu_s'] / cf['cpu_s']:.2f} | "
        f"{cl['wall_s'] / cf['wall_s']:.2f} |",
        "",
        f"**Accuracy gap: {gap:+.1f} points** (full minus LoRA; target: within 3). "
        f"The base model has {cf['params']:,} parameters; LoRA trains {100 * cl['trainable'] / cf['params']:.1f}% "
        "of that count, and AdamW keeps two fp32 moments for exactly the trainable ones.",
        "",
        f"Step cost: measured side by side in one process ({platform.machine()}, one thread, the 2-core machine "
        f"shared with other work), {STEPS} alternating steps each after {WARMUP} warm-up steps, batch "
        "16 clips x 64 tokens, medians. LoRA's step is not cheaper here: on a sub-1M-parameter model the "
        "forward and backward through the activations dominate, the adapters add two thin matmuls per layer, "
        "and the backward still computes gradients through the frozen layers' inputs; what LoRA saves is "
        "the optimizer state and the weight gradients (what matters at 13B, not on this toy).",
        "",
        "What made the difference: a first attempt with adapters on the linear layers only (r=8, the full "
        "fine-tune's LR 2e-3, then r=16 at 5e-3) plateaued at a training loss of 0.55 where full fine-tuning "
        "was at 0.33 (steps 300-600). Caption pre-training never feeds the question words (`what`, `which`, "
        "`how many`) as inputs, so their embeddings were never trained; with the token embedding and the output "
        "head adapted too (peft's LoRA embedding layer) the LoRA curve tracked full fine-tuning's from the start.",
        f"The LoRA run's own training time was {lora['train_s'] / 60:.1f} min over its steps on the loaded machine "
        "(not comparable to the demo's, which ran at another time).",
        "",
        "Reproduce: `python bench/bench_lora.py --demo DIR` (DIR: where `make demo` ran; trains the LoRA "
        "run unless `--lora-run` holds a finished one).",
    ]
    text = "\n".join(lines) + "\n"
    from machine import stamped  # bench/machine.py: the CPU, its ISA, measured peak and bandwidth
    out.write_text(stamped(text))
    return text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", type=Path, default=ROOT, help="folder `make demo` ran in (runs/demo, data/shapes)")
    p.add_argument("--lora-run", type=Path, default=ROOT / "runs" / "bench-lora", help="LoRA run directory")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-lora-out", help="adapter and eval outputs")
    a = p.parse_args()
    report = a.demo / "runs/demo/report.json"
    if not report.is_file():
        print(f"{report} not found: run `make demo` first", file=sys.stderr)
        return 1
    lora = lora_fine_tune(a.demo, a.lora_run, a.out)
    cost = step_costs(a.demo / "runs/demo/pretrain-model")
    print(write(json.loads(report.read_text()), lora, cost, ROOT / "bench/results/lora.md", a.demo))
    return 0


if __name__ == "__main__":
    sys.exit(main())
