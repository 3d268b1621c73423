"""How long a run takes, projected from a simulated step: compute at a band of model-FLOPs
utilisation, communication over stated links, and what a time budget then holds.

Compute: ``plan.info``'s training FLOPs per sample (matmuls and attention, 2 per multiply-add,
backward twice the forward; with LoRA, the backward of a frozen weight computes only its input's
gradient, once the forward, and no gradient flows into a frozen prefix such as the vision side)
times the global batch, over the GPUs' peak at an MFU band. MFU counts model FLOPs only, as PaLM
defines it: the recomputation of checkpointed blocks (a third more work under full checkpointing)
is hardware work that keeps MFU below the hardware utilisation, not work added to the step.

Communication: the bytes each GPU sends per step (``comm.by_link``: the simulated collectives,
each micro-batch before the last repeated as often as the recipe accumulates, over NCCL's ring
algorithms), inside a node over NVLink and across nodes over InfiniBand, at the stated per-GPU
bandwidths. FSDP2 overlaps them with compute (the next block's all-gather during this block's
compute, reduce-scatters and the cross-node all-reduce during backward): the step takes the
larger of compute and communication with full overlap, their sum with none; both are given.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from videollama.plan.comm import INTER, INTRA, by_link

DAY = 86_400.0
WEEK = 7 * DAY


@dataclass(frozen=True)
class Hardware:
    """Per-GPU figures; the defaults are an A100 80GB SXM4 in an 8-GPU HDR InfiniBand node (DGX A100)."""

    name: str = "A100 80GB SXM4"
    peak_flops: float = 312e12          # dense bf16 tensor cores
    mfu_low: float = 0.40
    mfu_high: float = 0.55
    intra_bytes_s: float = 300e9        # NVLink 3: 12 links x 25 GB/s per direction
    inter_bytes_s: float = 25e9         # one 200 Gb/s HDR NIC per GPU (8 per node)


@dataclass
class Projection:
    gpus: int
    global_batch: int
    flops_per_sample: float
    flops_per_step: float
    intra_bytes_per_step: float         # sent by each GPU
    inter_bytes_per_step: float
    compute_s: tuple[float, float]      # at mfu_high, at mfu_low
    comm_s: float
    step_s: tuple[float, float]         # full overlap at mfu_high, no overlap at mfu_low
    samples_per_day: tuple[float, float]
    budget_s: float
    steps_in_budget: tuple[float, float]
    samples_in_budget: tuple[float, float]
    days_for_steps: tuple[float, float] | None   # for a recipe's max_steps
    max_steps: int | None
    hardware: Hardware

    def to_dict(self) -> dict:
        return {**asdict(self), "hardware": asdict(self.hardware)}


def flops_per_sample(config, *, frames: int, tokens: int, lora: bool = False) -> float:
    """Training FLOPs of one sample (``plan.info``); with LoRA, forward + the input-gradient backward of
    the decoder side (the vision side, frozen and before any adapter, runs forward only)."""
    from videollama.plan.info import forward_flops, train_flops_per_sample

    if not lora:
        return float(train_flops_per_sample(config, frames=frames, tokens=tokens))
    fwd = forward_flops(config, frames=frames, tokens=tokens)
    return float(fwd["total"] + fwd["decoder"] + fwd["cross_attn"] + fwd["lm_head"])


def project(sim, *, global_batch: int, budget_s: float = 3 * WEEK, max_steps: int | None = None,
            hardware: Hardware = Hardware(), lora: bool = False) -> Projection:
    """Step time, throughput and what ``budget_s`` holds for the simulated job ``sim`` (a Simulation)."""
    job = sim.job
    per_sample = flops_per_sample(job.config, frames=job.frames, tokens=job.tokens, lora=lora)
    per_step = per_sample * global_batch
    links = by_link(sim.collectives, job.accumulation, job.micro_batches)
    # a step of global_batch runs global_batch / (micro * world) micro-batches, not the recipe's
    # accumulation when the global batch differs from the recipe's
    scale = global_batch / (job.micro_batch * job.world_size * job.accumulation)
    intra, inter = links[INTRA] * scale, links[INTER] * scale
    fast = per_step / (job.world_size * hardware.peak_flops * hardware.mfu_high)
    slow = per_step / (job.world_size * hardware.peak_flops * hardware.mfu_low)
    comm = intra / hardware.intra_bytes_s + inter / hardware.inter_bytes_s
    step = (max(fast, comm), slow + comm)
    days = tuple(max_steps * s / DAY for s in step) if max_steps else None
    return Projection(gpus=job.world_size, global_batch=global_batch, flops_per_sample=per_sample,
                      flops_per_step=per_step, intra_bytes_per_step=intra, inter_bytes_per_step=inter,
                      compute_s=(fast, slow), comm_s=comm, step_s=step,
                      samples_per_day=tuple(global_batch * DAY / s for s in step), budget_s=budget_s,
                      steps_in_budget=tuple(budget_s / s for s in step),
                      samples_in_budget=tuple(global_batch * budget_s / s for s in step),
                      days_for_steps=days, max_steps=max_steps, hardware=hardware)


def mfu_for(sim, step_s: float, *, global_batch: int, hardware: Hardware = Hardware(), lora: bool = False) -> float:
    """The MFU a step of ``step_s`` seconds means (e.g. a recipe comment's own step time)."""
    job = sim.job
    per_step = flops_per_sample(job.config, frames=job.frames, tokens=job.tokens, lora=lora) * global_batch
    return per_step / (step_s * job.world_size * hardware.peak_flops)
