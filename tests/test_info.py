"""`videollama info`: the 13B parameter budget, and the FLOP formula against torch's counter."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from videollama.cli import main as cli_main
from videollama.config import VideoLlamaConfig
from videollama.model.videollama import VideoLlama
from videollama.plan.info import count_params, forward_flops


def test_13b_budget_via_cli(capsys):
    assert cli_main(["info", "--preset", "videollama-13b", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    p = out["params"]
    assert p["vision"] == pytest.approx(3.5e9, rel=0.02)
    assert p["decoder"] == pytest.approx(9.5e9, rel=0.02)
    assert p["total"] == pytest.approx(13e9, rel=0.02)
    assert out["flops"]["train_per_sample"] > 0
    assert 0 < out["memory_per_gpu_gib"]["total_gib"] < 80     # fits an A100 80GB


@pytest.mark.parametrize("preset", ["tiny", "small", "shapes"])
def test_param_count_matches_a_real_model(preset):
    cfg = VideoLlamaConfig.from_name(preset)
    model = VideoLlama(cfg)
    assert count_params(cfg)["total"] == sum(p.numel() for p in model.parameters())


def test_tiny_is_under_one_million_and_small_in_range():
    assert count_params(VideoLlamaConfig.from_name("tiny"))["total"] < 1_000_000
    assert 20e6 <= count_params(VideoLlamaConfig.from_name("small"))["total"] <= 50e6


@pytest.mark.parametrize("preset", ["tiny", "shapes"])  # shapes: no resampler (num_latents 0)
def test_flop_formula_matches_torch_flop_counter(preset):
    cfg = VideoLlamaConfig.from_name(preset)
    model = VideoLlama(cfg).eval().requires_grad_(False)   # the counter's module hooks want no autograd
    frames, tokens = cfg.preprocess.num_frames, 32
    video = torch.randn(1, frames, 3, cfg.vision.image_size, cfg.vision.image_size)
    ids = torch.randint(0, cfg.decoder.vocab_size, (1, tokens))
    counter = FlopCounterMode(display=False)
    # The counter has no formula for the CPU flash kernel of SDPA; the math backend runs attention
    # as plain matmuls, which it counts.
    with counter, sdpa_kernel(SDPBackend.MATH):
        model(ids, video=video)
    measured = counter.get_total_flops()
    assert forward_flops(cfg, frames=frames, tokens=tokens)["total"] == pytest.approx(measured, rel=0.01)
