"""Plain helpers shared by several test modules (fixtures live in conftest.py).

Shards: ``good_video``, ``good_meta``, ``add_member``, ``build_fuzz_shard`` and ``FUZZ_PRE``
(tests/test_shards.py, tests/test_inspect.py). Training runs: ``small_cfg`` and
``dcp_model_tensors`` (tests/test_checkpoint.py, tests/test_train_loop.py).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import torch

from badvideos import BAD_VIDEOS, encode_video, pattern_frame
from videollama.config import PreprocessConfig
from videollama.data import errors
from videollama.train.recipe import TrainConfig

# ---- shards -----------------------------------------------------------------------------

# The reference 4 s window (16 frames at 4 FPS), which badvideos.too_many_frames is built against.
FUZZ_PRE = PreprocessConfig(num_frames=16, fps=4.0, size=16)


def good_video(seed: int) -> bytes:
    """1 s at 25 FPS; the pattern shifts with ``seed`` so every clip has different pixels."""
    return encode_video(num_frames=25, frame_fn=lambda i, w, h: pattern_frame(i + 5 * seed, w, h))


def good_meta(i: int) -> dict:
    return {
        "caption": f"a red square moves left number {i}.",
        "qa": [
            {"question": "what color is the square?", "answer": "red", "kind": "static"},
            {"question": "which way does the red square move?", "answer": "left", "kind": "temporal"},
        ],
    }


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def build_fuzz_shard(path: Path, n_good: int = 4) -> tuple[list[str], dict[str, int]]:
    """One shard with good samples between every kind of bad one, its tail truncated.

    Returns (good keys in order, expected skip counts by reason).
    """
    expected: dict[str, int] = {}
    good: list[str] = []

    def expect(reason: str) -> None:
        expected[reason] = expected.get(reason, 0) + 1

    with tarfile.open(path, "w") as tar:
        for i in range(n_good):
            key = f"good{i:02d}"
            add_member(tar, f"{key}.mp4", good_video(i))
            add_member(tar, f"{key}.json", json.dumps(good_meta(i)).encode())
            good.append(key)
            if i == 0:  # every bad video right after the first good sample
                for name, (make, reason) in BAD_VIDEOS.items():
                    add_member(tar, f"bad_{name}.mp4", make())
                    add_member(tar, f"bad_{name}.json", json.dumps(good_meta(99)).encode())
                    expect(reason)
            if i == 1:
                add_member(tar, "no_json.mp4", good_video(50))  # missing JSON
                expect(errors.MISSING_JSON)
                add_member(tar, "bad_json.mp4", good_video(51))
                add_member(tar, "bad_json.json", b'{"caption": "unterminated')
                expect(errors.INVALID_JSON)
                add_member(tar, "list_json.mp4", good_video(52))
                add_member(tar, "list_json.json", b"[1, 2, 3]")  # valid JSON, but not an object
                expect(errors.INVALID_JSON)
                add_member(tar, "no_video.json", json.dumps(good_meta(53)).encode())  # missing mp4
                expect(errors.MISSING_VIDEO)
        # The last sample is cut in the middle of its video: the tail of a half-copied shard.
        add_member(tar, "cut.mp4", good_video(60))
        add_member(tar, "cut.json", json.dumps(good_meta(60)).encode())
        expect(errors.TRUNCATED_TAR)
    with tarfile.open(path) as tar:
        cut = tar.getmember("cut.mp4")
    data = path.read_bytes()
    path.write_bytes(data[: cut.offset_data + cut.size // 2])
    return good, expected


# ---- training runs ----------------------------------------------------------------------


def small_cfg(**top) -> TrainConfig:
    """A 4-step run of the shrunken tiny model (2 frames of 32x32) on synthetic data; ``top`` overrides
    its settings (a dict is merged into the default one)."""
    d = {
        "model": {"preset": "tiny", "overrides": {"preprocess.num_frames": 2, "preprocess.size": 32,
                                                  "vision.image_size": 32, "vision.max_frames": 2}},
        "data": {"kind": "synthetic", "synthetic_seq_len": 12},
        "optimizer": {"lr": 2e-3}, "schedule": {"warmup_steps": 1},
        "global_batch": 2, "micro_batch": 2, "max_steps": 4,
        "log": {"tensorboard": False, "progress": False},
        "checkpoint": {"every": 2, "keep": 5}, "seed": 1, "deterministic": True,
    }
    for k, v in top.items():
        if isinstance(v, dict):
            d.setdefault(k, {}).update(v)
        else:
            d[k] = v
    return TrainConfig.from_dict(d)


def dcp_model_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The model tensors of a DCP checkpoint folder, read without a process group."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = dcp.FileSystemReader(str(path)).read_metadata()
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.state_dict_metadata.items()
             if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    dcp.load(state, checkpoint_id=str(path), no_dist=True)
    return {k.removeprefix("model."): v for k, v in state.items()}
