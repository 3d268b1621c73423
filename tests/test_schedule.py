"""Warmup + cosine LR: the reference recipe's values at its landmark steps, and the LambdaLR wiring."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from videollama.train.recipe import TrainConfig
from videollama.train.schedule import build_scheduler, lr_at

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ref() -> TrainConfig:
    return TrainConfig.from_yaml(ROOT / "configs" / "pretrain-13b.yaml")


def kw(cfg: TrainConfig) -> dict:
    return dict(peak_lr=cfg.optimizer.lr, warmup_steps=cfg.schedule.warmup_steps, max_steps=cfg.max_steps,
                min_lr=cfg.schedule.min_lr)


def test_reference_recipe_landmarks(ref: TrainConfig):
    assert (ref.optimizer.lr, ref.schedule.warmup_steps, ref.schedule.min_lr, ref.max_steps) == (
        2e-4, 1000, 1e-6, 25000)
    # Computed by hand from the document's numbers (peak 2e-4, warmup 1000, cosine to 1e-6):
    assert lr_at(0, **kw(ref)) == pytest.approx(2e-4 / 1000, rel=1e-12)  # first warmup step: peak/1000
    assert lr_at(499, **kw(ref)) == pytest.approx(1e-4, rel=1e-12)  # half-way up
    assert lr_at(1000, **kw(ref)) == pytest.approx(2e-4, rel=1e-12)  # peak, cosine starts
    middle = (1000 + 25000) // 2  # cos(pi/2) = 0: the mean of peak and floor
    assert lr_at(middle, **kw(ref)) == pytest.approx((2e-4 + 1e-6) / 2, rel=1e-12)
    # A quarter into the decay: 1e-6 + 0.5 * (2e-4 - 1e-6) * (1 + cos(pi/4)) = 1.708571...e-4
    assert lr_at(1000 + 6000, **kw(ref)) == pytest.approx(1.708571247e-4, rel=1e-9)
    assert lr_at(25000, **kw(ref)) == pytest.approx(1e-6, rel=1e-12)  # the floor at the end
    assert lr_at(30000, **kw(ref)) == pytest.approx(1e-6, rel=1e-12)  # and after it


def test_schedule_is_monotone_in_each_phase(ref: TrainConfig):
    up = [lr_at(s, **kw(ref)) for s in range(0, 1001, 50)]
    down = [lr_at(s, **kw(ref)) for s in range(1000, 25001, 500)]
    assert all(a < b for a, b in zip(up, up[1:]))
    assert all(a > b for a, b in zip(down, down[1:]))


def test_lambda_lr_gives_lr_at_for_every_optimizer_step():
    params = dict(peak_lr=3e-3, warmup_steps=4, max_steps=20, min_lr=1e-5)
    w = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([w], lr=3e-3)
    sched = build_scheduler(opt, **params)
    for step in range(25):
        assert opt.param_groups[0]["lr"] == pytest.approx(lr_at(step, **params), rel=1e-12), step
        opt.step()
        sched.step()
    # An independent cosine: the 10th step is (10-4)/16 of the way down.
    assert lr_at(10, **params) == pytest.approx(1e-5 + 0.5 * (3e-3 - 1e-5) * (1 + math.cos(math.pi * 6 / 16)))


def test_scheduler_refuses_a_group_with_another_lr():
    w = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([w], lr=1e-3)
    with pytest.raises(ValueError, match="peak_lr"):
        build_scheduler(opt, peak_lr=2e-3, warmup_steps=1, max_steps=5, min_lr=0.0)
