"""``videollama plan --simulate``: the real training step of a recipe at its full size and world
size, on fake tensors and a fake process group, measured by torch's own trackers.

One process plays one rank of the job:

1. a fake process group of the job's world size (``torch.testing._internal.distributed.fake_pg``:
   every collective returns at once with tensors of the right shapes) and the device mesh
   ``train/parallel.py``'s ``build_mesh`` makes: 1-D ``("shard",)`` on one node, 2-D
   ``("replicate", "shard")`` across nodes (64 ranks, 8 per node: 8 x 8);
2. under ``FakeTensorMode`` (no tensor owns memory, no kernel runs), the model as the training loop
   builds it for a GPU run: on the meta device (``train.build.build_model``), LoRA adapters where the
   recipe has them (``train.lora.apply_lora``), frozen parts (``train.optim.freeze``),
   ``train.parallel.parallelize`` unchanged (activation checkpointing, FSDP2, bf16 mixed
   precision), then ``train.build.materialize`` and ``train.optim.build_optimizer`` (fused AdamW);
3. AdamW's state is created by one step over zero gradients (a real run has it from its first
   step on); then one optimizer step of the training loop (``train.loop.train_step``'s order):
   the recipe's micro-batches (the first without gradient sync, the last with it, as the loop's
   gradient accumulation does; two stand for any number, the memory of the third on is the
   second's), each ``train.loop.micro_step`` (forward, fp32 summed loss) and backward; the loop's
   all-reduces of the label-token count and of its six per-step totals; gradient clipping,
   ``grad_norm.full_tensor()``, the AdamW step, ``zero_grad(set_to_none=True)``;
4. ``FSDPMemTracker`` (``torch.distributed._tools.fsdp2_mem_tracker``) follows every tensor of the
   step by category (sharded parameters, gathered bf16 parameters and all-gather buffers,
   unsharded and sharded gradients, reduce-scatter buffers, optimizer state, activations,
   backward temporaries, inputs) and keeps the snapshot at the peak; ``comm.CommRecorder`` (a
   ``CommDebugMode``) lists every collective with its group and size.

What a CPU-only machine changes, and how it is accounted for:

- the fake tensors are on device ``cpu``, not ``cuda``: with a CPU build of torch, FakeTensorMode
  makes ``cuda`` tensors and a ``cuda`` device mesh is built, but FSDP2 fails at its first step
  ("PyTorch is not linked with support for cuda devices": its streams and events). FSDP2 runs the
  same code on both, except that on CUDA its all-gathers and reduce-scatters run on side streams;
  it holds each all-gather result until the next block's copy-out and each reduce-scatter input
  until the next reduce-scatter in Python references on every device, not through the allocator,
  so the tensors alive at any moment (what the tracker counts) are the same;
- kernels: under fake tensors an op's meta kernel gives its outputs; a kernel's own scratch is not
  seen (on a GPU: cuBLAS and flash-attention workspaces). Where CPU and CUDA kernels differ, the fake
  step is CUDA's account: FSDP2's reduce-scatter copy-in (``_chunk_cat``) has a CUDA kernel, while
  on the CPU it is a composite that copies its inputs first (plan/check.py's last case);
- attention: the CPU ``scaled_dot_product_attention`` picks its flash kernel for these shapes, which
  saves the output and an fp32 log-sum-exp per query, as CUDA's flash and memory-efficient kernels do;
- bf16: under fake tensors no arithmetic runs, so bf16 on a CPU costs nothing and the dtypes of
  every tensor are the mixed-precision policy's, as on a GPU;
- not modelled (by the planner either): the CUDA context, NCCL's communication buffers, cuBLAS
  workspaces and the caching allocator's fragmentation; the planner counts 90% of a device as
  usable for them;
- collectives: the fake group moves nothing; NCCL's would move the bytes listed (``comm.wire_bytes``);
- ``parallel.compile`` is not applied: inductor would compile CPU kernels for fake inputs. Under
  full activation checkpointing compile changes what a block keeps inside its own recomputation,
  not what the step saves across blocks.
"""

