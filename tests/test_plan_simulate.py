"""`videollama plan --simulate` at tiny size: the fake step's collectives and sharded state against
exact counts from a plain meta-device model; against the training loop's own step run for real
as rank 0 of 2 in a fake process group (one block per kind, two micro-batches per step); and (slow)
against a real 2-rank gloo run of the tiny recipe: the same collectives in order, the same shard
shapes, the peak within 10% of the CPU allocator's.

The simulated job: 4 fake ranks, 2 per node (a 2 x 2 hybrid-sharding mesh), a tiny model of one
block per kind, bf16 mixed precision, every block checkpointed, two micro-batches per step.
"""

from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
import torch

from videollama.cli import main as cli_main
from videollama.config import VideoLlamaConfig
from videollama.model.videollama import VideoLlama
from videollama.plan.check import TINY_RECIPE, compare

OVERRIDES = {"preprocess.num_frames": 2, "preprocess.size": 32, "vision.image_size": 32, "vision.max_frames": 2,
             "vision.num_layers": 1, "decoder.num_layers": 1}
RECIPE = f"""
model: {{preset: tiny, overrides: {json.dumps(OVERRIDES)}}}
data: {{kind: synthetic, synthetic_seq_len: 8}}
global_batch: 16
micro_batch: 2
max_steps: 100
precision: bf16
parallel: {{activation_checkpointing: [vision, temporal, resampler, decoder, cross_attn]}}
"""
SHARD, REPLICATE, ACCUMULATION = 2, 2, 2    # 16 clips = 2 per micro-batch x 4 ranks x 2


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> dict:
    recipe = tmp_path_factory.mktemp("simulate") / "recipe.yaml"
    recipe.write_text(RECIPE)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_main(["plan", "--config", str(recipe), "--gpus", "4", "--gpus-per-node", "2",
                         "--simulate", "--json"]) == 0
    return json.loads(out.getvalue())


def _padded_numels() -> tuple[list[int], list[int]]:
    """Per parameter of a plain meta-device model: its numel padded as FSDP2 shards dim 0 over
    SHARD ranks, and rank 0's local shard numel."""
    config = VideoLlamaConfig.from_name("tiny").with_overrides(OVERRIDES)
    with torch.device("meta"):
        model = VideoLlama(config)
    padded, local = [], []
    for p in model.parameters():
        rows = math.ceil(p.shape[0] / SHARD)
        rest = p.numel() // p.shape[0]
        padded.append(rows * SHARD * rest)
        local.append(rows * rest)
    return padded, local


def _bytes(out: dict, **match) -> int:
    return sum(c["bytes"] for c in out["collectives"] if all(c[k] == v for k, v in match.items()))


def test_the_report_has_the_simulated_and_planned_peaks_and_every_collective(simulated):
    s = simulated["simulated"]
    assert s["mesh"] == {"replicate": REPLICATE, "shard": SHARD}
    assert s["accumulation"] == ACCUMULATION and s["micro_batches_simulated"] == 2
    assert s["peak_gib"] > 0 and simulated["planned"]["peak_gib"] > 0
    assert s["peak_bytes"] == sum(s["at_peak"].values())
    kinds = {(c["kind"], c["group"], c["link"]) for c in simulated["collectives"]}
    assert kinds == {("all_gather", "shard", "intra-node"), ("reduce_scatter", "shard", "intra-node"),
                     ("all_reduce", "replicate", "inter-node"), ("all_reduce", "shard", "intra-node"),
                     ("all_reduce", "world", "inter-node")}
    proj = simulated["projection"]
    assert proj["intra_bytes_per_step"] > proj["inter_bytes_per_step"] > 0
    assert proj["step_s"][0] <= proj["step_s"][1]


