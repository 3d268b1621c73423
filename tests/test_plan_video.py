"""`videollama plan --mode infer --video-seconds S`: generation with a whole video.

The windows against the model's policy (``data.windows.window_starts``); the latents and every
cross-attention block's keys/values against the tensors the model makes (exact bytes); the peak
of encoding a video chunk by chunk and then generating against the CPU allocator's peak
(torch.profiler memory events, as tests/test_plan.py measures a clip's); the 13B preset's hour
on the command line.
"""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from videollama.cli import main as cli_main
from videollama.config import VideoLlamaConfig
from videollama.data.windows import WholeVideo, window_starts
from videollama.inference.generate import generate
from videollama.model.videollama import VideoLlama
from videollama.plan.estimate import BREAKDOWN, estimate
from videollama.plan.memtrace import AllocatorTrace
from videollama.plan.planner import settings_for
from videollama.plan.settings import WINDOWS_PER_CHUNK

TINY = VideoLlamaConfig.from_name("tiny")


def _video_settings(config, seconds, **kw):
    return settings_for(config, **{"mode": "infer", "precision": "fp32", "tokens": 24, "new_tokens": 8,
                                   "video_seconds": seconds, **kw})


def _encode_in_chunks(model: VideoLlama, windows: int, per_chunk: int, frames: int) -> torch.Tensor:
    """A video's windows encoded ``per_chunk`` at a time into one buffer, each chunk's frames dropped
    after it: latents [1, windows * L, D_v]."""
    cfg = model.config
    size, fps = cfg.vision.image_size, cfg.preprocess.fps
    latents = None
    for first in range(0, windows, per_chunk):
        n = min(per_chunk, windows - first)
        pixels = torch.randn(n, frames, 3, size, size)  # [w, F, 3, S, S], as WholeVideo.chunks hands them out
        times = (first + torch.arange(n, dtype=torch.float64)[:, None]) * frames / fps \
            + torch.arange(frames, dtype=torch.float64) / fps  # [w, F]
        chunk = model.encode_video(pixels, times)  # [w, L, D_v]
        if latents is None:
            latents = chunk.new_empty(windows, *chunk.shape[1:])
        latents[first:first + n] = chunk
        del pixels, chunk
    return latents.view(1, -1, latents.shape[-1])


def test_windows_are_the_models_policy():
    small = VideoLlamaConfig.from_name("small")
    for config, seconds in ((small, 3600), (small, 60), (small, 2.5), (TINY, 30)):
        pre = config.preprocess
        s = _video_settings(config, seconds, tokens=16)
        assert s.windows == len(window_starts(seconds, pre.window_s, pre.max_windows))
    assert _video_settings(small, 3600, tokens=16).windows == small.preprocess.max_windows   # spread
    hour = small.with_overrides({"preprocess.max_windows": 900})
    assert _video_settings(hour, 3600, tokens=16).windows == 900                              # tiled
    assert _video_settings(small, 60, tokens=16, frames=8).windows == 30   # an 8-frame window is 2 s
    assert WINDOWS_PER_CHUNK == inspect.signature(WholeVideo.chunks).parameters["windows_per_chunk"].default


@pytest.mark.parametrize("preset,precision", [("tiny", "fp32"), ("small", "bf16"), ("videollama-13b", "bf16")])
def test_latents_and_cross_kv_are_the_bytes_the_model_makes(preset, precision):
    cfg = VideoLlamaConfig.from_name(preset, **{"preprocess.max_windows": 900})
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    b, seconds = 2, 600
    s = _video_settings(cfg, seconds, precision=precision, micro_batch=b, tokens=16)
    with torch.device("meta"):
        model = VideoLlama(cfg).to(dtype)
        frames = torch.empty(s.windows, s.frames, 3, cfg.vision.image_size, cfg.vision.image_size, dtype=dtype)
        latents = model.window_latents(frames).reshape(1, -1, cfg.vision.hidden_size).expand(b, -1, -1)
        kv = model.decoder.project_media(latents)
    t = estimate(cfg, s).totals
    assert t["visual_latents"] == latents.numel() * latents.element_size()
    assert t["cross_attn_kv"] == sum(x.numel() * x.element_size() for pair in kv for x in pair)
    assert t["cross_attn_kv_per_block"] * len(kv) == t["cross_attn_kv"]
    assert t["video_latents"] == latents.shape[1] == s.windows * cfg.resampler.num_latents
    assert t["frame_chunk"] == min(WINDOWS_PER_CHUNK, s.windows) * s.frames * 3 * cfg.vision.image_size ** 2 * 4


