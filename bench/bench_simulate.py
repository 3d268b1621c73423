"""`videollama plan --simulate` checked against real runs at small scale, then run at full size.

1. Small scale (``videollama.plan.check.compare``): a tiny recipe simulated with 2 fake ranks, run
   for real in 2 gloo processes (train/loop.py's setup_run + train_step under torchrun: the
   collectives in order and rank 0's shard shapes), and run for real as rank 0 alone in a fake
   process group (real tensors and kernels: the CPU allocator's peak, deterministic).
2. Full size: `videollama plan ... --simulate --json`, each in a fresh process: the reference
   recipe on 64 GPUs (8 x 8), the `1b` preset on 8 GPUs, the 13B with LoRA and with QLoRA on one
   GPU; and the 13B step as train/loop.py ran it before the simulation (no gradient sync before the
   last micro-batch: ``Job.sync_on_last_only``).

Writes bench/results/simulate.md; the JSON of each full-size run goes to runs/bench_simulate/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
RAW = ROOT / "runs" / "bench_simulate"      # the JSON of every run (not committed)
GiB = 2**30
RECIPE_13B = str(ROOT / "configs" / "pretrain-13b.yaml")
CASES = [   # (key, label, plan arguments)
    ("13b-64", "videollama-13b, `configs/pretrain-13b.yaml`, 64 GPUs", ["--config", RECIPE_13B, "--gpus", "64"]),
    ("1b-8", "`1b`, micro-batch 4, every block checkpointed, 8 GPUs",
     ["--preset", "1b", "--gpus", "8", "--micro-batch", "4", "--activation-checkpointing", "--global-batch", "2048"]),
    ("13b-lora", "videollama-13b LoRA r 16 (`--mode lora`), 1 GPU", ["--config", RECIPE_13B, "--mode", "lora"]),
    ("13b-qlora", "videollama-13b QLoRA (`--mode qlora`), 1 GPU", ["--config", RECIPE_13B, "--mode", "qlora"]),
]
SMALL = [   # (recipe changes to check.TINY_RECIPE, what it is)
    ({}, "64 tokens, micro-batch 4, 1 micro-batch a step"),
    ({"global_batch": 16}, "64 tokens, micro-batch 4, 2 micro-batches a step"),
    ({"data": {"kind": "synthetic", "synthetic_seq_len": 16}, "micro_batch": 2, "global_batch": 4},
     "16 tokens, micro-batch 2 (peak at the root's reduce-scatter)"),
]


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def _python(args: list[str], what: str) -> str:
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    if p.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{p.stderr[-3000:]}")
    return p.stdout


def run_cli(key: str, args: list[str]) -> dict:
    out = _python(["-m", "videollama.cli", "plan", *args, "--simulate", "--json"], key)
    RAW.mkdir(parents=True, exist_ok=True)
    (RAW / f"{key}.json").write_text(out)
    return json.loads(out)


def old_loop_13b() -> dict:
    """The 13B recipe's step with no gradient sync before the last micro-batch, in a fresh process."""
    code = ("import json\n"
            "from videollama.plan.cli import _from_recipe\n"
            "from videollama.plan.planner import settings_for\n"
            "from videollama.plan.simulate import simulate, with_changes\n"
            "from videollama.plan.simulate_cli import job_from\n"
            "from videollama.train.recipe import TrainConfig\n"
            f"config, name, kw, notes = _from_recipe({RECIPE_13B!r})\n"
            "s = settings_for(config, **{**kw, 'gpus': 64, 'gpus_per_node': 8})\n"
            f"job, batch = job_from(config, s, TrainConfig.from_yaml({RECIPE_13B!r}))\n"
            "print(json.dumps(simulate(with_changes(job, sync_on_last_only=True)).to_dict()))\n")
    out = json.loads(_python(["-c", code], "the old loop's 13B step").strip().splitlines()[-1])
    (RAW / "13b-64-sync-on-last-only.json").write_text(json.dumps(out, indent=2))
    return out