from __future__ import annotations

import contextlib
import resource
import time
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist

from videollama.config import VideoLlamaConfig
from videollama.plan.comm import Collective, CommRecorder, mesh_groups
from videollama.plan.tracking import (
    CATEGORIES,
    memory_tracker,
    peak_by_category,
    refile_held_gradients,
    sharding_propagation_apart,
)
from videollama.train.recipe import LoraSection, OptimizerSection

GiB = 2**30
__all__ = ["CATEGORIES", "GiB", "Job", "Simulation", "simulate", "with_changes"]
@dataclass(frozen=True)
class Job:
    """One rank's view of a training job: the model, the world, the micro-batch, the recipe's choices."""

    config: VideoLlamaConfig
    world_size: int = 1
    gpus_per_node: int = 8
    micro_batch: int = 1
    frames: int = 16
    tokens: int = 2048
    precision: str = "bf16"
    checkpointing: tuple[str, ...] = ()
    freeze: tuple[str, ...] = ()
    lora: LoraSection | None = None
    nf4: bool = False                  # QLoRA: the base linears in NF4 (counted, not simulated: see nf4_saving)
    accumulation: int = 1
    # what-if, not what train/loop.py does: no gradient sync before the last micro-batch (the loop did
    # this before the simulation found what it costs: an unsharded fp32 gradient of the whole model)
    sync_on_last_only: bool = False
    reshard_after_forward: bool = True
    clip_grad: float = 1.0
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)

    @property
    def ranks_per_node(self) -> int:
        return min(self.gpus_per_node, self.world_size)

    @property
    def nodes(self) -> int:
        return self.world_size // self.ranks_per_node

    @property
    def fsdp(self) -> bool:
        """The training loop's rule (``parallel.fsdp`` null): FSDP2 with several ranks or bf16 compute."""
        return not self.nf4 and (self.world_size > 1 or self.precision == "bf16")

    @property
    def micro_batches(self) -> int:
        """Micro-batches simulated: the first two of the step (no gradient sync, then sync)."""
        return min(self.accumulation, 2)


@dataclass
class Simulation:
    job: Job
    peak: int                          # bytes, this rank
    at_peak: dict[str, int]            # CATEGORIES' values -> bytes alive at the peak; sums to peak
    collectives: list[Collective]      # the measured optimizer step's, in order
    shard_shapes: dict[str, tuple]     # parameter name -> this rank's local shard shape
    mesh: dict[str, int]               # mesh dimension -> size ({} without FSDP)
    params: int
    trainable_params: int
    cpu_s: float                       # this process's CPU time for the whole simulation
    wall_s: float
    max_rss: int                       # this process's peak resident set, bytes
    nf4_saving: int = 0                # QLoRA: fp32 bytes of the NF4 linears less their NF4 bytes, taken off

    def to_dict(self) -> dict:
        j = self.job
        return {"peak_bytes": self.peak, "peak_gib": self.peak / GiB, "at_peak": self.at_peak,
                "mesh": self.mesh, "world_size": j.world_size, "gpus_per_node": j.ranks_per_node,
                "micro_batch": j.micro_batch, "accumulation": j.accumulation,
                "micro_batches_simulated": j.micro_batches, "params": self.params,
                "trainable_params": self.trainable_params, "cpu_s": self.cpu_s, "wall_s": self.wall_s,
                "max_rss_bytes": self.max_rss, "nf4_substituted_bytes": self.nf4_saving}


# ---- the simulation ---------------------------------------------------------------------------------