@pytest.mark.parametrize("seconds,per_chunk,frames", [(2.0, 8, 4), (15.0, 8, 4), (60.0, 16, 1)])
def test_whole_video_generation_peak_is_within_15_percent_of_the_allocators(seconds, per_chunk, frames):
    # one window; two chunks; and 240 one-frame windows (a quarter second each: cheap to encode), whose
    # latents and keys/values outweigh the weights
    cfg = TINY.with_overrides({"preprocess.max_windows": 1000})
    prompt, new = 24, 8
    s = _video_settings(cfg, seconds, frames=frames, tokens=prompt, new_tokens=new, windows_per_chunk=per_chunk)
    torch.manual_seed(0)
    trace = AllocatorTrace()
    with trace, torch.inference_mode():
        model = VideoLlama(cfg).eval()
        ids = torch.randint(3, cfg.decoder.vocab_size, (1, prompt))
        latents = _encode_in_chunks(model, s.windows, per_chunk, frames)
        generate(model, ids, visual_latents=latents, max_new_tokens=new)
    e = estimate(cfg, s)
    assert 0.85 <= e.peak / trace.peak <= 1.15, (s.windows, e.peak, trace.peak, e.phase)
    if s.windows >= 240:   # a long video: what it holds is most of the peak, and the peak is in generation
        assert e.totals["visual_latents_and_cross_kv"] > e.totals["parameters"]
        assert not e.phase.startswith("encoding")


def test_longer_video_grows_by_its_latents_and_keys_values_only():
    cfg = VideoLlamaConfig.from_name("small", **{"preprocess.max_windows": 900})
    minute, hour = (estimate(cfg, _video_settings(cfg, sec, tokens=16)) for sec in (60, 3600))
    grown = hour.totals["generation_peak"] - minute.totals["generation_peak"]
    assert grown == hour.totals["visual_latents_and_cross_kv"] - minute.totals["visual_latents_and_cross_kv"]
    assert hour.totals["kv_cache"] == minute.totals["kv_cache"] and hour.totals["frame_chunk"] == minute.totals["frame_chunk"]


def test_cli_13b_hour_of_video(capsys):
    argv = ["plan", "--preset", "videollama-13b", "--mode", "infer", "--video-seconds", "3600", "--seq", "64"]
    assert cli_main(argv + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    t = out["totals"]
    assert t["video_windows"] == 900 and t["video_latents"] == 57_600
    assert t["visual_latents"] == 57_600 * 2560 * 2                   # [57,600, D_v] in bf16
    assert t["cross_attn_blocks"] == 6
    assert t["cross_attn_kv"] == 6 * 2 * 57_600 * 5120 * 2            # 6 blocks x (k, v) x [40, 57,600, 128]
    assert set(out["breakdown"]) == set(BREAKDOWN) and sum(out["breakdown"].values()) == out["peak_bytes"]
    assert out["breakdown"]["visual_latents_and_cross_kv"] == t["visual_latents"] + t["cross_attn_kv"]
    assert cli_main(argv) == 0
    text = capsys.readouterr().out
    assert "900 windows" in text and "57,600 latents" in text and "6 blocks x 1.1 GiB" in text
    assert "chunk of frames being encoded" in text


@pytest.mark.parametrize("argv,message", [
    (["--video-seconds", "60"], "--mode infer"),
    (["--mode", "infer", "--video-seconds", "0"], "--video-seconds must be > 0"),
    (["--mode", "infer", "--video-seconds", "nan"], "--video-seconds must be > 0"),
    (["--mode", "infer", "--video-seconds", "1e9"], "24 hours"),
    (["--mode", "infer", "--video-seconds", "60", "--windows-per-chunk", "0"], "--windows-per-chunk"),
])
def test_bad_video_arguments_are_one_line_errors(argv, message, capsys):
    assert cli_main(["plan", "--preset", "tiny", *argv]) != 0
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
