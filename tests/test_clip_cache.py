"""The loader's decoded-clip cache gives exactly the frames load_clip (PyAV) gives, and decodes once."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from videollama.config import PreprocessConfig
from videollama.data import shards
from videollama.data.clip import load_clip
from videollama.data.shapes import encode_mp4, iter_frames, sample_clip_spec

PRE = PreprocessConfig(num_frames=8, fps=2.0, size=32)


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cache") / "clip.mp4"
    path.write_bytes(encode_mp4(iter_frames(sample_clip_spec(random.Random(3)))))  # 5 s, 25 FPS
    return path


def reference(video: Path, start: float) -> tuple[torch.Tensor, torch.Tensor]:
    return load_clip(video, num_frames=PRE.num_frames, fps=PRE.fps, size=PRE.size, start=start, train=False,
                     mean=PRE.mean, std=PRE.std)


def cached(video: Path, cache: Path, *, train: bool, seed: int = 0, data: bytes | None = None):
    return shards.cached_clip(data if data is not None else str(video), cache_dir=str(cache),
                              identity=(str(video), "clip"), preprocess=PRE, train=train,
                              generator=torch.Generator().manual_seed(seed), name=str(video))


def test_evaluation_window_equals_load_clip_centred_window(video: Path, tmp_path: Path):
    frames, times = cached(video, tmp_path, train=False)
    ref_frames, ref_times = load_clip(video, num_frames=PRE.num_frames, fps=PRE.fps, size=PRE.size, train=False,
                                      mean=PRE.mean, std=PRE.std)
    torch.testing.assert_close(frames, ref_frames, atol=1e-6, rtol=0)
    torch.testing.assert_close(times, ref_times.double())


def test_training_windows_are_load_clip_windows_on_the_grid_and_cover_every_start(video: Path, tmp_path: Path):
    starts = set()
    for seed in range(40):
        frames, times = cached(video, tmp_path, train=True, seed=seed)
        start = float(times[0])
        ref_frames, ref_times = reference(video, start)
        torch.testing.assert_close(frames, ref_frames, atol=1e-6, rtol=0)
        torch.testing.assert_close(times, ref_times.double())
        starts.add(start)
    # A 5 s video on a 2 FPS grid holds 10 frames: windows of 8 start at 0, 0.5 or 1.0 s.
    assert starts == {0.0, 0.5, 1.0}


def test_second_call_reads_the_cache_and_a_changed_video_is_decoded_again(video: Path, tmp_path: Path, monkeypatch):
    data = video.read_bytes()
    first, _ = cached(video, tmp_path, train=False, data=data)  # bytes, as from a tar shard
    assert len(list(tmp_path.glob("*.npz"))) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although the clip is cached")

    monkeypatch.setattr("videollama.data.clip.load_clip", no_decoding)
    again, _ = cached(video, tmp_path, train=False, data=data)
    torch.testing.assert_close(again, first)

    # Rewriting the file (a regenerated corpus) invalidates its entry: here it must decode again.
    video.write_bytes(data)
    import os

    os.utime(video, ns=(0, 12345))
    with pytest.raises(AssertionError, match="decoded again"):
        cached(video, tmp_path, train=False, data=data)


def test_loader_with_cache_yields_the_same_evaluation_batches(video: Path, tmp_path: Path):
    """The loader's cache stage changes where frames come from, not what an evaluation batch holds."""
    import json

    jsonl = tmp_path / "qa.jsonl"
    jsonl.write_text(json.dumps({"video": str(video), "question": "how many objects are there?",
                                 "answer": "one", "kind": "static"}) + "\n")
    from videollama.data.tokenizer import train_tokenizer

    tok = train_tokenizer(["how many objects are there? one two three"], 300)
    kwargs = dict(tokenizer=tok, preprocess=PRE, task="videoqa", batch_size=1, max_len=32, train=False, epochs=1)
    plain = next(iter(shards.VideoTextLoader(str(jsonl), **kwargs)))
    with_cache = next(iter(shards.VideoTextLoader(str(jsonl), cache_dir=str(tmp_path / "c"), **kwargs)))
    torch.testing.assert_close(with_cache["video"], plain["video"], atol=1e-6, rtol=0)
    assert torch.equal(with_cache["input_ids"], plain["input_ids"])
