"""Whole videos as windows stamped with absolute time: a model saved before the time stamps loads and
gives the same logits; videos of different lengths batch with a key mask that hides the padding; the
time code tells apart times it never saw."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import token_ids, video_frames
from videollama.config import VideoLlamaConfig
from videollama.model.videollama import VideoLlama, Windows


def tiny(**overrides) -> VideoLlamaConfig:
    return VideoLlamaConfig.from_name("tiny").with_overrides({"preprocess.num_frames": 4, "preprocess.fps": 1.0,
                                                               **overrides})


def open_gates(m: VideoLlama) -> None:
    with torch.no_grad():
        for block in m.decoder.cross_attn_layers:
            block.attn_gate.fill_(1.0)
            block.ff_gate.fill_(1.0)


def clip(b: int = 2, f: int = 4, seed: int = 0) -> torch.Tensor:
    return video_frames(b, f, seed)


def ids(b: int = 2, t: int = 6) -> torch.Tensor:
    return token_ids(b, t, seed=1)


@torch.no_grad()
def test_a_fresh_model_starts_with_no_time_code():
    # init_weights draws every Linear; the time code's projection must end at zero all the same
    # (its MediaTime is visited before its Linear), so that a fresh model ignores time as the gates do.
    torch.manual_seed(0)
    m = VideoLlama(tiny())
    assert torch.equal(m.decoder.media_time.proj.weight, torch.zeros_like(m.decoder.media_time.proj.weight))
    latents = torch.randn(3, 16, m.config.vision.hidden_size)
    assert torch.equal(m.stamp(latents, torch.tensor([[0.0], [4.0], [3600.0]])), latents)


@torch.no_grad()
@pytest.mark.parametrize("num_latents", [16, 0])
def test_a_directory_saved_before_the_time_stamps_loads_and_gives_the_same_logits(tmp_path, num_latents):
    torch.manual_seed(0)
    m = VideoLlama(tiny(**{"resampler.num_latents": num_latents})).eval()
    open_gates(m)
    m.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["decoder.media_time.proj.weight"]  # as a directory written before it existed
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})

    loaded = VideoLlama.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded.decoder.media_time.proj.weight, torch.zeros_like(m.decoder.media_time.proj.weight))
    x, v = ids(), clip()
    # The model before this change: latents straight from the resampler, no stamp at all.
    before = m.decode(x, positions=torch.arange(x.shape[1]).expand_as(x),
                      media=_media(m.window_latents(v)))
    assert torch.equal(loaded(x, v).logits, before)
    # One window at time 0, given explicitly, is the same clip.
    one = Windows(times=torch.arange(4, dtype=torch.float64).expand(2, 4), video=torch.arange(2))
    assert torch.equal(loaded(x, v, windows=one).logits, before)


def _media(latents):
    from videollama.model.decoder import Media

    return Media.from_latents(latents)


@torch.no_grad()
def test_videos_of_different_lengths_batch_with_a_mask_that_hides_the_padding():
    torch.manual_seed(0)
    m = VideoLlama(tiny()).eval()
    open_gates(m)
    with torch.no_grad():
        m.decoder.media_time.proj.weight.normal_(std=0.5)  # a trained stamp: times matter
    frames = clip(b=4, seed=3)  # windows: video 0 has three, video 1 has one
    times = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [0, 1, 2, 3]], dtype=torch.float64)
    windows = Windows(times=times, video=torch.tensor([0, 0, 0, 1]))
    x = ids()
    both = m(x, frames, windows=windows).logits
    alone0 = m(x[:1], frames[:3], windows=Windows(times=times[:3], video=torch.zeros(3, dtype=torch.long))).logits
    alone1 = m(x[1:], frames[3:], windows=Windows(times=times[3:], video=torch.zeros(1, dtype=torch.long))).logits
    torch.testing.assert_close(both[:1], alone0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both[1:], alone1, rtol=1e-5, atol=1e-5)  # the padding is invisible
    latents, mask = m.gather_videos(m.encode_video(frames, times), windows.video)
    assert latents.shape == (2, 3 * 16, 64) and mask.sum(1).tolist() == [48, 16]
    # Later windows at other times are other inputs: the stamp makes the order of windows matter.
    shuffled = Windows(times=times[[2, 1, 0, 3]], video=windows.video)
    assert not torch.allclose(m(x, frames, windows=shuffled).logits[:1], both[:1], atol=1e-4)


@torch.no_grad()
def test_rows_about_one_long_video_share_its_latents_through_video_index():
    torch.manual_seed(0)
    m = VideoLlama(tiny(**{"resampler.num_latents": 0})).eval()
    open_gates(m)
    frames = clip(b=3, seed=5)
    times = torch.arange(12, dtype=torch.float64).view(3, 4)
    windows = Windows(times=times, video=torch.zeros(3, dtype=torch.long))
    x = ids(b=3)
    shared = m(x, frames, windows=windows, video_index=torch.zeros(3, dtype=torch.long)).logits
    for row in range(3):
        alone = m(x[row:row + 1], frames, windows=windows).logits
        torch.testing.assert_close(shared[row:row + 1], alone, rtol=1e-5, atol=1e-5)


def test_the_time_code_is_a_phase_per_decimal_digit_and_extrapolates():
    torch.manual_seed(0)
    m = VideoLlama(tiny())
    stamp = m.decoder.media_time
    assert stamp.frequencies == tuple(2 * math.pi / p for p in (1.0, 10.0, 100.0, 1000.0, 10000.0))
    with torch.no_grad():
        stamp.proj.weight.copy_(torch.eye(64, 10))  # read the features straight out
    t = torch.tensor([[347.0], [3599.9], [0.0]], dtype=torch.float64)
    out = stamp(torch.zeros(3, 2, 64), t)[:, 0, :10].detach().double()
    phases = t * torch.tensor([2 * math.pi / p for p in (1.0, 10.0, 100.0, 1000.0, 10000.0)], dtype=torch.float64)
    expected = torch.cat([phases.sin(), phases.cos()], dim=1)
    torch.testing.assert_close(out, expected.float().double(), rtol=0, atol=1e-6)
    # The units digit of 347 (7) is the phase 2 pi 7/10 of the 10 s period, and so on for each digit.
    assert math.isclose(math.atan2(out[0, 1], out[0, 6]) % (2 * math.pi), 2 * math.pi * 0.7, abs_tol=1e-5)
    assert math.isclose(math.atan2(out[0, 2], out[0, 7]) % (2 * math.pi), 2 * math.pi * 0.47, abs_tol=1e-5)
    # A time far past anything in training has a code all the same, distinct from its neighbours.
    far = stamp(torch.zeros(2, 1, 64), torch.tensor([[5000.0], [5004.0]], dtype=torch.float64))
    assert torch.isfinite(far).all() and not torch.allclose(far[0], far[1])


def test_the_stamp_is_trained_with_the_cross_attention_part():
    from videollama.model.parts import part_of

    m = VideoLlama(tiny())
    assert part_of("decoder.media_time.proj.weight") == "cross_attn"
    v = clip()
    loss = m(ids(), v, labels=ids()).loss
    open_gates(m)
    loss = m(ids(), v, windows=Windows(times=torch.arange(8, dtype=torch.float64).view(2, 4) + 30,
                                        video=torch.arange(2)), labels=ids()).loss
    loss.backward()
    assert m.decoder.media_time.proj.weight.grad.abs().sum() > 0  # zero at init, yet it learns
