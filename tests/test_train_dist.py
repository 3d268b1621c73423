"""The training loop as users run it: `videollama train` in subprocesses, 1 or 2 ranks (gloo, FSDP2).

Data are synthetic clips (a pure function of seed and sample index, see SyntheticClips) on the
tiny preset shrunk to 4 frames of 32x32, so that a step takes milliseconds on a shared CPU.
Every worker runs with one thread (OMP_NUM_THREADS=1).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

RECIPE = """
model:
  preset: tiny
  overrides: {preprocess.num_frames: 4, preprocess.size: 32, vision.image_size: 32, vision.max_frames: 4}
data: {kind: synthetic, synthetic_seq_len: 16}
optimizer: {lr: 2.0e-3}
schedule: {warmup_steps: 3, min_lr: 1.0e-5}
global_batch: 4
micro_batch: 2
max_steps: 20
log: {tensorboard: false, progress: false}
checkpoint: {every: 0, keep: 3, at_end: false}
guards: {timeout_s: 120}
seed: 3
deterministic: true
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def train_cmd(recipe: Path, run_dir: Path, *overrides: str, nproc: int = 1, nnodes: int = 1,
              port: int | None = None) -> list[str]:
    cli = ["-m", "videollama.cli", "train", "--config", str(recipe), "--run-dir", str(run_dir), *overrides]
    if nproc == 1 and nnodes == 1:
        return [sys.executable, *cli]
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port or free_port()}", "--rdzv-id=test",
            "--max-restarts=0", *cli]


def run_ok(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)}\nexit {p.returncode}\n{p.stderr[-4000:]}"
    return p


def losses(run_dir: Path) -> dict[int, float | None]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[r["step"]] = r["loss"]
    return out


def records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    return path


@pytest.mark.slow
def test_two_ranks_match_one_rank_loss_curve(recipe: Path, tmp_path: Path):
    # Same global batch of 4: 1 rank x 2 micro-batches x accumulation 2, or 2 ranks x 2 x 1.
    # One rank runs the plain module by default; parallel.fsdp=true shards over one rank.
    one, one_fsdp, two = tmp_path / "one", tmp_path / "one_fsdp", tmp_path / "two"
    run_ok(train_cmd(recipe, one))
    run_ok(train_cmd(recipe, one_fsdp, "parallel.fsdp=true"))
    run_ok(train_cmd(recipe, two, nproc=2))
    a, b, c = losses(one), losses(two), losses(one_fsdp)
    assert sorted(a) == sorted(b) == sorted(c) == list(range(20))
    for step in a:
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])
        assert abs(a[step] - c[step]) < 1e-5, (step, a[step], c[step])
    # The curve is a real training curve, not a constant: the model fits its (repeating-
    # distribution) data a little, and the loss moves by far more than the tolerance.
    assert max(a.values()) - min(a.values()) > 1e-2
    assert json.loads((two / "summary.json").read_text())["accumulation"] == 1
    assert json.loads((one / "summary.json").read_text())["accumulation"] == 2
    assert json.loads((one / "summary.json").read_text())["mesh"] is None
    assert json.loads((one_fsdp / "summary.json").read_text())["mesh"] == {"shard": 1}
    assert json.loads((two / "summary.json").read_text())["mesh"] == {"shard": 2}


@pytest.mark.slow
def test_long_videos_with_a_latent_cache_train_the_same_curve_on_one_and_two_ranks(recipe: Path, tmp_path: Path):
    """Whole videos (synthetic: windows drawn from 8 fixed ones, so they repeat as still video does),
    a frozen vision side: the plain step on one rank, and the latent-cache step sharded over one
    and two ranks, give one curve. On two ranks the ranks miss different windows, so their encoder
    calls (FSDP collectives) differ until the ranks agree on a count: this would hang without it."""
    from videollama.config import VideoLlamaConfig
    from videollama.train.latents import window_key
    from videollama.train.synthetic import SyntheticVideos

    long = ["data.windows=whole", "data.window_budget=6", "freeze=[vision,temporal,resampler]",
            "model.overrides.decoder.cross_attn_gate_init=0.5", "max_steps=12"]
    cached = ["data.latent_cache=true"]
    one, one_fsdp, two = tmp_path / "one", tmp_path / "one_fsdp", tmp_path / "two"
    run_ok(train_cmd(recipe, one, *long))
    run_ok(train_cmd(recipe, one_fsdp, *long, *cached, "parallel.fsdp=true"))
    run_ok(train_cmd(recipe, two, *long, *cached, nproc=2), timeout=240)
    a, b, c = losses(one), losses(two), losses(one_fsdp)
    assert sorted(a) == sorted(b) == sorted(c) == list(range(12))
    for step in a:
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])
        assert abs(a[step] - c[step]) < 1e-5, (step, a[step], c[step])
    assert max(a.values()) - min(a.values()) > 1e-2
    last = records(two)[-1]
    assert 0 < last["latent_encoded"] < last["latent_windows"]  # rank 0's cache: hits after the first steps

    # The data did make the ranks' encoder calls differ at some step (one rank all hits, the other not).
    cfg = VideoLlamaConfig.from_name("tiny").with_overrides(
        {"preprocess.num_frames": 4, "preprocess.size": 32, "vision.image_size": 32, "vision.max_frames": 4})
    ranks = [SyntheticVideos(model_cfg=cfg, batch_size=2, seq_len=16, seed=3, rank=r, world_size=2, window_budget=6)
             for r in range(2)]
    known: list[set[str]] = [set(), set()]
    differ = False
    for _ in range(12):
        misses = []
        for r in range(2):
            keys = {window_key(w) for w in next(ranks[r])["video"]}
            misses.append(len(keys - known[r]))
            known[r] |= keys
        differ |= min(misses) == 0 < max(misses)
    assert differ


