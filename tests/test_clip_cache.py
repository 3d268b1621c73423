"""The loader's decoded-clip cache gives exactly the frames load_clip (PyAV) gives, and decodes once."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from videollama.config import PreprocessConfig
from videollama.data.clip_cache import cached_clip
from videollama.data.loader import VideoTextLoader
from videollama.data.read_policy import ReadPolicy
from videollama.data.shapes import encode_mp4, iter_frames, sample_clip_spec
from videollama.data.video import load_clip

PRE = PreprocessConfig(num_frames=8, fps=2.0, size=32)


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cache") / "clip.mp4"
    path.write_bytes(encode_mp4(iter_frames(sample_clip_spec(random.Random(3)))))  # 5 s, 25 FPS
    return path


def reference(video: Path, start: float) -> tuple[torch.Tensor, torch.Tensor]:
    return load_clip(video, num_frames=PRE.num_frames, fps=PRE.fps, size=PRE.size, start=start, train=False,
                     mean=PRE.mean, std=PRE.std)


def cached(video: Path, cache: Path, *, train: bool, seed: int = 0, data: bytes | None = None, pre=PRE):
    return cached_clip(data if data is not None else str(video), cache_dir=str(cache),
                              identity=(str(video), "clip"), preprocess=pre, train=train,
                              generator=torch.Generator().manual_seed(seed), name=str(video))


# 8 frames at 2 FPS, and the demo's 4 at 1 FPS (whose centred start, 0.5 s, lies between seconds)
@pytest.mark.parametrize("pre", [PRE, PreprocessConfig(num_frames=4, fps=1.0, size=32)])
def test_evaluation_window_equals_load_clip_centred_window(video: Path, tmp_path: Path, pre: PreprocessConfig):
    frames, times = cached(video, tmp_path, train=False, pre=pre)
    ref_frames, ref_times = load_clip(video, num_frames=pre.num_frames, fps=pre.fps, size=pre.size, train=False,
                                      mean=pre.mean, std=pre.std)
    torch.testing.assert_close(frames, ref_frames, atol=1e-6, rtol=0)
    torch.testing.assert_close(times, ref_times.double())


def test_training_windows_are_load_clip_windows_on_the_grid_and_cover_every_start(video: Path, tmp_path: Path):
    starts = set()
    for seed in range(60):
        frames, times = cached(video, tmp_path, train=True, seed=seed)
        start = float(times[0])
        ref_frames, ref_times = reference(video, start)
        torch.testing.assert_close(frames, ref_frames, atol=1e-6, rtol=0)
        torch.testing.assert_close(times, ref_times.double())
        starts.add(start)
    # A 5 s video is cached on a grid 3 times finer than 2 FPS (30 frames, 1/6 s apart; 3 x 10 is
    # within the 4 windows' worth of frames the cache keeps): windows of 8 frames 0.5 s apart span
    # 22 grid frames and start at any of the 9 grid points 0, 1/6, ..., 8/6 s.
    assert sorted(starts) == pytest.approx([k / 6 for k in range(9)])


def test_second_call_reads_the_cache_and_a_changed_video_is_decoded_again(video: Path, tmp_path: Path, monkeypatch):
    data = video.read_bytes()
    first, _ = cached(video, tmp_path, train=False, data=data)  # bytes, as from a tar shard
    assert len(list(tmp_path.glob("*.npz"))) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although the clip is cached")

    monkeypatch.setattr("videollama.data.video.load_clip", no_decoding)
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
    kwargs = dict(tokenizer=tok, preprocess=PRE, task="videoqa", batch_size=1, max_len=32, train=False, epochs=1,
                  policy=ReadPolicy(allow_outside_root=True))  # the line gives the video by its absolute path
    plain = next(iter(VideoTextLoader(str(jsonl), **kwargs)))
    with_cache = next(iter(VideoTextLoader(str(jsonl), cache_dir=str(tmp_path / "c"), **kwargs)))
    torch.testing.assert_close(with_cache["video"], plain["video"], atol=1e-6, rtol=0)
    assert torch.equal(with_cache["input_ids"], plain["input_ids"])
