"""``videollama plan --simulate``: the options ``plan`` takes, plus the node size and the global batch;
the simulated step (``simulate.py``) beside the planner's estimate, every collective, and the
projected run time (``project.py``)."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

from videollama.plan.comm import INTER, INTRA, summary
from videollama.plan.project import DAY, WEEK, Hardware, project
from videollama.plan.simulate import GiB, Job, Simulation, simulate

# The planner's breakdown (plan.estimate.BREAKDOWN) -> the simulation's categories it corresponds to
PLANNED_AS = {"parameters": ("parameters",), "gradients": ("gradients", "unsharded_gradients"),
              "optimizer_state": ("optimizer_state",),
              "gathered_parameters": ("gathered_parameters", "all_gather_buffers"),
              "inputs": ("inputs",), "activations": ("activations",), "visual_latents_and_cross_kv": (),
              "kv_cache": (), "transient": ("temporaries", "reduce_scatter_buffers", "buffers")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sim = parser.add_argument_group("--simulate: the real training step on fake tensors and a fake process group")
    sim.add_argument("--simulate", action="store_true", help="run the training step of the plan at full size and world "
                     "size on fake tensors (no memory) and a fake process group of --gpus ranks; measure it with "
                     "FSDPMemTracker and CommDebugMode; project the run time")
    sim.add_argument("--budget-days", type=float, default=21.0, metavar="D", help="--simulate: the run's time budget "
                     "for the projection (default 21: three weeks)")


def job_from(config, s, recipe, *, global_batch: int | None = None) -> tuple[Job, int]:
    """The simulation's Job for the planner's Settings ``s`` (and the recipe, if one was given)."""
    from videollama.train.recipe import LoraSection, OptimizerSection

    if s.mode == "infer":
        raise ValueError("--simulate runs a training step: --mode train, lora or qlora")
    batch = global_batch or (recipe.global_batch if recipe is not None else s.micro_batch * s.gpus)
    if batch % (s.micro_batch * s.gpus):
        raise ValueError(f"global batch {batch} is not a multiple of micro-batch {s.micro_batch} x {s.gpus} GPUs")
    lora = None
    if s.lora:
        alpha = recipe.lora.alpha if recipe is not None and recipe.lora.r else LoraSection.alpha
        lora = LoraSection(r=s.lora_r, alpha=alpha, dropout=s.lora_dropout, target_modules=list(s.lora_targets),
                           parts=list(s.lora_parts))
    # QLoRA: train/loop.py runs it in one process without FSDP, the weights it does not quantize in fp32
    job = Job(config=config, world_size=s.gpus, gpus_per_node=s.gpus_per_node or s.gpus, micro_batch=s.micro_batch,
              frames=s.frames, tokens=s.tokens, precision="fp32" if s.mode == "qlora" else s.precision,
              checkpointing=tuple(s.checkpointing), freeze=tuple(s.freeze), lora=lora, nf4=s.mode == "qlora",
              accumulation=batch // (s.micro_batch * s.gpus),
              reshard_after_forward=recipe.parallel.reshard_after_forward if recipe is not None else True,
              clip_grad=recipe.clip_grad if recipe is not None else 1.0,
              optimizer=recipe.optimizer if recipe is not None else OptimizerSection())
    return job, batch


def compare(sim: Simulation, planned) -> dict[str, tuple[int, int]]:
    """The planner's breakdown at its peak beside the simulation's at its peak: key -> (simulated, planned)."""
    out = {}
    for key, sim_keys in PLANNED_AS.items():
        p = planned.estimate.at_peak.get(key, 0)
        v = sum(sim.at_peak[k] for k in sim_keys)
        if p or v:
            out[key] = (v, p)
    return out


def report(sim: Simulation, planned, proj, name: str, notes: list[str] = ()) -> dict:
    job = sim.job
    rows = summary(sim.collectives, job.accumulation, job.micro_batches)
    return {"model": name, "notes": list(notes), "simulated": sim.to_dict(),
            "planned": {"peak_bytes": planned.estimate.peak, "peak_gib": planned.estimate.peak / GiB,
                        "peak_phase": planned.estimate.phase, "breakdown": planned.estimate.at_peak},
            "side_by_side": {k: {"simulated": a, "planned": b} for k, (a, b) in compare(sim, planned).items()},
            "collectives": [c.to_dict() for c in sim.collectives], "collectives_per_step": rows,
            "projection": proj.to_dict()}


def render(out: dict) -> str:
    from videollama.plan.report import format_bytes as fmt

    s, p, proj = out["simulated"], out["planned"], out["projection"]
    hw = proj["hardware"]
    mesh = " x ".join(f"{v} {k}" for k, v in s["mesh"].items()) or "none (one rank, no FSDP)"
    lines = [f"videollama plan --simulate: {out['model']}, {s['world_size']} rank(s), mesh {mesh}",
             f"  micro-batch {s['micro_batch']}, {s['accumulation']} micro-batch(es) per step "
             f"({s['micro_batches_simulated']} simulated); {s['params'] / 1e9:.3f} B parameters, "
             f"{s['trainable_params'] / 1e9:.3f} B trainable",
             *[f"  note: {n}" for n in out["notes"]],
             f"  per rank, at the peak           {'simulated':>11} {'planned':>11}"]
    for key, row in out["side_by_side"].items():
        lines.append(f"    {key:<28}{fmt(row['simulated']):>11} {fmt(row['planned']):>11}")
    ratio = s["peak_bytes"] / p["peak_bytes"]
    lines.append(f"    {'peak':<28}{fmt(s['peak_bytes']):>11} {fmt(p['peak_bytes']):>11}   simulated / planned "
                 f"{ratio:.3f} (planned peak at {p['peak_phase']})")
    lines.append("  simulated, by FSDPMemTracker's categories: " + ", ".join(
        f"{k.replace('_', ' ')} {fmt(v)}" for k, v in s["at_peak"].items() if v))
    if out["collectives_per_step"]:
        lines.append("  collectives of one step, per rank (full: the whole tensor; sent: ring algorithms):")
    for r in out["collectives_per_step"]:
        lines.append(f"    {r['phase']:<27} {r['kind']:<15}{r['group']:<10}{r['link']:<11}{r['dtype']:<9}"
                     f"x{r['count']:<6}{fmt(r['bytes']):>11} full {fmt(r['wire_bytes']):>11} sent")
    lines.append(f"  per step and GPU: {fmt(proj['intra_bytes_per_step'])} sent inside a node, "
                 f"{fmt(proj['inter_bytes_per_step'])} across nodes; "
                 f"{proj['flops_per_sample'] / 1e12:.1f} TFLOP per sample")
    lo, hi = proj["step_s"]
    lines.append(f"  projection on {hw['name']} ({hw['peak_flops'] / 1e12:.0f} TFLOP/s, MFU {hw['mfu_low']:.0%}-"
                 f"{hw['mfu_high']:.0%}; NVLink {hw['intra_bytes_s'] / 1e9:.0f} GB/s, InfiniBand "
                 f"{hw['inter_bytes_s'] / 1e9:.0f} GB/s per GPU): compute {proj['compute_s'][0]:.1f}-"
                 f"{proj['compute_s'][1]:.1f} s, communication {proj['comm_s']:.2f} s per step of "
                 f"{proj['global_batch']}")
    lines.append(f"    step {lo:.1f} s (overlapped, high MFU) to {hi:.1f} s (no overlap, low MFU); "
                 f"{proj['samples_per_day'][1] / 1e6:.2f}-{proj['samples_per_day'][0] / 1e6:.2f} M samples per day")
    days = proj["budget_s"] / DAY
    lines.append(f"    in {days:g} days: {proj['steps_in_budget'][1]:,.0f}-{proj['steps_in_budget'][0]:,.0f} steps, "
                 f"{proj['samples_in_budget'][1] / 1e6:.0f}-{proj['samples_in_budget'][0] / 1e6:.0f} M samples")
    if proj["days_for_steps"]:
        d = proj["days_for_steps"]
        lines.append(f"    the recipe's {proj['max_steps']:,} steps: {d[0]:.1f}-{d[1]:.1f} days")
    lines.append(f"  simulated in {s['cpu_s']:.0f} s of CPU ({s['wall_s']:.0f} s wall), peak RSS "
                 f"{s['max_rss_bytes'] / GiB:.2f} GiB; no tensor memory was allocated")
    return "\n".join(lines)


def run(args: argparse.Namespace, config, kw: dict, name: str, notes: list[str]) -> int:
    """``plan --simulate``: plan, simulate, project, print (``config``, ``kw``, ``name`` and ``notes``:
    the plan command's, from ``plan.cli.resolve``)."""
    from videollama.plan.planner import plan, settings_for

    notes = list(notes)
    s = settings_for(config, **kw)
    if s.mode == "qlora" and s.precision != "fp32":
        s = replace(s, precision="fp32")
        notes.append("qlora: train/loop.py keeps the weights it does not quantize, and the activations, in fp32: "
                     "simulated and planned so (--precision fp32)")
    if s.mode == "qlora":
        notes.append("qlora: bitsandbytes' NF4 Linear4bit needs CUDA: the step runs with those weights in fp32, "
                     "and their fp32 bytes less their NF4 bytes are taken off the parameters")
    recipe = None
    if args.config is not None:
        from videollama.train.recipe import TrainConfig

        recipe = TrainConfig.from_yaml(args.config)
    job, batch = job_from(config, s, recipe, global_batch=args.global_batch)
    planned = plan(config, s, model_name=name)
    sim = simulate(job)
    proj = project(sim, global_batch=batch, budget_s=args.budget_days * DAY, hardware=Hardware(),
                   max_steps=recipe.max_steps if recipe is not None else None, lora=s.lora)
    out = report(sim, planned, proj, name, notes)
    print(json.dumps(out, indent=2) if args.json else render(out))
    return 0


__all__ = ["INTER", "INTRA", "WEEK", "add_arguments", "compare", "job_from", "render", "report", "run"]
