"""A long video is never held as frames all at once: ``eval`` and ``generate`` decode and encode it a
chunk of windows at a time (inference/whole_video.py, whose docstring states the peak formula).

- Every call of the encoder finds the frames of every earlier call freed (weak references), in the
  evaluation harness and in the ``generate`` command, with full frames and with ``--frames 1``.
- The encoding step's peak in torch's CPU allocator (``AllocatorTrace``) is at most
  latents + one chunk of frames + the encoder's own peak on one chunk, and well below the video's
  frames together.
"""

from __future__ import annotations

import json
import random
import weakref

import pytest
import torch

from test_eval_harness import WORDS
from videollama.config import VideoLlamaConfig
from videollama.data import load_clip, shapes_long
from videollama.data.tokenizer import train_tokenizer
from videollama.data.windows import open_windows
from videollama.eval.harness import evaluate
from videollama.inference.whole_video import encode_whole_video
from videollama.model.videollama import VideoLlama
from videollama.plan.memtrace import AllocatorTrace

SECONDS = 60  # 15 tiled 4 s windows under max_windows 15: 240 frames of 64 x 64


@pytest.fixture(scope="module")
def long_video(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    spec = shapes_long.sample_long_spec(random.Random(3), SECONDS)
    (root / "long.mp4").write_bytes(shapes_long.encode_video(spec))
    torch.manual_seed(0)
    config = VideoLlamaConfig.from_name("tiny").with_overrides({"preprocess.max_windows": 15})
    model = VideoLlama(config).eval()
    tokenizer = train_tokenizer([WORDS] * 20, vocab_size=config.decoder.vocab_size)
    model.save_pretrained(root / "model", tokenizer=tokenizer)
    return root, model, tokenizer


class FrameWatch:
    """Wraps ``encode_video``: counts, at every call, the frames of earlier calls still alive."""

    def __init__(self, real, single_frame: torch.Tensor | None = None):
        self.real, self.single_frame = real, single_frame
        self.refs: list[weakref.ref] = []
        self.windows: list[int] = []
        self.still_alive = 0
        self.one_frame_everywhere = True

    def __call__(self, video, times=None, model=None):
        self.still_alive += sum(ref() is not None for ref in self.refs)
        self.refs.append(weakref.ref(video))
        self.windows.append(video.shape[0])
        if self.single_frame is not None:
            self.one_frame_everywhere &= torch.equal(video, self.single_frame.expand_as(video))
        return self.real(video, times) if model is None else self.real(model, video, times)


def _middle_frame(path, pre):
    frame, _ = load_clip(path, num_frames=1, fps=pre.fps, size=pre.size, mean=pre.mean, std=pre.std,
                         start=SECONDS / 2)
    return frame[0]  # [3, S, S]


@pytest.mark.parametrize("frames", [None, 1])
def test_eval_never_holds_all_frames(long_video, tmp_path, monkeypatch, frames):
    root, model, tokenizer = long_video
    pre = model.config.preprocess
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"video": "long.mp4", "question": q, "answer": "left", "kind": "needle",
                                        "duration_s": SECONDS}) + "\n"
                            for q in ("which way does the red square move?", "how many objects are there?")))
    watch = FrameWatch(model.encode_video, _middle_frame(root / "long.mp4", pre) if frames == 1 else None)
    monkeypatch.setattr(model, "encode_video", watch)
    metrics = evaluate(model, tokenizer, "videoqa", data, root, tmp_path / "out", frames=frames, max_new_tokens=2,
                       windows_per_chunk=2, progress=False)
    assert metrics["evaluated"] == 2
    # 15 windows, 2 at a time, the video encoded once for both questions; no chunk outlives its turn.
    assert watch.windows == [2] * 7 + [1] and watch.still_alive == 0
    assert watch.one_frame_everywhere  # --frames 1: the middle frame in every frame of every window
    preds = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert all(len(p["timestamps"]) == 15 for p in preds)
    if frames == 1:
        assert {t for window in preds[0]["timestamps"] for t in window} == {SECONDS / 2}


def test_generate_command_never_holds_all_frames(long_video, monkeypatch, capsys):
    from videollama.cli import main

    root, _, _ = long_video
    watch = FrameWatch(VideoLlama.encode_video)
    monkeypatch.setattr(VideoLlama, "encode_video", lambda self, video, times=None: watch(video, times, model=self))
    assert main(["generate", "--model", str(root / "model"), "--prompt", "which way?", "--template", "videoqa",
                 "--video", str(root / "long.mp4"), "--max-new-tokens", "2", "--windows-per-chunk", "4",
                 "--show-frames"]) == 0
    assert watch.windows == [4, 4, 4, 3] and watch.still_alive == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"frames (s) of 15 window(s) over {SECONDS:.2f} s:"
    assert out[15] == "  window 15: " + " ".join(f"{56 + k / 4:.2f}" for k in range(16))


def test_encoding_peak_is_latents_plus_one_chunk(long_video):
    """Peak of torch's allocator while a 60 s video is encoded one window at a time <=
    latents [W, L, D_v] + one window's float32 frames + the encoder's peak on one window (measured
    alone; it includes that window's latents) + a little bookkeeping; and far below the frames of
    the whole video, which the old way of loading a clip would have held had it loaded them all."""
    root, model, _ = long_video
    pre = model.config.preprocess
    with open_windows(root / "long.mp4", pre) as whole:
        windows = whole.num_windows
        chunk = next(whole.chunks(1))
    with torch.no_grad(), AllocatorTrace() as one:
        model.encode_video(chunk.frames, chunk.times)
    frame_bytes = chunk.frames.numel() * chunk.frames.element_size()  # one window: [1, F, 3, S, S] float32
    del chunk

    with AllocatorTrace() as trace:
        video = encode_whole_video(model, root / "long.mp4", windows_per_chunk=1)
    latent_bytes = video.latents.numel() * video.latents.element_size()
    bookkeeping = 64 * 1024  # the [W, F] times, the chunk's time rows, small index tensors
    assert windows == 15 and video.num_windows == 15
    assert trace.peak <= latent_bytes + frame_bytes + one.peak + bookkeeping, (trace.peak, latent_bytes,
                                                                                frame_bytes, one.peak)
    assert trace.peak < windows * frame_bytes / 2  # never the frames of half the video at once
