"""The README's own-data recipes move the model: 20 steps on a 10-question set lower the loss and
change the answers (full fine-tuning and LoRA), and the commands of the LoRA trial (train, export,
eval --adapter, merge, generate --quantize int8) print nothing on stderr but our own progress bars.

The blocks run as README.md prints them (tests/readme_blocks.py), in a folder holding a tiny model
at runs/demo/model and the data set at my-data/; tests/test_readme.py counts them as run here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from readme_blocks import block_starting, check, make_workdir, run_block, run_videollama

OWN_DATA = "videollama train --config configs/finetune-videoqa.yaml"
LORA = "videollama train --config configs/lora-videoqa.yaml"
STEPS = 20

# Our own stderr: tqdm bars of train and eval ("train:  45%|...", "eval videoqa: 100%|..."), blank
# lines between them. Anything else (a library's warning, a log line) fails the test.
OURS = [re.compile(r"^(train|eval \w+): +\d+%\|"), re.compile(r"^\s*$")]


@pytest.fixture(scope="module")
def trial(tmp_path_factory) -> dict:
    root = make_workdir(tmp_path_factory.mktemp("own-data") / "work")
    run_videollama(root, "eval", "--model", "runs/demo/model", "--task", "videoqa", "--data", "my-data/train.jsonl",
                   "--out", "eval/before")
    own = block_starting(OWN_DATA)
    check(run_block(own, root), own)
    lora = block_starting(LORA)
    lora_run = check(run_block(lora, root), lora)
    run_videollama(root, "eval", "--model", "models/ft-qa", "--task", "videoqa", "--data", "my-data/train.jsonl",
                   "--out", "eval/after-qa")
    return {"root": root, "lora_stderr": lora_run.stderr, "lora_stdout": lora_run.stdout}


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def answers(eval_dir: Path) -> list[str]:
    return [json.loads(line)["prediction"] for line in (eval_dir / "predictions.jsonl").read_text().splitlines()]


def assert_learnt(run_dir: Path, peak_lr: float) -> None:
    steps = metrics(run_dir)
    assert [m["step"] for m in steps] == list(range(STEPS))
    # The schedule reaches the LR the line asks for (a 50-step warmup never did in 20 steps).
    assert max(m["lr"] for m in steps) == pytest.approx(peak_lr)
    first, last = (sum(m["loss"] for m in part) / 3 for part in (steps[:3], steps[-3:]))
    assert last < first - 0.3, f"{run_dir.name}: loss {first:.3f} -> {last:.3f}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["warnings"] == []


def test_the_own_data_recipe_lowers_the_loss_and_changes_the_answers(trial):
    root = trial["root"]
    assert_learnt(root / "runs" / "ft-qa", 2e-3)
    assert_learnt(root / "runs" / "ft-cap", 2e-3)
    before, after = answers(root / "eval" / "before"), answers(root / "eval" / "after-qa")
    assert len(before) == len(after) == 10
    changed = sum(a != b for a, b in zip(before, after))
    assert changed >= 5, f"only {changed} of 10 answers changed: {before} -> {after}"
    assert (root / "models" / "ft-cap" / "model.safetensors").is_file()


def test_the_lora_recipe_lowers_the_loss_and_changes_the_answers(trial):
    root = trial["root"]
    assert_learnt(root / "runs" / "lora-qa", 5e-3)
    # The block's own `eval --adapter` on my-data/eval.jsonl: the same 10 questions as before.
    before, after = answers(root / "eval" / "before"), answers(root / "out")
    changed = sum(a != b for a, b in zip(before, after))
    assert changed >= 5, f"only {changed} of 10 answers changed: {before} -> {after}"
    assert (root / "models" / "demo-qa" / "model.safetensors").is_file()


def test_the_lora_trial_prints_no_stderr_line_but_ours(trial):
    lines = re.split(r"[\r\n]", trial["lora_stderr"])
    foreign = [line for line in lines if not any(p.match(line) for p in OURS)]
    assert not foreign, "unexpected stderr lines:\n" + "\n".join(foreign)
    # The block ran every command of the trial: train, export, eval --adapter, merge, generate.
    out = trial["lora_stdout"]
    assert '"steps": 20' in out and "wrote adapters/qa" in out and "wrote models/demo-qa" in out
    assert "wrote out/predictions.jsonl" in out
