"""The training loop in this process (a one-rank gloo group), on real Shapes clips and on synthetic ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from helpers import dcp_model_tensors, small_cfg
from videollama.model.parts import part_of
from videollama.train import checkpoint as ckpt
from videollama.train.loop import train
from videollama.train.optim import param_groups
from videollama.train.recipe import TrainConfig


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """Six real Shapes clips in two shards, an eval split, and a BPE tokenizer trained on their text."""
    from videollama.data.shapes_synth import synthesize
    from videollama.data.tokenizer import iter_training_texts, train_tokenizer

    root = tmp_path_factory.mktemp("shapes")
    synthesize(root, train=6, eval=2, seed=5, workers=1, shard_size=3)
    tok = train_tokenizer(iter_training_texts([root / "train"]), 400)
    tok.save(str(root / "tokenizer.json"))
    return root


def shapes_cfg(root: Path, **top) -> TrainConfig:
    d = {
        "model": {"preset": "tiny", "overrides": {"preprocess.num_frames": 4}},
        "tokenizer": str(root / "tokenizer.json"),
        "data": {"kind": "webdataset", "sources": [str(root / "train")], "task": "caption", "max_len": 40},
        "optimizer": {"lr": 2e-3}, "schedule": {"warmup_steps": 1},
        "global_batch": 2, "micro_batch": 1, "max_steps": 4,
        "log": {"tensorboard": True, "progress": False},
        "checkpoint": {"every": 2, "keep": 3}, "seed": 2, "deterministic": True,
    }
    d.update(top)
    return TrainConfig.from_dict(d)


def test_resume_on_real_shards_continues_the_data_and_the_curve_bitwise(shapes: Path, tmp_path: Path):
    run = tmp_path / "run"
    train(shapes_cfg(shapes), run)
    first = losses(run)
    assert sorted(first) == [0, 1, 2, 3] and all(v is not None and v > 0 for v in first.values())
    assert list((run / "tensorboard").iterdir()), "no TensorBoard events written"
    # Simulate a crash after step 3: only the step-2 checkpoint survived.
    shutil.rmtree(run / "checkpoints" / "step-00000004")
    (run / "checkpoints" / "latest").write_text("step-00000002\n")
    summary = train(shapes_cfg(shapes), run)
    assert summary["start_step"] == 2
    again = losses(run)
    assert again == first  # steps 2 and 3 re-done: same batches (loader position), same bits


def test_finetune_from_exported_model_on_eval_jsonl_with_frozen_vision(shapes: Path, tmp_path: Path):
    pre = tmp_path / "pre"
    train(shapes_cfg(shapes, max_steps=2), pre)
    model_dir = ckpt.export(pre, tmp_path / "model")
    assert (model_dir / "tokenizer.json").read_text() == (shapes / "tokenizer.json").read_text()

    ft = tmp_path / "ft"
    cfg = shapes_cfg(shapes, model={"init_from": str(model_dir), "preset": None}, tokenizer=None,
                     data={"kind": "webdataset", "sources": [str(shapes / "eval" / "videoqa.jsonl")],
                           "task": "videoqa", "max_len": 40},
                     optimizer={"lr": 5e-5}, freeze=["vision", "temporal"], max_steps=2)
    summary = train(cfg, ft)
    assert summary["frozen_params"] > 0 and summary["steps"] == 2
    from safetensors.torch import load_file

    start = load_file(model_dir / "model.safetensors")
    end = dcp_model_tensors(ckpt.latest_checkpoint(ft))
    vision = [k for k in start if part_of(k) in ("vision", "temporal")]
    trained = [k for k in start if part_of(k) == "decoder"]
    assert vision and trained
    assert all(torch.equal(start[k], end[k]) for k in vision), "a frozen part changed"
    assert any(not torch.equal(start[k], end[k]) for k in trained), "fine-tuning did not move the decoder"


def test_activation_checkpointing_on_every_block_type_changes_nothing(tmp_path: Path):
    plain, ac = tmp_path / "plain", tmp_path / "ac"
    train(small_cfg(max_steps=3, checkpoint={"every": 0, "at_end": False}), plain)
    train(small_cfg(max_steps=3, checkpoint={"every": 0, "at_end": False},
                    parallel={"activation_checkpointing": ["vision", "temporal", "resampler", "decoder", "cross_attn"]}),
          ac)
    a, b = losses(plain), losses(ac)
    assert all(abs(a[s] - b[s]) < 1e-6 for s in range(3)), (a, b)


def test_meta_device_init_matches_the_constructors_init(tmp_path: Path):
    """parallel.meta_init (the GPU default): build on meta, shard, allocate, initialise."""
    run = tmp_path / "meta"
    summary = train(small_cfg(max_steps=1, optimizer={"lr": 1e-12}, parallel={"meta_init": True, "fsdp": True}), run)
    assert summary["steps"] == 1
    w = dcp_model_tensors(ckpt.latest_checkpoint(run))  # after one step at LR 1e-12: the init
    gates = [k for k in w if k.rsplit(".", 1)[-1] in ("gate", "attn_gate", "ff_gate")]
    # (Adam moves every parameter by about the LR, 1e-12, whatever its gradient.)
    assert gates and all(float(w[k].abs().max()) < 1e-9 for k in gates)
    norms = [k for k in w if k.endswith("norm.weight") or "layer_norm" in k and k.endswith("weight")]
    assert norms and all(torch.allclose(w[k], torch.ones_like(w[k]), atol=1e-9) for k in norms)
    for k in ("decoder.layers.0.self_attn.q_proj.weight", "decoder.embed_tokens.weight", "resampler.latents",
              "vision.embeddings.class_embedding", "vision.temporal_embedding", "lm_head.weight"):
        assert abs(float(w[k].std()) - 0.02) < 0.004, (k, float(w[k].std()))
    assert torch.count_nonzero(w["decoder.layers.0.self_attn.q_proj.weight"]) > 0


def test_meta_init_under_fsdp_equals_the_eager_build_with_tied_embeddings(tmp_path: Path):
    """Meta init re-ties the embeddings before init_weights, so tied models work on meta too: the
    sharded, meta-built run and the eagerly built one give the same weights after two steps."""
    runs = {}
    for meta in (True, False):
        cfg = small_cfg(max_steps=2, parallel={"meta_init": meta, "fsdp": True})
        cfg.model.overrides["decoder.tie_word_embeddings"] = True
        train(cfg, tmp_path / str(meta))
        runs[meta] = dcp_model_tensors(ckpt.latest_checkpoint(tmp_path / str(meta)))
    assert runs[True].keys() == runs[False].keys()
    assert "lm_head.weight" not in runs[True] or torch.equal(runs[True]["lm_head.weight"],
                                                           runs[True]["decoder.embed_tokens.weight"])
    for k in runs[True]:
        assert torch.equal(runs[True][k], runs[False][k]), k


def test_weight_decay_skips_norms_biases_gates_and_embeddings():
    from videollama.config import VideoLlamaConfig
    from videollama.model.videollama import VideoLlama

    model = VideoLlama(VideoLlamaConfig.from_name("tiny"))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decayed | kept == set(names.values()) and not decayed & kept
    assert "decoder.embed_tokens.weight" in kept
    assert "vision.embeddings.position_embedding.weight" in kept
    assert all("gate" in n and "gate_proj" not in n for n in kept if n.endswith("_gate") or n.endswith(".gate"))
    assert {n for n in names.values() if n.endswith(("attn_gate", "ff_gate", ".gate"))} <= kept
    assert {n for n in names.values() if "norm" in n or n.endswith(".bias")} <= kept
    assert "decoder.layers.0.mlp.gate_proj.weight" in decayed  # SwiGLU's gate is a matrix
    assert "lm_head.weight" in decayed and "decoder.layers.0.self_attn.q_proj.weight" in decayed


def test_plot_writes_curves_png(tmp_path: Path):
    from PIL import Image

    from videollama.cli import main

    run = tmp_path / "run"
    train(small_cfg(max_steps=3, checkpoint={"every": 0, "at_end": False}), run)
    assert main(["plot", str(run)]) == 0
    with Image.open(run / "curves.png") as im:
        assert im.size == (800, 600)
    assert main(["plot", str(tmp_path / "nothing")]) == 2
