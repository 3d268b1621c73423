"""The whole-video sampling policy and its decoder, against PyAV's own frame times."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
import torch

from badvideos import encode_video
from videollama.config import PreprocessConfig
from videollama.data import windows as windows_mod
from videollama.data.errors import BadSample
from videollama.data.video import load_clip
from videollama.data.windows import load_windows, open_windows, sample_times, window_starts

PRE = PreprocessConfig(num_frames=4, fps=1.0, size=32, max_windows=160)


def level_frame(index: int, width: int, height: int) -> np.ndarray:
    """A flat frame whose gray level names it (0, 4, 8, ...): which frame was shown is readable."""
    return np.full((height, width, 3), (4 * index) % 256, dtype=np.uint8)


def frame_index(rgb: torch.Tensor) -> int:
    """The index a level_frame was drawn with, from its decoded (0..1) pixels."""
    return int(round(float(rgb.mean()) * 255 / 4))


def pyav_pts_seconds(data: bytes) -> list[float]:
    """Every frame's presentation time, as PyAV decodes the file (the independent reference)."""
    with av.open(io.BytesIO(data)) as c:
        s = c.streams.video[0]
        return [float((f.pts - s.start_time) * s.time_base) for f in c.decode(s)]


def test_the_policy_tiles_while_it_fits_and_spreads_when_it_does_not():
    assert window_starts(2.0, 4.0, 8) == [0.0]  # shorter than a window: one window at 0
    assert window_starts(8.0, 4.0, 8) == [0.0, 4.0]  # two windows exactly
    assert window_starts(10.0, 4.0, 8) == [0.0, 4.0, 6.0]  # the last moved back to end at the end
    assert window_starts(100.0, 4.0, 5) == [0.0, 24.0, 48.0, 72.0, 96.0]  # spread: 25 needed, 5 allowed
    assert window_starts(600.0, 4.0, 160) == [4.0 * k for k in range(150)]  # ten minutes of Shapes-Long
    assert window_starts(3600.0, 4.0, 900) == [4.0 * k for k in range(900)]  # an hour at the 13B preset
    starts = window_starts(3600.0, 4.0, 160)
    assert len(starts) == 160 and starts[0] == 0 and starts[-1] == 3596.0
    np.testing.assert_allclose(np.diff(starts), 3596.0 / 159)
    times = sample_times([0.0, 6.0], 4, 1.0)
    assert times.tolist() == [[0, 1, 2, 3], [6, 7, 8, 9]]


@pytest.mark.parametrize("gop", [10, 250])
def test_tiled_windows_show_the_frame_pyav_shows_at_each_time(gop):
    # 30 s at 10 FPS with an uneven start and a short or long keyframe interval.
    data = encode_video(width=48, height=32, num_frames=300, rate=10, gop=gop, frame_fn=level_frame)
    pts = pyav_pts_seconds(data)
    frames, times = load_windows(data, PRE, normalize=False)
    assert frames.shape == (8, 4, 3, 32, 32)  # 30 s = 7.5 windows: 8, the last moved back to 26 s
    starts = window_starts(30.0, 4.0, 160)
    assert times[:, 0].tolist() == starts
    for w in range(8):
        for i in range(4):
            t = float(times[w, i])
            expected = max(k for k, p in enumerate(pts) if p <= t + 1e-6)  # the frame on screen at t
            assert frame_index(frames[w, i]) == expected % 64, (w, i, t)


def test_one_window_equals_load_clip_and_every_window_equals_load_clip_at_its_start():
    data = encode_video(width=64, height=48, num_frames=130, rate=10, gop=25)
    frames, times = load_windows(data, PRE)
    for w, start in enumerate(window_starts(13.0, 4.0, 160)):
        clip, clip_times = load_clip(data, num_frames=4, fps=1.0, size=32, start=start, mean=PRE.mean, std=PRE.std)
        assert torch.equal(frames[w], clip) and torch.equal(times[w], clip_times)
    short = encode_video(width=64, height=48, num_frames=25, rate=10)  # 2.5 s: one window, samples past the end
    frames, times = load_windows(short, PRE)
    clip, clip_times = load_clip(short, num_frames=4, fps=1.0, size=32, mean=PRE.mean, std=PRE.std)
    assert frames.shape[0] == 1 and torch.equal(frames[0], clip) and torch.equal(times[0], clip_times)


def test_spread_windows_seek_and_give_what_a_sequential_pass_gives(monkeypatch):
    data = encode_video(width=48, height=32, num_frames=1200, rate=10, gop=20, frame_fn=level_frame)  # 120 s
    pre = PreprocessConfig(num_frames=4, fps=1.0, size=32, max_windows=6)  # 30 needed: spread 6
    decoded = []
    real = windows_mod.OpenedVideo.frames

    def counting(self, doing, *, start_pts=None):
        decoded.append(start_pts)
        return real(self, doing, start_pts=start_pts)

    monkeypatch.setattr(windows_mod.OpenedVideo, "frames", counting)
    with open_windows(data, pre, normalize=False) as whole:
        seeking = torch.cat([c.frames for c in whole.chunks(2)])
        work_seeking = whole.video.decoded
    assert len(decoded) == 6  # a seek before each window after the first
    monkeypatch.setattr(windows_mod, "_DEFAULT_KEYFRAME_INTERVAL_S", float("inf"))
    monkeypatch.setattr(windows_mod._SampleWalker, "_worth_a_seek", lambda self, done, pts: False)
    with open_windows(data, pre, normalize=False) as whole:
        sequential = torch.cat([c.frames for c in whole.chunks(2)])
        work_sequential = whole.video.decoded
    assert torch.equal(seeking, sequential)
    assert work_seeking < work_sequential / 4  # 6 windows of 4 s (plus a GOP each) vs all 120 s


def test_a_long_video_never_holds_all_its_frames_at_once(monkeypatch):
    data = encode_video(width=48, height=32, num_frames=600, rate=10, gop=25, frame_fn=level_frame)  # 60 s
    produced = []
    real_run = windows_mod._SampleWalker.run

    def run(self):
        for item in real_run(self):
            produced.append(item[0])
            yield item

    monkeypatch.setattr(windows_mod._SampleWalker, "run", run)
    with open_windows(data, PRE, normalize=False) as whole:
        assert whole.num_windows == 15
        held = []
        for chunk in whole.chunks(windows_per_chunk=2):
            held.append(len(produced) - 4 * chunk.first)  # samples decoded but not yet handed out
            assert chunk.frames.shape[0] <= 2
    assert max(held) <= 2 * 4 + 4  # a chunk's samples, and at most one window more
    assert len(produced) == 15 * 4


def test_hostile_declarations_are_refused_before_decoding():
    from badvideos import BAD_VIDEOS

    make, reason = BAD_VIDEOS["absurd_duration"] if "absurd_duration" in BAD_VIDEOS else (None, None)
    if make is not None:
        with pytest.raises(BadSample) as e:
            load_windows(make(), PRE)
        assert e.value.reason == reason
    with pytest.raises(BadSample, match="truncated|decod|container"):
        data = encode_video(width=48, height=32, num_frames=300, rate=10, gop=25)
        load_windows(data[: len(data) // 2], PRE)
