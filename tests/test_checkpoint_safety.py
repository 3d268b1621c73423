"""Tampered checkpoints run no code, a `latest` pointer stays inside its run, a damaged newest
checkpoint falls back to the one before it, and per-rank state is plain JSON."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from helpers import dcp_model_tensors, small_cfg
from videollama.cli import main
from videollama.train import checkpoint as ckpt
from videollama.train.loop import TrainingStopped, train
from videollama.train.safe_dcp import UnsafeCheckpoint


class CreatesFile:
    """Unpickling this opens (creates) a file: what a malicious pickle could do, and worse."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_rank_state_is_json_and_the_checkpoint_holds_tensors_only(tmp_path: Path):
    run = tmp_path / "run"
    train(small_cfg(max_steps=2), run)
    step = ckpt.latest_checkpoint(run)
    rank_state = json.loads((step / "rank-00000.json").read_text())
    assert set(rank_state) == {"loader", "rng"} and set(rank_state["rng"]) >= {"python", "torch", "numpy"}
    assert not list(step.glob("*.pt"))
    meta = json.loads((step / "meta.json").read_text())
    assert meta["optimizer_param_groups"][0]["lr"] > 0
    # DCP's own reader (an independent check): every stored item is a tensor.
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    stored = dcp.FileSystemReader(str(step)).read_metadata().state_dict_metadata
    assert stored and all(isinstance(m, TensorStorageMetadata) for m in stored.values())


def test_a_malicious_metadata_pickle_is_refused_and_runs_nothing(tmp_path: Path, capsys):
    run = tmp_path / "run"
    train(small_cfg(max_steps=4), run)  # step-2 and step-4
    marker = tmp_path / "pwned"
    (run / "checkpoints" / "step-00000004" / ".metadata").write_bytes(pickle.dumps(CreatesFile(marker)))

    with pytest.raises(UnsafeCheckpoint, match=r"\.metadata: refers to (builtins|io)\.open"):
        ckpt.export(run, tmp_path / "model")
    assert not marker.exists()
    assert main(["export", str(run), "--out", str(tmp_path / "model")]) == 2
    assert not marker.exists()
    # The input is really hostile: DCP's own reader runs it.
    dcp.FileSystemReader(str(run / "checkpoints" / "step-00000004")).read_metadata()
    assert marker.exists()
    marker.unlink()

    # Resuming passes over the tampered checkpoint for the newest intact one, and says so.
    summary = train(small_cfg(max_steps=6), run, allow_config_change=True)  # a longer run: a recorded change
    assert not marker.exists()
    assert summary["start_step"] == 2 and summary["steps"] == 6
    err = capsys.readouterr().err
    assert "cannot resume from" in err and "step-00000004" in err and "resumed from" in err


def test_a_pickled_bytes_item_in_the_shards_is_refused_and_runs_nothing(tmp_path: Path):
    run = tmp_path / "run"
    train(small_cfg(max_steps=2), run)
    step = ckpt.latest_checkpoint(run)
    marker = tmp_path / "pwned"
    # Rewrite the DCP folder so that one model entry is a pickled object instead of a tensor:
    # DCP's planner would torch.load(weights_only=False) it.
    state = {f"model.{k}": v for k, v in dcp_model_tensors(step).items()}
    state["model.decoder.norm.weight"] = CreatesFile(marker)
    for f in [*step.glob("*.distcp"), step / ".metadata"]:
        f.unlink()
    dcp.save(state, checkpoint_id=str(step), no_dist=True)
    assert not marker.exists()  # saving pickles the object; only unpickling it would run it

    with pytest.raises(UnsafeCheckpoint, match="decoder.norm.weight.*pickled bytes"):
        ckpt.export(run, tmp_path / "model")
    assert not marker.exists()
    with pytest.raises(TrainingStopped, match="no checkpoint could be read"):
        train(small_cfg(max_steps=4), run, allow_config_change=True)  # a longer run: a recorded change
    assert not marker.exists()
    # The input is really hostile: DCP's own reader runs it.
    dcp.load({"model.decoder.norm.weight": None}, checkpoint_id=str(step), no_dist=True)
    assert marker.exists()


@pytest.mark.parametrize("pointer", ["../../elsewhere", "/tmp/elsewhere", "step-00000002/../../x", "step-2"])
def test_latest_must_name_a_step_folder_of_the_run(tmp_path: Path, pointer: str, capsys):
    run = tmp_path / "run"
    train(small_cfg(max_steps=2), run)
    (run / "checkpoints" / "latest").write_text(pointer + "\n")
    with pytest.raises(ValueError, match="must name a step folder of this run"):
        ckpt.latest_checkpoint(run)
    # The run itself still resumes from its own newest step folder.
    summary = train(small_cfg(max_steps=3), run, allow_config_change=True)  # a longer run: a recorded change
    assert summary["start_step"] == 2
    assert "must name a step folder" in capsys.readouterr().err


def test_metadata_pointing_outside_the_folder_is_refused(tmp_path: Path):
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    from videollama.train.safe_dcp import read_metadata

    run = tmp_path / "run"
    train(small_cfg(max_steps=2), run)
    step = ckpt.latest_checkpoint(run)
    metadata = dcp.FileSystemReader(str(step)).read_metadata()
    index = next(iter(metadata.storage_data))
    info = metadata.storage_data[index]
    metadata.storage_data[index] = _StorageInfo("../../outside.distcp", info.offset, info.length)
    (step / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(UnsafeCheckpoint, match="outside the checkpoint folder"):
        read_metadata(step)


def test_safe_reader_loads_what_dcp_wrote(tmp_path: Path):
    """The restricted reader is not a stand-in: it reads real checkpoints, bf16 tensors included."""
    from videollama.train.safe_dcp import SafeReader

    state = {"a": torch.randn(3, 4), "b": torch.arange(5), "c": torch.randn(2, 2).to(torch.bfloat16)}
    dcp.save(state, checkpoint_id=str(tmp_path / "c"), no_dist=True)
    loaded = {k: torch.empty_like(v) for k, v in state.items()}
    dcp.load(loaded, storage_reader=SafeReader(str(tmp_path / "c")), no_dist=True)
    for k in state:
        assert torch.equal(loaded[k], state[k]), k
