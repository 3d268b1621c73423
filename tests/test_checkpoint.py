"""Checkpoints: atomic writes, `latest`, keep-K, resume, and export to a model directory.

Runs the real loop in this process (a one-rank gloo group) on the shrunken tiny model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import dcp_model_tensors, small_cfg
from videollama.train import checkpoint as ckpt
from videollama.train.loop import train


def test_crash_while_writing_leaves_the_previous_checkpoint(tmp_path: Path, monkeypatch):
    run = tmp_path / "run"
    train(small_cfg(), run)  # checkpoints after steps 2 and 4
    assert ckpt.latest_checkpoint(run).name == "step-00000004"
    before = dcp_model_tensors(run / "checkpoints" / "step-00000004")

    def crash(*args, **kwargs):  # the process dies after DCP wrote its shards, before the rename
        raise OSError("disk gone (simulated)")

    monkeypatch.setattr(ckpt, "_write_rank_state", crash)
    with pytest.raises(OSError, match="simulated"):  # extending the run is a recorded change of max_steps
        train(small_cfg(max_steps=6), run, allow_config_change=True)
    assert (run / "checkpoints" / ".tmp-step-00000006").is_dir()  # the half-written one
    assert not (run / "checkpoints" / "step-00000006").exists()
    latest = ckpt.latest_checkpoint(run)
    assert latest.name == "step-00000004"
    after = dcp_model_tensors(latest)  # still loadable, and unchanged
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    monkeypatch.undo()
    summary = train(small_cfg(max_steps=6), run, allow_config_change=True)  # the same command resumes at step 4
    assert summary["start_step"] == 4 and summary["steps"] == 6
    assert ckpt.latest_checkpoint(run).name == "step-00000006"
    assert not list((run / "checkpoints").glob(".tmp-*"))  # the debris is gone


def test_keep_last_k_and_latest_pointer(tmp_path: Path):
    run = tmp_path / "run"
    train(small_cfg(max_steps=5, checkpoint={"every": 1, "keep": 2}), run)
    names = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert names == ["step-00000004", "step-00000005"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000005"
    assert ckpt.find_checkpoint(run, 4).name == "step-00000004"
    with pytest.raises(ValueError, match="no complete checkpoint for step 1"):
        ckpt.find_checkpoint(run, 1)


def test_latest_naming_an_incomplete_folder_is_a_clear_error(tmp_path: Path):
    root = tmp_path / "checkpoints"
    (root / "step-00000003").mkdir(parents=True)
    (root / "latest").write_text("step-00000003\n")
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        ckpt.latest_checkpoint(tmp_path)


def test_export_writes_a_model_directory_with_the_checkpoint_weights(tmp_path: Path):
    from videollama.model.videollama import VideoLlama

    run = tmp_path / "run"
    train(small_cfg(), run)
    from videollama.data.tokenizer import train_tokenizer

    # export copies the run's tokenizer (checked: a model directory's tokenizer must load)
    train_tokenizer(["a red square moves left."] * 4, vocab_size=300).save(str(run / "tokenizer.json"))
    out = ckpt.export(run, tmp_path / "model", step=2)
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "preprocessor.json",
                                               "tokenizer.json"}
    model = VideoLlama.from_pretrained(out)
    saved = dcp_model_tensors(run / "checkpoints" / "step-00000002")
    state = model.state_dict()
    assert saved.keys() == state.keys()
    for k in saved:
        assert torch.equal(saved[k], state[k]), k
    assert (out / "tokenizer.json").read_bytes() == (run / "tokenizer.json").read_bytes()
    # Step 2 and step 4 differ: export really picked the step asked for.
    later = dcp_model_tensors(run / "checkpoints" / "step-00000004")
    assert any(not torch.equal(later[k], state[k]) for k in later)


def test_export_without_checkpoints_names_the_run(tmp_path: Path, capsys):
    from videollama.cli import main

    assert main(["export", str(tmp_path), "--out", str(tmp_path / "m")]) == 2
    assert str(tmp_path) in capsys.readouterr().err


def test_resuming_a_run_dir_with_another_model_is_refused(tmp_path: Path):
    run = tmp_path / "run"
    train(small_cfg(max_steps=2), run)
    other = small_cfg(max_steps=4)
    other.model.overrides["decoder.num_layers"] = 1
    with pytest.raises(ValueError, match="holds checkpoints of another model \\(differs in \\['decoder'\\]\\)"):
        train(other, run)
    assert ckpt.latest_checkpoint(run).name == "step-00000002"  # untouched
