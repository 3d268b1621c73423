"""The simulation checked against real runs at small scale.

The same recipe runs three times: simulated (``simulate.simulate``: fake tensors, a fake process
group of the same world size); for real in ``world_size`` processes on this CPU under ``torchrun``
with the gloo backend; and for real as rank 0 alone in a fake process group (real tensors and
kernels; the collectives move nothing). Both real runs are train/loop.py's own ``setup_run`` and two
``train_step`` calls (the first creates AdamW's state); rank 0 records the second step's collectives
with ``comm.CommRecorder`` and the peak of the bytes held through torch's CPU allocator from before
the model is built to the end (``plan.memtrace.AllocatorTrace``). :func:`compare` puts them side by
side: the collectives (kind, group, bytes, in order) and every parameter's local shard shape on
rank 0 against the gloo run, the peak against the run alone (see :func:`compare` for why).

``python -m videollama.plan.check --worker|--fake-group-worker SPEC_JSON OUT_JSON`` are the workers.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

# A tiny recipe that runs a real step in well under a second per rank on a CPU: the tiny preset at
# 4 frames of 32x32, 64 tokens; bf16 mixed precision through FSDP2 as on GPUs, every block
# checkpointed, built on the meta device and sharded before it is allocated (a GPU run's path).
# Its peak is the loss's, as at full size (the logits outweigh the tiny model's state).
TINY_RECIPE = {
    "model": {"preset": "tiny", "overrides": {"preprocess.num_frames": 4, "preprocess.size": 32,
                                              "vision.image_size": 32, "vision.max_frames": 4}},
    "data": {"kind": "synthetic", "synthetic_seq_len": 64},
    "global_batch": 8, "micro_batch": 4, "max_steps": 2, "precision": "bf16",
    "parallel": {"activation_checkpointing": ["vision", "temporal", "resampler", "decoder", "cross_attn"],
                 "meta_init": True},
    "log": {"tensorboard": False, "progress": False},
    "checkpoint": {"every": 0, "at_end": False},
    "guards": {"timeout_s": 120, "barrier_every": 0},
    "seed": 0,
}


def job_for(recipe: dict, world_size: int):
    """The simulation's Job for a recipe dict run by ``world_size`` ranks on one node."""
    from videollama.config import VideoLlamaConfig
    from videollama.plan.simulate import Job
    from videollama.train.recipe import TrainConfig

    cfg = TrainConfig.from_dict(recipe)
    config = VideoLlamaConfig.from_name(cfg.model.preset).with_overrides(cfg.model.overrides)
    return Job(config=config, world_size=world_size, gpus_per_node=world_size, micro_batch=cfg.micro_batch,
               frames=config.preprocess.num_frames, tokens=cfg.data.synthetic_seq_len, precision=cfg.precision,
               checkpointing=tuple(cfg.parallel.activation_checkpointing), freeze=tuple(cfg.freeze),
               accumulation=cfg.accumulation(world_size), reshard_after_forward=cfg.parallel.reshard_after_forward,
               clip_grad=cfg.clip_grad, optimizer=cfg.optimizer)


# ---- the real run -----------------------------------------------------------------------------------