def simulate(job: Job) -> Simulation:
    """Run one training step of ``job`` on fake tensors and a fake process group (see the module docstring)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from videollama.train.parallel import build_mesh

    t0, c0 = time.perf_counter(), time.process_time()
    with fake_process_group(job.world_size), sharding_propagation_apart():
        # the mesh reads its rank table back (real tensors): made before fake tensors
        mesh = build_mesh("cpu", job.world_size, job.ranks_per_node) if job.fsdp else None
        with FakeTensorMode():
            model = build(job, mesh)
            optimizer, trainable = warm_optimizer(model, job)
            shards = {name: tuple(_local(p).shape) for name, p in model.named_parameters()}
            peak, at_peak, collectives = measured_step(model, optimizer, trainable, mesh, job)
            params = sum(p.numel() for p in model.parameters())
            trained = sum(p.numel() for p in trainable)
    saving = nf4_saving(job.config) if job.nf4 else 0
    at_peak["parameters"] -= saving       # every base weight is alive at every moment, the peak's too
    return Simulation(job=job, peak=peak - saving, at_peak=at_peak, collectives=collectives, shard_shapes=shards,
                      nf4_saving=saving, mesh=dict(zip(mesh.mesh_dim_names, mesh.shape)) if mesh is not None else {},
                      params=params, trainable_params=trained, cpu_s=time.process_time() - c0,
                      wall_s=time.perf_counter() - t0,
                      max_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


@contextlib.contextmanager
def fake_process_group(world_size: int):
    """This process as rank 0 of ``world_size`` in a fake process group (no other process exists)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("plan --simulate needs a process without a process group")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def build(job: Job, mesh):
    """The model as train/loop.py's ``setup_run`` builds it, on fake tensors: on the meta device,
    sharded, then allocated (a GPU run's meta init); without FSDP (QLoRA), on the device at once."""
    from videollama.train.build import materialize
    from videollama.train.parallel import parallelize

    cpu = torch.device("cpu")
    with torch.device("meta"):
        model = _model(job.config)
        if job.lora is not None:   # the adapters on the meta device too (peft moves them to their base's)
            from videollama.train.lora import apply_lora

            apply_lora(model, job.lora, quantize=False)   # NF4 (QLoRA) needs bitsandbytes on a GPU
    if not job.fsdp:
        _allocate_unsharded(model, cpu)
    if job.lora is None:
        from videollama.train.optim import freeze

        freeze(model, list(job.freeze))
    parallelize(model, mesh, activation_checkpointing=list(job.checkpointing), compile=False,
                bf16=job.precision == "bf16", reshard_after_forward=job.reshard_after_forward)
    if job.fsdp and job.lora is not None:
        from videollama.train.lora import reset_lora, without_adapters

        model.to_empty(device=cpu)
        with without_adapters(model):
            materialize(model, cpu, 0)
        reset_lora(model)
    elif job.fsdp:
        materialize(model, cpu, 0)
    # Fake token ids have no values to range-check (VideoLlama.check_tokens reads min and max);
    # the synthetic ids below are drawn inside the vocabulary.
    model.check_tokens = lambda input_ids, *, extra=0: None
    return model


def _allocate_unsharded(model, device: torch.device) -> None:
    """``model.to_empty(device)`` for a model that FSDP does not shard: ``Module._apply`` swaps fake
    parameters in place, which FakeTensorMode's tensor memo refuses, so each is replaced (ties kept)."""
    import torch.nn as nn

    new: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()) + list(module._buffers.items()):
            if p is None:
                continue
            if id(p) not in new:
                t = torch.empty_like(p, device=device)
                new[id(p)] = nn.Parameter(t, requires_grad=p.requires_grad) if isinstance(p, nn.Parameter) else t
            (module._parameters if name in module._parameters else module._buffers)[name] = new[id(p)]


def nf4_saving(config: VideoLlamaConfig) -> int:
    """QLoRA: what NF4 saves over fp32 on the linears ``train.lora.quantize_nf4`` quantizes (every
    ``nn.Linear`` but ``lm_head``). bitsandbytes' ``Linear4bit`` needs CUDA, so the simulation runs the
    step with those weights in fp32 and takes this off; their dequantized bf16 copy (one layer at a
    time) and what ``MatMul4Bit`` saves for backward are not simulated."""
    import torch.nn as nn

    from videollama.plan.params import nf4_bytes

    with torch.device("meta"):
        model = _model(config)
    return sum(4 * m.weight.numel() - nf4_bytes(m.weight.numel()) for name, m in model.named_modules()
               if type(m) is nn.Linear and name != "lm_head")


