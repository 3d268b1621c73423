"""Recipes: every YAML under configs/ loads; overrides; batch arithmetic; the 13B recipe on meta."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from videollama.config import VideoLlamaConfig
from videollama.train.recipe import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
# Training recipes; configs/curate-*.yaml are curation configs (tests/test_curate_units.py loads them).
RECIPES = sorted(p for p in (ROOT / "configs").glob("*.yaml") if not p.name.startswith("curate-"))


def test_the_four_reference_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"pretrain-13b.yaml", "pretrain-tiny.yaml", "finetune-videoqa.yaml", "finetune-caption.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads_and_its_model_config_is_valid(path: Path):
    cfg = TrainConfig.from_yaml(path)
    if cfg.model.preset is not None:
        model_cfg = VideoLlamaConfig.from_name(cfg.model.preset)
        if cfg.model.overrides:
            model_cfg.with_overrides(cfg.model.overrides)
    else:
        assert cfg.model.init_from
    cfg.accumulation(1)  # the global batch splits on one rank
    assert cfg.to_dict() == TrainConfig.from_dict(cfg.to_dict()).to_dict()


def test_finetune_recipes_are_the_reference_fine_tuning():
    for task in ("videoqa", "caption"):
        cfg = TrainConfig.from_yaml(ROOT / "configs" / f"finetune-{task}.yaml")
        assert cfg.optimizer.lr == 5e-5
        assert cfg.model.init_from and cfg.model.preset is None
        assert cfg.data.task == task


def test_overrides_are_parsed_as_yaml(tmp_path: Path):
    cfg = TrainConfig.from_yaml(ROOT / "configs" / "pretrain-tiny.yaml", [
        "optimizer.lr=3e-4", "freeze=[vision, temporal]", "model.overrides.decoder.num_layers=1",
        "data.sources=[a/b, c.jsonl]", "deterministic=true", "parallel.activation_checkpointing=[decoder]"])
    assert cfg.optimizer.lr == 3e-4  # "3e-4" is a string to PyYAML; the recipe types it as float
    assert cfg.freeze == ["vision", "temporal"]
    assert cfg.model.overrides == {"decoder.num_layers": 1}
    assert cfg.data.sources == ["a/b", "c.jsonl"]
    assert cfg.deterministic is True
    assert cfg.parallel.activation_checkpointing == ["decoder"]


@pytest.mark.parametrize("override, message", [
    ("optimizer.lrr=1", "unknown keys \\['lrr'\\]"),
    ("freeze=[eyes]", "freeze: unknown parts \\['eyes'\\]"),
    ("max_steps=lots", "max_steps: expected int"),
    ("optimizer.betas=[0.9]", "optimizer.betas: expected 2 values"),
    ("precision=fp8", "precision must be"),
    ("parallel.activation_checkpointing=[mlp]", "unknown \\['mlp'\\]"),
    ("optimizer.lr", "not key=value"),
    ("data.task=qa", "data.task must be one of caption, videoqa, caption\\+videoqa"),
    ("data.texts_per_clip=-1", "data.texts_per_clip must be >= 0"),
])
def test_bad_recipes_name_the_file_and_the_field(override: str, message: str):
    path = ROOT / "configs" / "pretrain-tiny.yaml"
    with pytest.raises(ValueError, match=message) as e:
        TrainConfig.from_yaml(path, [override])
    if "key=value" not in message:
        assert str(path) in str(e.value)


def test_unreadable_recipe_names_the_file(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ValueError, match="bad.yaml: cannot read recipe"):
        TrainConfig.from_yaml(bad)


def test_accumulation_is_computed_from_the_world_size():
    cfg = TrainConfig.from_dict({"global_batch": 2048, "micro_batch": 4, "data": {"kind": "synthetic"}})
    assert [cfg.accumulation(w) for w in (1, 8, 64, 512)] == [512, 64, 8, 1]
    with pytest.raises(ValueError, match="global_batch 2048 is not divisible by micro_batch 4 x world size 48"):
        cfg.accumulation(48)


def test_13b_recipe_builds_on_meta_and_splits_over_64_ranks():
    from videollama.model.videollama import VideoLlama

    cfg = TrainConfig.from_yaml(ROOT / "configs" / "pretrain-13b.yaml")
    assert cfg.accumulation(64) == 8  # 2048 = 4 per rank x 64 ranks x 8 micro-batches
    assert (cfg.global_batch, cfg.optimizer.betas, cfg.optimizer.weight_decay, cfg.clip_grad) == (
        2048, (0.9, 0.95), 0.1, 1.0)
    model_cfg = VideoLlamaConfig.from_name(cfg.model.preset)
    pre = model_cfg.preprocess
    assert (pre.num_frames, pre.fps, pre.size, cfg.data.max_len) == (16, 4.0, 224, 2048)
    assert pre.mean == (0.485, 0.456, 0.406) and pre.std == (0.229, 0.224, 0.225)
    with torch.device("meta"):
        model = VideoLlama(model_cfg)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 13e9) / 13e9 < 0.02, n
    assert all(p.is_meta for p in model.parameters())