def real_run(recipe: dict, world_size: int, *, gloo: bool = True, timeout: float = 300) -> dict:
    """Run ``recipe`` for real; rank 0's measurements. ``gloo``: in ``world_size`` processes under
    torchrun; else in one process, rank 0 of a fake process group of ``world_size`` (real tensors
    and kernels, collectives that move nothing)."""
    with tempfile.TemporaryDirectory() as tmp:
        spec, out = Path(tmp) / "spec.json", Path(tmp) / "rank0.json"
        spec.write_text(json.dumps({"recipe": recipe, "run_dir": str(Path(tmp) / "run"), "world_size": world_size}))
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(p for p in (str(Path(__file__).parents[2]),
                                                                               env.get("PYTHONPATH")) if p))
        worker_args = ["-m", "videollama.plan.check", "--worker" if gloo else "--fake-group-worker", str(spec), str(out)]
        cmd = [sys.executable, *worker_args]
        if gloo:
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world_size}", "--nnodes=1",
                   "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}", "--max-restarts=0",
                   *worker_args]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"the real {world_size}-rank run failed (exit {p.returncode}):\n{p.stderr[-4000:]}")
        return json.loads(out.read_text())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(spec_path: str, out_path: str, *, fake_group: bool = False) -> None:
    """Rank 0 (or any rank) of the real run: under torchrun with gloo, or alone in a fake group."""
    import torch
    import torch.distributed as dist

    from videollama.plan.comm import CommRecorder, mesh_groups
    from videollama.plan.memtrace import AllocatorTrace
    from videollama.train.distributed import DistEnv, setup_distributed
    from videollama.train.loop import train_step
    from videollama.train.recipe import TrainConfig
    from videollama.train.run import setup_run

    torch.set_num_threads(1)
    spec = json.loads(Path(spec_path).read_text())
    cfg = TrainConfig.from_dict(spec["recipe"])
    trace = AllocatorTrace()
    trace.__enter__()
    if fake_group:
        from torch.testing._internal.distributed.fake_pg import FakeStore

        world = spec["world_size"]
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
        env = DistEnv(rank=0, world_size=world, local_rank=0, local_world_size=world, device=torch.device("cpu"),
                      monitor_group=None, owns_group=True)
    else:
        env = setup_distributed(cfg.guards.timeout_s)
    with trace.phase("setup"):
        run = setup_run(cfg, Path(spec["run_dir"]), env)
    data = iter(run.loader)
    with trace.phase("first step"):
        train_step(run, data)                              # AdamW's state is created here
    recorder = CommRecorder(mesh_groups(run.mesh, nodes=1))
    with recorder, trace.phase("second step"):
        train_step(run, data)
    trace.__exit__(None, None, None)
    shards = {name: list(p.to_local().shape if hasattr(p, "to_local") else p.shape)
              for name, p in run.model.named_parameters()}
    if env.rank == 0:
        Path(out_path).write_text(json.dumps({"allocator_peak": trace.peak, "peak_phase": trace.peak_phase,
                                              "collectives": [c.to_dict() for c in recorder.collectives],
                                              "shard_shapes": shards}))
    dist.destroy_process_group()


# ---- side by side -----------------------------------------------------------------------------------


def compare(recipe: dict, world_size: int, *, gloo: bool = True) -> dict:
    """Simulated and real, side by side, for ``recipe`` on ``world_size`` ranks (one node).

    Memory is compared with rank 0 of a real run in a fake process group (real tensors and
    kernels): in the gloo run the profiler misses the frees of buffers that gloo's own threads
    release (it follows the main thread), so that peak is only ever too high, and by how much
    depends on how far the other rank has got; it is reported beside. ``gloo`` False: no gloo run;
    the collectives and shard shapes are compared with the run in the fake process group (the
    training loop's own step and sharding, its collectives issued but moving nothing)."""
    from videollama.plan.simulate import simulate

    sim = simulate(job_for(recipe, world_size))
    alone = real_run(recipe, world_size, gloo=False)
    real = real_run(recipe, world_size) if gloo else alone
    key = ("kind", "group", "bytes", "dtype")
    fake_seq = [tuple(c.to_dict()[k] for k in key) for c in sim.collectives]
    real_seq = [tuple(c[k] for k in key) for c in real["collectives"]]
    return {"world_size": world_size, "collectives_from": "gloo" if gloo else "fake process group",
            "simulated_peak": sim.peak, "real_allocator_peak": alone["allocator_peak"],
            "real_peak_phase": alone["peak_phase"], "peak_ratio": sim.peak / alone["allocator_peak"],
            "gloo_allocator_peak": real["allocator_peak"] if gloo else None, "simulated_at_peak": sim.at_peak,
            "collectives_simulated": _counts(fake_seq), "collectives_real": _counts(real_seq),
            "same_collectives_in_order": fake_seq == real_seq,
            "same_shard_shapes": {k: list(v) for k, v in sim.shard_shapes.items()} == real["shard_shapes"],
            "parameters": len(real["shard_shapes"]), "simulation_cpu_s": sim.cpu_s}


def _counts(seq: list[tuple]) -> list[dict]:
    """(kind, group, dtype) -> count and bytes."""
    count: Counter = Counter()
    size: Counter = Counter()
    for kind, group, nbytes, dtype in seq:
        count[(kind, group, dtype)] += 1
        size[(kind, group, dtype)] += nbytes
    return [{"kind": k, "group": g, "dtype": d, "count": count[(k, g, d)], "bytes": size[(k, g, d)]}
            for k, g, d in sorted(count)]


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] in ("--worker", "--fake-group-worker"):
        worker(sys.argv[2], sys.argv[3], fake_group=sys.argv[1] == "--fake-group-worker")
    else:
        print(json.dumps(compare(TINY_RECIPE, 2), indent=2))