def _model(config: VideoLlamaConfig):
    from videollama.model.videollama import VideoLlama

    return VideoLlama(config)


def warm_optimizer(model, job: Job):
    """``train.optim.build_optimizer``'s AdamW with its state created, as after a run's first step."""
    from videollama.train.optim import build_optimizer

    optimizer = build_optimizer(model, job.optimizer)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer, trainable


def measured_step(model, optimizer, trainable, mesh, job: Job) -> tuple[int, dict[str, int], list[Collective]]:
    """One optimizer step of the training loop under FSDPMemTracker (MemTracker without FSDP) and a CommRecorder."""
    tracker = memory_tracker(model, optimizer, fsdp=job.fsdp)
    recorder = CommRecorder(mesh_groups(mesh, job.nodes))
    with tracker, recorder:
        train_step(model, optimizer, trainable, job, recorder, tracker)
    at_peak = peak_by_category(tracker)
    return sum(at_peak.values()), at_peak, recorder.collectives


def synthetic_batch(job: Job) -> dict:
    """One micro-batch shaped as train.synthetic.SyntheticClips makes it (fake: shapes only)."""
    c = job.config
    size = c.vision.image_size
    ids = torch.randint(3, c.decoder.vocab_size, (job.micro_batch, job.tokens))
    return {"video": torch.randn(job.micro_batch, job.frames, c.vision.num_channels, size, size),
            "input_ids": ids, "labels": ids.clone()}


def train_step(model, optimizer, trainable, job: Job, recorder: CommRecorder, tracker) -> None:
    """train.loop.train_step's tensor work, in its order, without the values it reads back (fake
    tensors have none): its scalar all-reduces are issued with the same shapes. The loop loads a
    step's micro-batches into host memory first and moves each to the GPU in its forward: here each
    is made when it runs."""
    from videollama.train.loop import micro_step

    cpu = torch.device("cpu")
    recorder.phase = "loop scalars"
    _all_reduce_scalars(1, job)                     # the global batch's label-token count
    label_tokens = job.micro_batch * (job.tokens - 1) * job.world_size * job.accumulation
    for m in range(job.micro_batches):
        last = m == job.micro_batches - 1
        batch = synthetic_batch(job)
        tracker.track_inputs((batch,)) if job.fsdp else tracker.track_external(*batch.values())
        if m:   # FSDPMemTracker keeps per-module stats for one forward; its step-wide peak stays
            tracker.reset_mod_stats()
        if job.fsdp and job.sync_on_last_only:
            model.set_requires_gradient_sync(last)
        elif job.fsdp:
            model.set_requires_all_reduce(last)   # the loop: reduce-scatter always, all-reduce across nodes on the last
        recorder.micro_batch, recorder.phase = m + 1, "forward"
        summed = micro_step(model, batch, cpu)
        recorder.phase = ("backward" if last else "backward, no gradient sync" if job.sync_on_last_only
                          else "backward, no all-reduce across nodes")
        (summed * (job.world_size / label_tokens)).backward()
        del summed, batch
        if not last and job.fsdp:
            refile_held_gradients(model, tracker)
    recorder.micro_batch, recorder.phase = 0, "clip"
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, job.clip_grad)
    if hasattr(grad_norm, "full_tensor"):
        grad_norm.full_tensor()
    recorder.phase = "loop scalars"
    _all_reduce_scalars(6, job)                     # loss, tokens, clips, bad-step flag, stop flag, skipped
    recorder.phase = "optimizer"
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _all_reduce_scalars(n: int, job: Job) -> None:
    if job.world_size > 1:
        dist.all_reduce(torch.zeros(n, dtype=torch.float64))


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


def with_changes(job: Job, **changes) -> Job:
    return replace(job, **changes)