def test_collective_bytes_are_the_sharded_models_exact_sizes(simulated):
    padded, _ = _padded_numels()
    total = sum(padded)
    for micro_batch in (1, 2):
        # every micro-batch's forward all-gathers every parameter once, in bf16, and its backward
        # reduce-scatters every gradient in fp32 (the reduce dtype) inside the node
        assert _bytes(simulated, phase="forward", kind="all_gather", micro_batch=micro_batch) == 2 * total
        assert _bytes(simulated, kind="reduce_scatter", micro_batch=micro_batch) == 4 * total
    # the shards are all-reduced across nodes once per step, on the last micro-batch
    assert _bytes(simulated, kind="all_reduce", group="replicate", micro_batch=1) == 0
    assert _bytes(simulated, kind="all_reduce", group="replicate", micro_batch=2) == 4 * total // SHARD
    # the training loop's two scalar all-reduces: 1 and 6 float64 values
    assert _bytes(simulated, kind="all_reduce", group="world") == 8 * (1 + 6)


def test_sharded_state_is_exact(simulated):
    _, local = _padded_numels()
    at_peak = simulated["simulated"]["at_peak"]
    assert at_peak["parameters"] == 4 * sum(local)                         # fp32 master shards
    assert at_peak["optimizer_state"] == 8 * sum(local) + 4 * len(local)   # AdamW m, v, a step per tensor
    assert at_peak["unsharded_gradients"] == 0 and at_peak["gradients"] == 4 * sum(local)


@pytest.mark.slow
@pytest.mark.parametrize("global_batch", [8, 16], ids=["one-micro-batch", "accumulating-two"])
def test_two_fake_ranks_match_a_real_two_rank_gloo_run(global_batch):
    result = compare({**TINY_RECIPE, "global_batch": global_batch}, 2)
    assert result["same_collectives_in_order"], (result["collectives_simulated"], result["collectives_real"])
    assert result["same_shard_shapes"]
    assert 0.9 <= result["peak_ratio"] <= 1.1, {k: v for k, v in result.items() if "collectives" not in k}


def test_two_fake_ranks_match_the_loops_own_step_run_for_real_in_a_fake_group():
    # one block per kind, 2 frames; 16 clips = 4 per micro-batch x 2 ranks x 2 micro-batches
    overrides = {**TINY_RECIPE["model"]["overrides"], "vision.num_layers": 1, "decoder.num_layers": 1,
                 "preprocess.num_frames": 2, "vision.max_frames": 2}
    recipe = {**TINY_RECIPE, "model": {"preset": "tiny", "overrides": overrides}, "global_batch": 16}
    result = compare(recipe, 2, gloo=False)
    assert result["same_collectives_in_order"], (result["collectives_simulated"], result["collectives_real"])
    assert {c["kind"] for c in result["collectives_real"]} == {"all_gather", "reduce_scatter", "all_reduce"}
    assert result["same_shard_shapes"]
    assert 0.9 <= result["peak_ratio"] <= 1.1, {k: v for k, v in result.items() if "collectives" not in k}


def test_the_planner_shards_inside_a_node_and_holds_the_accumulating_gradient():
    from videollama.plan.estimate import estimate
    from videollama.plan.info import count_params
    from videollama.plan.planner import settings_for

    cfg = VideoLlamaConfig.from_name("videollama-13b")
    total = count_params(cfg)["total"]
    kw = {"micro_batch": 4, "precision": "bf16", "checkpointing": ("vision", "temporal", "resampler", "decoder",
                                                                    "cross_attn")}
    one_node = settings_for(cfg, gpus=64, **kw)                      # 64 GPUs in one node: full sharding
    hybrid = settings_for(cfg, gpus=64, gpus_per_node=8, global_batch=2048, **kw)
    assert (one_node.shard, one_node.accumulation) == (64, 1)
    assert (hybrid.shard, hybrid.accumulation) == (8, 8)             # 2,048 = 4 x 64 x 8
    e = estimate(cfg, hybrid)
    assert e.totals["parameters"] == 4 * total // 8                  # train/parallel.py: sharded over a node
    # at the loss of the last micro-batch: the earlier ones' gradient (fp32 shards of every parameter)
    # and, in its backward, lm_head's unsharded bf16 gradient (the root is reduced last)
    lm_head = cfg.decoder.vocab_size * cfg.decoder.hidden_size
    assert e.phase == "backward, loss" and e.at_peak["gradients"] == 4 * total // 8 + 2 * lm_head
    with pytest.raises(ValueError, match="gpus-per-node"):
        settings_for(cfg, gpus=12, gpus_per_node=8)
