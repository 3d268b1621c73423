"""`videollama plan` against measured peaks, on this CPU (fp32), and its 13B answer beside `info`'s.

Every configuration runs twice, each time in a fresh subprocess with one intra-op thread:

* allocator: torch.profiler's memory events (videollama.plan.memtrace.AllocatorTrace) from before
  the model is built to the end: every allocation and free through torch's CPU allocator, in order;
  the peak of the running sum is what tensors held at most (the model, AdamW's state, the batch,
  two training steps, or one `generate`). Exact and deterministic; it does not see memory that
  libraries allocate behind torch's back (BLAS buffers) nor malloc's overhead.
* RSS: the process's resident set, as an independent cross-check. After the model, the optimizer
  state and the batch exist and one warm-up step has run, the kernel's peak-RSS counter is reset
  (``echo 5 > /proc/self/clear_refs``), VmRSS is read, the measured step (or `generate`) runs, and
  VmHWM - VmRSS is the peak growth during it. glibc's malloc runs with ``MALLOC_MMAP_THRESHOLD_=65536``,
  so freed tensors go back to the kernel at once instead of staying in malloc's free lists (which
  would hide the growth). Its prediction is the plan's peak minus what lives across steps
  (parameters, optimizer state, the batch; for inference the weights and the inputs).

LoRA (`mode lora`): the adapters are added by `videollama.train.lora.apply_lora` with the recipe
defaults of `recipe.LoraSection` but r = 16 (`plan.LORA_R`, configs/lora-videoqa.yaml's rank) and
dropout 0 (the planner counts CUDA's 1-byte dropout mask; the CPU keeps a float one), before
checkpointing is applied, as train/loop.py does; AdamW then holds state for the adapters only.
A training step is the training loop's (`videollama.train.loop.micro_step`: forward, fp32 loss
summed over the label tokens; backward; gradient clipping; fused AdamW; `zero_grad(set_to_none)`),
with activation checkpointing applied by `train.parallel.apply_activation_checkpointing`.
Inference is `videollama.inference.generate.generate` (prefill + greedy decoding, no early stop).
Target: the prediction within 15% of the measured peak for every configuration.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

ALL = "vision,temporal,resampler,decoder,cross_attn"
# (preset, mode, micro-batch, frames, tokens (train) or prompt tokens (infer), new tokens, checkpointing)
CONFIGS = [
    ("tiny", "train", 8, 16, 64, 0, ""),
    ("tiny", "train", 8, 16, 64, 0, ALL),
    ("tiny", "train", 8, 4, 64, 0, ""),
    ("shapes", "train", 16, 4, 64, 0, ""),
    ("small", "train", 2, 8, 128, 0, ""),
    ("small", "train", 2, 16, 128, 0, ALL),
    ("small", "train", 2, 16, 128, 0, "decoder,cross_attn"),
    ("small", "train", 1, 2, 512, 0, ""),
    ("tiny", "lora", 8, 16, 64, 0, ""),
    ("tiny", "lora", 8, 16, 64, 0, ALL),
    ("small", "lora", 2, 8, 128, 0, ""),
    ("small", "lora", 2, 16, 128, 0, ALL),
    ("small", "lora", 1, 2, 512, 0, "decoder,cross_attn"),
    ("tiny", "infer", 8, 16, 32, 32, ""),
    ("small", "infer", 1, 4, 96, 32, ""),
    ("small", "infer", 4, 16, 96, 32, ""),
    ("small", "infer", 8, 16, 256, 64, ""),
]
MiB = 2**20


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(spec: dict) -> dict:
    """Build and run one configuration in this process; returns what was measured."""
    import torch

    from videollama.config import VideoLlamaConfig
    from videollama.inference.generate import generate
    from videollama.model.videollama import VideoLlama
    from videollama.plan.memtrace import AllocatorTrace
    from videollama.train.loop import micro_step
    from videollama.train.optim import build_optimizer
    from videollama.train.parallel import apply_activation_checkpointing
    from videollama.train.recipe import OptimizerSection

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = VideoLlamaConfig.from_name(spec["preset"])
    b, frames, tokens, new = spec["micro_batch"], spec["frames"], spec["tokens"], spec["new_tokens"]
    rss = spec["how"] == "rss"
    trace = AllocatorTrace()
    out: dict = {}
    if not rss:
        trace.__enter__()
    model = VideoLlama(cfg)
    size = cfg.vision.image_size
    video = torch.randn(b, frames, 3, size, size)
    if spec["mode"] == "lora":
        from videollama.plan.settings import LORA_R
        from videollama.train.lora import apply_lora
        from videollama.train.recipe import LoraSection

        apply_lora(model, LoraSection(r=LORA_R))
    if spec["mode"] in ("train", "lora"):
        apply_activation_checkpointing(model, [k for k in spec["checkpointing"].split(",") if k])
        opt = build_optimizer(model, OptimizerSection())
        ids = torch.randint(0, cfg.decoder.vocab_size, (b, tokens))
        batch = {"video": video, "input_ids": ids, "labels": ids.clone()}
        label_tokens = b * (tokens - 1)

        def step() -> None:
            with trace.phase("forward"):
                summed = micro_step(model, batch, torch.device("cpu"))
            with trace.phase("backward"):
                (summed / label_tokens).backward()
            del summed
            with trace.phase("optimizer step"):
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
    else:
        model.eval()
        ids = torch.randint(3, cfg.decoder.vocab_size, (b, tokens))

        def step() -> None:
            with trace.phase("generate"):
                generate(model, ids, video, max_new_tokens=new)
    step()  # warm-up: AdamW allocates its state in the first step
    if rss:
        Path("/proc/self/clear_refs").write_text("5")   # reset VmHWM to the current RSS
        before = _status("VmRSS")
        step()
        out["rss_delta"] = _status("VmHWM") - before
    else:
        step()
        trace.__exit__(None, None, None)
        out["allocator_peak"], out["phase"] = trace.peak, trace.peak_phase
    return out


def measure(spec: dict, how: str) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps({**spec, "how": how})],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{spec} ({how}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def predict(spec: dict):
    from videollama.config import VideoLlamaConfig
    from videollama.plan.estimate import estimate
    from videollama.plan.planner import settings_for

    cfg = VideoLlamaConfig.from_name(spec["preset"])
    kw = {"mode": spec["mode"], "micro_batch": spec["micro_batch"], "frames": spec["frames"],
          "tokens": spec["tokens"], "precision": "fp32",
          "checkpointing": tuple(k for k in spec["checkpointing"].split(",") if k)}
    if spec["mode"] == "infer":
        kw["new_tokens"] = spec["new_tokens"]
    if spec["mode"] == "lora":
        kw["lora_dropout"] = 0.0
    e = estimate(cfg, settings_for(cfg, **kw))
    # What lives across steps (in the process before the measured step): the RSS prediction is the rest.
    across = sum(e.at_peak[k] for k in ("parameters", "optimizer_state", "inputs"))
    return e, across


def thirteen_b() -> list[str]:
    """The reference recipe on 64 x 80 GB: the plan beside info.fsdp_memory."""
    from videollama.config import VideoLlamaConfig
    from videollama.plan.estimate import estimate
    from videollama.plan.info import count_params, fsdp_memory
    from videollama.plan.planner import settings_for
    from videollama.plan.settings import GiB
    from videollama.train.recipe import TrainConfig

    recipe = TrainConfig.from_yaml(ROOT / "configs" / "pretrain-13b.yaml")
    cfg = VideoLlamaConfig.from_name(recipe.model.preset)
    rows = []
    for mb in (recipe.micro_batch, 1):
        s = settings_for(cfg, gpus=64, micro_batch=mb, precision=recipe.precision, tokens=recipe.data.max_len,
                         checkpointing=tuple(recipe.parallel.activation_checkpointing))
        e = estimate(cfg, s)
        m = fsdp_memory(cfg, count_params(cfg), world_size=64, micro_batch=mb)
        a = e.at_peak
        rows.append((mb, e, m, a))
    lines = ["### videollama-13b on 64 x 80 GB, the reference recipe (`configs/pretrain-13b.yaml`)", "",
             "bf16 mixed precision through FSDP2 full sharding over 64 GPUs, activation checkpointing on every block, "
             "16 frames at 224 px, 2,048 tokens. `info` is `videollama.plan.info.fsdp_memory` "
             "(what `videollama info` prints, at micro-batch 1 there).", "",
             "| micro-batch | plan: peak | at | state alive then | gathered params | activations + latents | "
             "transient | info: total | state | gathered | activations | plan / info |",
             "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for mb, e, m, a in rows:
        state = a["parameters"] + a["gradients"] + a["optimizer_state"]
        lines.append(f"| {mb} | **{e.peak / GiB:.1f} GiB** | {e.phase} | {state / GiB:.2f} GiB | "
                     f"{a['gathered_parameters'] / GiB:.2f} GiB | "
                     f"{(a['activations'] + a['visual_latents_and_cross_kv']) / GiB:.2f} GiB | "
                     f"{a['transient'] / GiB:.2f} GiB | **{m.total_gib:.1f} GiB** | {m.sharded_state_gib:.2f} GiB | "
                     f"{m.gathered_params_gib:.2f} GiB | {m.activations_gib:.2f} GiB | {e.peak / GiB / m.total_gib:.2f} |")
    mb, e, m, a = rows[0]
    n = mb * recipe.data.max_len * cfg.decoder.vocab_size        # logits of one micro-batch
    state = a["parameters"] + a["gradients"] + a["optimizer_state"]
    full_state = sum(e.totals[k] for k in ("parameters", "gradients", "optimizer_state"))
    root = a["gathered_parameters"] - m.gathered_params_gib * GiB
    lines += ["", "Both fit in 80 GiB with room to spare. Where they differ, at the recipe's micro-batch "
              f"{mb} (plan {e.peak / GiB:.1f} GiB at {e.phase}, info {m.total_gib:.1f} GiB):",
              f"- **state**: the same: 16 B per parameter / 64 = {m.sharded_state_gib:.2f} GiB in `info`, "
              f"{full_state / GiB:.2f} GiB in the plan (which adds AdamW's step counters); but at the plan's peak "
              f"the gradients of this step do not exist yet (`zero_grad(set_to_none=True)`), so "
              f"{state / GiB:.2f} GiB of it is alive then ({(state - m.sharded_state_gib * GiB) / GiB:+.2f} GiB);",
              f"- **gathered parameters**: `info` counts the bf16 copies of the two largest blocks "
              f"({m.gathered_params_gib:.2f} GiB); FSDP also keeps the root module gathered for the whole step "
              f"(token embedding, lm_head, vision embeddings and norms; `reshard_after_forward=False` for the root "
              f"in train/parallel.py): {root / GiB:+.2f} GiB;",
              f"- **the loss**: `info` counts the logits once in fp32 ({4 * n / GiB:.1f} GiB); the step holds them in "
              f"bf16 ({2 * n / GiB:.1f} GiB), the fp32 copy the loop makes (`out.logits.float()`), lm_loss's shifted "
              f"copy (`logits[:, :-1].reshape(-1, V)`) and log_softmax's output, which cross-entropy saves: "
              f"{(2 * n + 3 * 4 * n) / GiB:.1f} GiB together at the end of the forward, "
              f"{(2 * n + 3 * 4 * n - 4 * n) / GiB:+.1f} GiB;",
              f"- **activations**: the checkpointed blocks' inputs are the same in both (the ViT, temporal and "
              f"decoder blocks'); the plan adds the cross-attention and resampler blocks' inputs and what the root "
              f"stages save (patch embedding, the norms' inputs, the final bf16 RMSNorm's fp32 copy), and `info`'s "
              f"\"live activations of one recomputed block\" (16 hidden-sized tensors) are in the plan only where "
              f"a block is recomputed, in backward: at micro-batch 1 the peak is there ({rows[1][1].phase}).",
              "- neither counts the CUDA context, NCCL's buffers or the caching allocator's fragmentation: the plan "
              "calls 90% of the device usable.", ""]
    return lines


def main() -> int:
    import torch

    rows, worst = [], 0.0
    for preset, mode, mb, frames, tokens, new, ac in CONFIGS:
        spec = {"preset": preset, "mode": mode, "micro_batch": mb, "frames": frames, "tokens": tokens,
                "new_tokens": new, "checkpointing": ac}
        alloc, rss = measure(spec, "allocator"), measure(spec, "rss")
        e, across = predict(spec)
        ratio = e.peak / alloc["allocator_peak"]
        rss_ratio = (e.peak - across) / rss["rss_delta"] if rss["rss_delta"] > 0 else float("nan")
        worst = max(worst, abs(ratio - 1))
        text = (f"{tokens} tokens" if mode != "infer" else f"{tokens}+{new} tokens")
        ac_text = "every block" if ac == ALL else (ac.replace(",", ", ") if ac else "none")
        rows.append(f"| {preset} | {mode} | {mb} | {frames} | {text} | {ac_text} | {e.peak / MiB:.1f} | "
                    f"{alloc['allocator_peak'] / MiB:.1f} | **{ratio:.3f}** | {e.phase} | {alloc['phase']} | "
                    f"{(e.peak - across) / MiB:.1f} | {rss['rss_delta'] / MiB:.1f} | {rss_ratio:.3f} |")
        print(rows[-1], flush=True)
    met = "**met**" if worst <= 0.15 else "**not met**"
    lines = ["## Memory planner (`videollama plan`) against measured peaks, CPU, fp32", "",
             "`bench/bench_plan.py`. Each configuration runs in a fresh subprocess, one thread, twice: **allocator** is "
             "the peak of the bytes held through torch's CPU allocator from before the model is built to the end of "
             "two training steps (or one `generate`), from torch.profiler's memory events "
             "(`videollama.plan.memtrace.AllocatorTrace`: every allocation and free, in order; exact and "
             "deterministic); **RSS** is the growth of the process's peak resident set during the second step "
             "(VmHWM reset through /proc/self/clear_refs, malloc returning freed blocks at once), against the plan's "
             "peak minus what lives across steps (parameters, AdamW state, the batch). A training step is the loop's: "
             "forward, fp32 summed loss, backward, clipping, fused AdamW. **lora** rows: the same step after "
             "`train.lora.apply_lora` (peft adapters, r 16, dropout 0, on q/k/v/o/gate/up/down_proj of the decoder "
             "and cross-attention blocks: `recipe.LoraSection`'s defaults), every base weight frozen, AdamW over the "
             "adapters only. Memory in MiB; ratio = predicted / measured.",
             "", "| preset | mode | batch | frames | text | checkpointing | predicted | allocator | ratio | "
             "predicted peak at | measured in | predicted step growth | RSS growth | ratio |",
             "| --- | --- | ---: | ---: | --- | --- | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: |", *rows, "",
             f"Target: every prediction within 15% of the allocator's peak: {met} (largest deviation "
             f"{100 * worst:.1f}%).", "", *thirteen_b(),
             f"_{platform.machine()}, torch {torch.__version__}, {len(CONFIGS)} configurations._"]
    out = ROOT / "bench" / "results" / "plan.md"
    from machine import stamped  # bench/machine.py: the CPU, its ISA, measured peak and bandwidth
    out.write_text(stamped("\n".join(lines) + "\n"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(child(json.loads(sys.argv[2]))))
        sys.exit(0)
    sys.exit(main())