def small_scale() -> list[str]:
    from videollama.plan.check import TINY_RECIPE, compare

    rows = []
    for change, what in SMALL:
        r = compare({**TINY_RECIPE, **change}, 2)
        counts = ", ".join(f"{c['kind']} x{c['count']} ({c['dtype']}, {c['bytes']:,} B)" for c in r["collectives_simulated"])
        rows.append(f"| {what} | {counts} | {'yes' if r['same_collectives_in_order'] else '**no**'} | "
                    f"{'yes' if r['same_shard_shapes'] else '**no**'} ({r['parameters']}) | "
                    f"{r['real_allocator_peak']:,} | {r['simulated_peak']:,} | **{r['peak_ratio']:.4f}** | "
                    f"{r['gloo_allocator_peak']:,} | {r['simulation_cpu_s']:.0f} s |")
        print(rows[-1], flush=True)
    return ["### Small scale: 2 fake ranks against real runs of the same recipe", "",
            "`videollama.plan.check.compare`, the tiny preset at 4 frames of 32 px, bf16 mixed precision through "
            "FSDP2, every block checkpointed, built on the meta device. The real runs are train/loop.py's "
            "`setup_run` and two `train_step` calls; rank 0 records the second step's collectives (the same "
            "`CommRecorder`) and the peak of the bytes held through torch's CPU allocator from before the model "
            "is built (`AllocatorTrace`). **gloo**: 2 processes under torchrun: the collectives and the shard "
            "shapes are compared with it. Its allocator peak is only ever too high, by an amount that changes "
            "from run to run: the profiler follows the main thread and misses the frees of buffers that gloo's "
            "own threads release last. **alone**: rank 0 alone in a fake process group of 2 (real tensors and "
            "kernels, collectives that move nothing), deterministic: the peaks are compared with it. Bytes.", "",
            "| recipe | collectives of one step (simulated) | same as gloo's, in order (kind, group, bytes, dtype) | "
            "same shard shapes (parameters) | real peak, alone | simulated peak | simulated / real | real peak, "
            "gloo | simulation CPU |", "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |", *rows, "",
            "The last row's real peak is at the root's reduce-scatter, where the CPU's `_chunk_cat` (FSDP2's "
            "reduce-scatter copy-in) is a composite that copies its inputs before writing the output; CUDA has a "
            "kernel that writes directly, and the fake step uses the meta kernel, so the simulation is CUDA's "
            "account there. In the first two rows the peak is the loss's, as at full size.", ""]


def _range(pair, fmt: str, scale: float = 1.0) -> str:
    lo, hi = sorted(x / scale for x in pair)
    return f"{format(lo, fmt)}-{format(hi, fmt)}"


def full_size() -> tuple[list[str], dict]:
    from videollama.config import VideoLlamaConfig
    from videollama.plan.info import count_params, fsdp_memory

    results = {key: run_cli(key, args) for key, _, args in CASES}
    info = {}
    for key, preset, world in (("13b-64", "videollama-13b", 64), ("1b-8", "1b", 8)):
        cfg = VideoLlamaConfig.from_name(preset)
        info[key] = f"{fsdp_memory(cfg, count_params(cfg), world_size=world, micro_batch=4).total_gib:.1f} GiB"
    rows, proj_rows = [], []
    for key, label, _ in CASES:
        r = results[key]
        s, p, j = r["simulated"], r["planned"], r["projection"]
        mesh = " x ".join(str(v) for v in s["mesh"].values()) or "no FSDP"
        rows.append(f"| {label} | {s['world_size']} ({mesh}), {s['accumulation']} micro-batches | "
                    f"**{s['peak_gib']:.1f} GiB** | {p['peak_gib']:.1f} GiB | {info.get(key, '-')} | "
                    f"{s['peak_bytes'] / p['peak_bytes']:.3f} | {j['intra_bytes_per_step'] / GiB:,.0f} GiB | "
                    f"{j['inter_bytes_per_step'] / GiB:,.1f} GiB | {s['cpu_s'] / 60:.1f} min, "
                    f"{s['max_rss_bytes'] / GiB:.2f} GiB |")
        proj_rows.append(f"| {label} | {j['flops_per_sample'] / 1e12:.0f} | {_range(j['compute_s'], '.1f')} s | "
                         f"{j['comm_s']:.2f} s | **{_range(j['step_s'], '.1f')} s** | "
                         f"{_range(j['samples_per_day'], ',.2f', 1e6)} M | {_range(j['steps_in_budget'], ',.0f')} | "
                         f"**{_range(j['samples_in_budget'], ',.0f', 1e6)} M** |")
    lines = ["### Full size", "",
             "`videollama plan ... --simulate --json` (`--gpus-per-node 8`), one process per row: rank 0 of the job "
             "on fake tensors. Memory per GPU at the step's peak; **planned**: `videollama plan` for the same "
             "recipe; **info**: `videollama info`'s estimate (sharding over every GPU, micro-batch 4). Sent: "
             "bytes each GPU sends per optimizer step (ring algorithms), inside a node (NVLink) and across nodes "
             "(InfiniBand).", "",
             "| job | GPUs (mesh), per step | simulated peak | planned | info | simulated / planned | sent inside "
             "a node | sent across nodes | simulation: CPU, peak RSS |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |", *rows, "",
             "Projection (`videollama.plan.project`), on A100 80GB SXM4: 312 TFLOP/s bf16 at 40-55% MFU (model FLOPs "
             "of `videollama info`; LoRA: forward plus the input-gradient backward of the decoder side); NVLink "
             "300 GB/s per direction per GPU; one 200 Gb/s HDR InfiniBand NIC per GPU (25 GB/s). A step takes the "
             "larger of compute and communication at 55% MFU (FSDP2 overlaps them) to their sum at 40% (no "
             "overlap); global batch 2,048; three weeks = 21 days.", "",
             "| job | TFLOP / sample | compute / step | communication / step | step | samples / day | steps in 3 "
             "weeks | samples in 3 weeks |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |", *proj_rows, ""]
    return lines, results