@pytest.mark.slow
def test_kill_9_then_rerun_resumes_bitwise(recipe: Path, tmp_path: Path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    overrides = ["max_steps=12", "checkpoint.every=2", "checkpoint.at_end=true"]
    run_ok(train_cmd(recipe, ref, *overrides))

    kill_at = random.Random().randint(3, 10)  # the step whose line we wait for, then kill -9
    proc = subprocess.Popen(train_cmd(recipe, killed, *overrides), env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = killed / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and any(json.loads(x)["step"] >= kill_at for x in metrics.read_text().splitlines()):
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"finished before the kill at step {kill_at}: {proc.stderr.read()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = max(json.loads(x)["step"] for x in metrics.read_text().splitlines())
    assert done_before < 11, "the kill came too late to test anything"

    p = run_ok(train_cmd(recipe, killed, *overrides))
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["start_step"] > 0, f"did not resume (kill at step {kill_at}):\n{p.stderr[-2000:]}"
    a, b = losses(ref), losses(killed)
    assert sorted(b) == list(range(12))
    for step in range(12):
        assert a[step] == b[step], f"step {step} (killed after step {done_before}): {a[step]!r} != {b[step]!r}"

    # Final weights, through the export path: bitwise identical model.safetensors tensors.
    for run in (ref, killed):
        subprocess.run([sys.executable, "-m", "videollama.cli", "export", str(run), "--out", str(run / "model")],
                       env=env(), check=True, capture_output=True)
    wa, wb = load_file(ref / "model" / "model.safetensors"), load_file(killed / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.mark.slow
def test_nan_on_one_rank_skips_the_step_everywhere(recipe: Path, tmp_path: Path):
    run = tmp_path / "nan"
    # Rank 1's loss is NaN at step 3; checkpoints after steps 3 and 4 hold the weights before
    # and after the poisoned step.
    run_ok(train_cmd(recipe, run, "max_steps=6", "guards.inject_nan_steps=[3]", "guards.inject_rank=1",
                     "checkpoint.every=1", "checkpoint.keep=10", nproc=2), timeout=180)
    recs = {r["step"]: r for r in records(run)}
    assert sorted(recs) == list(range(6))
    assert recs[3]["bad_step"] is True and recs[3]["loss"] is None
    assert all(not recs[s]["bad_step"] for s in (0, 1, 2, 4, 5))
    assert recs[5]["bad_steps"] == 1
    before = _model_weights(run / "checkpoints" / "step-00000003")
    after = _model_weights(run / "checkpoints" / "step-00000004")
    later = _model_weights(run / "checkpoints" / "step-00000005")
    assert all(torch.equal(before[k], after[k]) for k in before), "a skipped step changed weights"
    assert any(not torch.equal(after[k], later[k]) for k in after), "the next good step did not train"


def test_consecutive_bad_steps_stop_the_run(recipe: Path, tmp_path: Path):
    run = tmp_path / "stop"
    p = subprocess.run(train_cmd(recipe, run, "max_steps=10", "guards.inject_nan_steps=[2,3,4]",
                                 "guards.max_bad_steps=3"), env=env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 3, p.stderr[-2000:]
    assert "3 non-finite steps in a row" in p.stderr
    assert [r["step"] for r in records(run)] == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_two_simulated_nodes_train_with_hybrid_sharding(recipe: Path, tmp_path: Path):
    one, hsdp = tmp_path / "one", tmp_path / "hsdp"
    port = free_port()
    run_ok(train_cmd(recipe, one, "max_steps=6"))
    cmd = train_cmd(recipe, hsdp, "max_steps=6", nproc=1, nnodes=2, port=port)
    nodes = [subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [n.communicate(timeout=180) for n in nodes]
    for n, (_, err) in zip(nodes, outs):
        assert n.returncode == 0, err[-3000:]
    summary = json.loads((hsdp / "summary.json").read_text())
    assert summary["mesh"] == {"replicate": 2, "shard": 1}
    a, b = losses(one), losses(hsdp)
    for step in range(6):
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])


@pytest.mark.slow
def test_two_simulated_nodes_accumulate_sharded_gradients_and_all_reduce_on_the_last_micro_batch(
        recipe: Path, tmp_path: Path):
    # Global batch 8 on 2 nodes of 1 rank: 2 micro-batches of 2 per step. Each micro-batch reduce-scatters
    # inside its node; the all-reduce across nodes runs on the last only. The curve is one rank's, which
    # accumulates 4 micro-batches without FSDP.
    one, hsdp = tmp_path / "one", tmp_path / "hsdp"
    port = free_port()
    run_ok(train_cmd(recipe, one, "max_steps=4", "global_batch=8"))
    cmd = train_cmd(recipe, hsdp, "max_steps=4", "global_batch=8", nproc=1, nnodes=2, port=port)
    nodes = [subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [n.communicate(timeout=180) for n in nodes]
    for n, (_, err) in zip(nodes, outs):
        assert n.returncode == 0, err[-3000:]
    summary = json.loads((hsdp / "summary.json").read_text())
    assert summary["mesh"] == {"replicate": 2, "shard": 1} and summary["accumulation"] == 2
    a, b = losses(one), losses(hsdp)
    assert sorted(a) == sorted(b) == list(range(4))
    for step in range(4):
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])


@pytest.mark.slow
def test_a_late_rank_is_named(recipe: Path, tmp_path: Path):
    run = tmp_path / "hang"
    cmd = train_cmd(recipe, run, "max_steps=4", "guards.barrier_every=1", "guards.timeout_s=4",
                    "guards.inject_rank=1", "guards.inject_hang_steps=[2]", "guards.inject_hang_s=12", nproc=2)
    p = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert "ranks did not reach step 2 (after loading its batches) within 4 s" in p.stderr, p.stderr[-3000:]
    assert "Rank 1" in p.stderr  # gloo's monitored barrier names the missing rank
    assert [r["step"] for r in records(run)] == [0, 1]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_writes_a_checkpoint_and_rerun_continues(recipe: Path, tmp_path: Path, sig):
    """Preemption (SIGTERM) and Ctrl-C (SIGINT) lose nothing: the step finishes, a checkpoint is
    written, the process exits cleanly, and the same command continues from it."""
    run = tmp_path / "term"
    proc = subprocess.Popen(train_cmd(recipe, run, "max_steps=200"), env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.01)
    proc.send_signal(sig)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 0, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    latest = (run / "checkpoints" / "latest").read_text().strip()
    steps_done = len(records(run))
    assert latest == f"step-{steps_done:08d}", (latest, steps_done)
    # max_steps shapes the cosine schedule, so a longer run is a recorded config change
    p = run_ok(train_cmd(recipe, run, f"max_steps={steps_done + 2}") + ["--allow-config-change"])
    assert f"resumed from {run / 'checkpoints' / latest} at step {steps_done}" in p.stderr


@pytest.mark.slow
def test_compiled_blocks_with_activation_checkpointing_match_eager(recipe: Path, tmp_path: Path):
    # torchtitan's order on every block: checkpoint wrapper, then Module.compile (inductor, C++ on CPU).
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    ac = "parallel.activation_checkpointing=[vision,temporal,resampler,decoder,cross_attn]"
    run_ok(train_cmd(recipe, eager, "max_steps=3", ac))
    run_ok(train_cmd(recipe, compiled, "max_steps=3", ac, "parallel.compile=true"), timeout=600)
    a, b = losses(eager), losses(compiled)
    assert sorted(a) == sorted(b) == [0, 1, 2]
    for step in a:
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])


def _model_weights(path: Path) -> dict[str, torch.Tensor]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = dcp.FileSystemReader(str(path)).read_metadata()
    state = {k: torch.empty(m.size, dtype=m.properties.dtype)
             for k, m in meta.state_dict_metadata.items()
             if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    dcp.load(state, checkpoint_id=str(path), no_dist=True)
    assert state, f"{path}: no model tensors"
    return state
