"""A new user's path through the command line: a caption needs no prompt, a run directory where a
model directory goes says to export it, plan takes overrides and names quantized weights, short
fine-tuning runs warm up to their LR, and the known third-party noise is silenced (only it)."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest

from videollama.cli import main

ROOT = Path(__file__).resolve().parents[1]


def one_line_error(capsys) -> str:
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("videollama: error: "), lines
    return lines[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from readme_blocks import write_tiny_model

    path = tmp_path_factory.mktemp("model") / "m"
    write_tiny_model(path, ["a red square moves left.", "what color is the square? red"])
    return path


def test_the_caption_template_needs_no_prompt_and_the_others_do(model_dir, capsys):
    assert main(["generate", "--model", str(model_dir), "--template", "caption", "--max-new-tokens", "2"]) == 0
    capsys.readouterr()
    for template in ("raw", "videoqa"):
        assert main(["generate", "--model", str(model_dir), "--template", template]) == 2
        assert f"--template {template} needs --prompt" in one_line_error(capsys)


def test_a_run_directory_given_as_a_model_says_to_export_it(tmp_path, capsys):
    run = tmp_path / "runs" / "ft"
    (run / "checkpoints").mkdir(parents=True)
    for argv in (["generate", "--model", str(run), "--prompt", "hi"],
                 ["eval", "--model", str(run), "--task", "videoqa", "--data", str(tmp_path / "x.jsonl"),
                  "--out", str(tmp_path / "e")]):
        assert main(argv) == 2
        error = one_line_error(capsys)
        assert "training run directory" in error and f"videollama export {run} --out" in error


def plan_json(capsys, *argv: str) -> dict:
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_takes_key_value_overrides(capsys, monkeypatch, model_dir):
    base = plan_json(capsys, "--preset", "tiny")
    deeper = plan_json(capsys, "--preset", "tiny", "decoder.num_layers=4")
    assert deeper["params"] > base["params"]
    recipe = str(ROOT / "configs" / "lora-videoqa.yaml")
    monkeypatch.chdir(model_dir.parent)   # no runs/demo/model here
    assert main(["plan", "--config", recipe]) == 2
    error = one_line_error(capsys)
    assert "model.init_from runs/demo/model is not a model directory" in error and "model.init_from=DIR" in error
    by_dir = plan_json(capsys, "--config", recipe, f"model.init_from={model_dir}", "micro_batch=2")
    assert by_dir["mode"] == "lora" and by_dir["settings"]["micro_batch"] == 2
    assert plan_json(capsys, "--config", recipe, "model.init_from=null", "model.preset=shapes")["mode"] == "lora"


def test_plan_infer_estimates_int8_and_int4_weights(capsys):
    p = plan_json(capsys, "--preset", "videollama-13b", "--mode", "infer", "--gpu-memory", "24")
    assert not p["fits"]
    int8 = [s for s in p["suggestions"] if s.startswith("int8 weights (--quantize int8")]
    int4 = [s for s in p["suggestions"] if s.startswith("int4 weights (--quantize int4")]
    assert len(int8) == len(int4) == 1
    assert "still too much" not in int8[0]   # 13B in int8 answers on a 24 GiB card


def test_a_short_run_warms_up_over_a_share_of_its_steps():
    from videollama.train.recipe import TrainConfig

    cfg = TrainConfig.from_yaml(ROOT / "configs" / "finetune-videoqa.yaml", ["max_steps=20"])
    assert cfg.schedule.warmup_for(20) == 1 and cfg.schedule.warmup_for(1000) == 50
    assert TrainConfig.from_yaml(ROOT / "configs" / "pretrain-tiny.yaml").schedule.warmup_for(20) == 50
    with pytest.raises(ValueError, match="warmup_fraction must be in"):
        TrainConfig.from_yaml(ROOT / "configs" / "finetune-videoqa.yaml", ["schedule.warmup_fraction=1.5"])


def test_only_the_known_noise_is_silenced():
    from videollama.noise import quiet_known_noise

    quiet_known_noise()
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Keep()
    logger = logging.getLogger("torchao")
    logger.addHandler(handler)
    try:
        logger.warning("Failed to load /x/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: no")
        logger.warning("Failed to load /x/site-packages/torchao/_C_cutlass_90a.abi3.so: no")
        logger.warning("something else went wrong")
    finally:
        logger.removeHandler(handler)
    assert seen == ["something else went wrong"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet_known_noise()   # catch_warnings reset the filters: install them again
        known = ("torch.distributed is disabled, unavailable or uninitialized, assuming the intent is to load "
                 "in a single process.")
        warnings.warn_explicit(known, UserWarning, "utils.py", 1, module="torch.distributed.checkpoint.utils")
        warnings.warn_explicit(known, UserWarning, "mine.py", 1, module="videollama.somewhere")
        warnings.warn_explicit("another", UserWarning, "utils.py", 2, module="torch.distributed.checkpoint.utils")
    assert [str(w.message) for w in caught] == [known, "another"]


def test_data_inspect_samples_with_a_models_spec(model_dir, tmp_path, capsys):
    import random

    from readme_blocks import small_mp4
    from videollama.data import shapes

    (tmp_path / "v.mp4").write_bytes(small_mp4(shapes.sample_clip_spec(random.Random(0))))
    (tmp_path / "qa.jsonl").write_text(json.dumps({"video": "v.mp4", "question": "q?", "answer": "a"}) + "\n")
    assert main(["data", "inspect", str(tmp_path / "qa.jsonl"), "--model", str(model_dir), "--limit", "1"]) == 0
    times = [ln for ln in capsys.readouterr().out.splitlines() if "timestamps:" in ln]
    # The shapes preset's spec: 4 frames at 1 FPS (the defaults would give 16 at 4 FPS).
    assert len(times) == 1 and len(times[0].split(":")[1].split()) == 4