def thirteen_b_account(results: dict, old: dict) -> list[str]:
    """The 13B rows explained: simulated against planned by item, the old loop, the seed's 3 weeks."""
    from videollama.plan.project import Hardware

    r = results["13b-64"]
    s, p, j = r["simulated"], r["planned"], r["projection"]
    side = "; ".join(f"{k.replace('_', ' ')} {v['simulated'] / GiB:.2f} / {v['planned'] / GiB:.2f}"
                     for k, v in r["side_by_side"].items())
    a = old["at_peak"]
    held = a["unsharded_gradients"]
    recipe_step = 69.0                      # configs/pretrain-13b.yaml's own estimate of a step
    hw = Hardware()
    mfu = j["flops_per_step"] / (recipe_step * s["world_size"] * hw.peak_flops)
    days = j["days_for_steps"]
    return ["### The 13B reference recipe, read", "",
            f"- **Memory**: simulated {s['peak_gib']:.1f} GiB per GPU, planned {p['peak_gib']:.1f} GiB "
            f"({p['peak_phase']}), GiB simulated / planned at each one's peak: {side}. The planner puts the "
            "activations and the loss's transients in two items; together they agree with the tracker's "
            "activations. `info`'s figure shards over all 64 GPUs; train/parallel.py shards over the 8 of a "
            "node and replicates across nodes, so the state is 8x `info`'s.",
            f"- **Before the simulation** train/loop.py synced gradients on the last micro-batch only. FSDP2 then "
            f"keeps the whole model's gradient unsharded in fp32 between micro-batches: simulated peak "
            f"**{old['peak_gib']:.1f} GiB**, of which {held / GiB:.1f} GiB that gradient: the recipe did not fit "
            "in 80 GB. The loop now reduce-scatters every micro-batch and all-reduces across nodes once a step.",
            f"- **Communication**: {j['intra_bytes_per_step'] / GiB:,.0f} GiB sent per GPU and step inside a node "
            f"(all-gathers of every block in forward and again in backward, the gradient's reduce-scatter, for 8 "
            f"micro-batches), {j['inter_bytes_per_step'] / GiB:.1f} GiB across nodes (one all-reduce of the fp32 "
            f"gradient shards): {j['comm_s']:.1f} s at the stated links, against {j['compute_s'][0]:.0f}-"
            f"{j['compute_s'][1]:.0f} s of compute; compute-bound even with no overlap.",
            f"- **Three weeks**: {_range(j['steps_in_budget'], ',.0f')} steps of 2,048, "
            f"{_range(j['samples_in_budget'], ',.0f', 1e6)} M video-text pairs at 40-55% MFU. The recipe's "
            f"25,000 steps take {days[0]:.1f}-{days[1]:.1f} days. The recipe's own estimate (a 69 s step: 40% "
            f"of peak with a third more for recomputation) is {mfu:.0%} MFU: 25,000 steps in "
            f"{25000 * recipe_step / 86400:.0f} days, the seed's \"about 3 weeks\" at the bottom of this range "
            "or just below it.", ""]


def main() -> int:
    import torch

    small = small_scale()
    lines, results = full_size()
    old = old_loop_13b()
    out = ["## `videollama plan --simulate`: the training step at full size on fake tensors", "",
           f"`bench/bench_simulate.py` on {cpu_name()} ({os.cpu_count()} cores, shared with other work), torch "
           f"{torch.__version__} (CPU build), no GPU: every figure comes from running the step; nothing is "
           "allocated at full size.", "", *small, *lines, *thirteen_b_account(results, old)]
    from machine import write_result

    print(f"wrote {write_result('simulate', chr(10).join(out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
