"""A run's record stays true: reruns with other settings are refused (or kept apart), summary.json is
strict JSON with skip counts by reason, and a schedule that never reaches its peak LR says so."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import small_cfg
from videollama.train.loop import train
from videollama.train.record import config_changes, schedule_warnings
from videollama.train.schedule import lr_at


def strict_json(path: Path):
    """Parse as strict JSON: NaN, Infinity and -Infinity are not JSON."""
    def refuse(name):
        raise ValueError(f"{path}: {name} is not valid JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_a_rerun_with_another_lr_is_refused_naming_the_key_and_nothing_is_rewritten(tmp_path: Path):
    run = tmp_path / "run"
    train(small_cfg(), run)  # 4 steps, checkpoints at 2 and 4
    recorded = (run / "train_config.json").read_bytes()
    summary = (run / "summary.json").read_bytes()
    with pytest.raises(ValueError, match=r"optimizer\.lr: 0\.002 -> 0\.001") as e:
        train(small_cfg(optimizer={"lr": 1e-3}), run)
    assert "trained to step 4" in str(e.value) and "--allow-config-change" in str(e.value)
    assert (run / "train_config.json").read_bytes() == recorded  # the record still says what was trained
    assert (run / "summary.json").read_bytes() == summary
    # Operational settings may change: workers, logging, checkpoint cadence.
    train(small_cfg(log={"every": 3}, checkpoint={"every": 1, "keep": 4}), run)


def test_an_allowed_change_keeps_both_recipes_and_the_step_it_took_effect(tmp_path: Path):
    run = tmp_path / "run"
    train(small_cfg(), run)
    summary = train(small_cfg(optimizer={"lr": 1e-3}, max_steps=6), run, allow_config_change=True)
    assert summary["start_step"] == 4 and summary["steps"] == 6
    assert strict_json(run / "train_config.json")["optimizer"]["lr"] == 1e-3
    before = strict_json(run / "train_config.until-step-00000004.json")
    assert before["optimizer"]["lr"] == 2e-3 and before["max_steps"] == 4
    history = strict_json(run / "config_history.json")
    assert history == [{"step": 4, "previous": "train_config.until-step-00000004.json",
                        "changes": {"max_steps": {"from": 4, "to": 6},
                                    "optimizer.lr": {"from": 2e-3, "to": 1e-3}}}]
    assert strict_json(run / "summary.json")["config_change"] == history[0]


def test_a_resume_with_nothing_to_do_writes_valid_json_with_a_null_loss(tmp_path: Path):
    run = tmp_path / "run"
    train(small_cfg(), run)
    summary = train(small_cfg(), run)  # resumes at step 4 of 4: no step is taken
    assert summary["start_step"] == 4 and summary["loss"] is None
    on_disk = strict_json(run / "summary.json")
    assert on_disk["loss"] is None and on_disk["steps"] == 4
    assert on_disk["skipped_by_reason"] == {}  # synthetic data: nothing to skip


def test_a_run_that_never_checkpointed_starts_its_record_and_metrics_over(tmp_path: Path):
    run = tmp_path / "run"
    train(small_cfg(checkpoint={"every": 0, "at_end": False}), run)
    assert not list(run.glob("checkpoints/step-*"))
    train(small_cfg(optimizer={"lr": 1e-3}, checkpoint={"every": 0, "at_end": False}), run)
    assert strict_json(run / "train_config.json")["optimizer"]["lr"] == 1e-3  # nothing trained was recorded
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3]  # the second run's steps only, not appended to the first's


def test_schedule_warning_when_the_peak_lr_is_never_reached(tmp_path: Path):
    assert schedule_warnings(peak_lr=5e-5, warmup_steps=10, max_steps=20, min_lr=1e-6) == []
    (warning,) = schedule_warnings(peak_lr=5e-5, warmup_steps=50, max_steps=20, min_lr=1e-6)
    top = lr_at(19, peak_lr=5e-5, warmup_steps=50, max_steps=20, min_lr=1e-6)
    assert top == pytest.approx(2e-5) and f"{top:.3g}" in warning and "never reaches optimizer.lr" in warning
    summary = train(small_cfg(schedule={"warmup_steps": 10}), tmp_path / "run")
    assert len(summary["warnings"]) == 1 and "schedule.warmup_steps (10) >= max_steps (4)" in summary["warnings"][0]
    assert strict_json(tmp_path / "run" / "summary.json")["warnings"] == summary["warnings"]


def test_config_changes_compares_dotted_keys_and_ignores_operational_ones():
    a = {"optimizer": {"lr": 1.0, "betas": (0.9, 0.95)}, "log": {"every": 1}, "data": {"num_workers": 0}}
    b = {"optimizer": {"lr": 2.0, "betas": [0.9, 0.95]}, "log": {"every": 5}, "data": {"num_workers": 2},
         "freeze": ["vision"]}
    assert config_changes(a, b) == {"freeze": (None, ["vision"]), "optimizer.lr": (1.0, 2.0)}


def test_cli_refuses_the_changed_rerun_with_one_line(tmp_path: Path):
    recipe = tmp_path / "r.yaml"
    import yaml

    recipe.write_text(yaml.safe_dump(small_cfg().to_dict()))
    run = tmp_path / "run"
    base = [sys.executable, "-m", "videollama.cli", "train", "--config", str(recipe), "--run-dir", str(run)]
    first = subprocess.run(base, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    json.loads(first.stdout.strip().splitlines()[-1], parse_constant=lambda n: pytest.fail(n))
    again = subprocess.run([*base, "optimizer.lr=1e-3"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 2
    assert again.stderr.startswith("videollama: error:") and "optimizer.lr" in again.stderr
