"""The raw "web" Shapes corpus (data/shapes_web.py): its files say what truth.json says.

Checked against independent references: PyAV decodes every file (frame count, size), the clean
Shapes renderer (shapes.render_frames) draws what each scene's first frame must show, and a
re-upload's frames are compared with its source's frames after decoding both.
"""

from __future__ import annotations

import json

import av
import numpy as np
import pytest

from videollama.cli import main
from videollama.data import shapes
from videollama.data.shapes_web import CORRUPTIONS, WebConfig, plan_corpus, synthesize_web

# 12 videos: 5 corrupt (one per corruption), 2 re-uploads, 2 slideshows, 3 originals.
SMALL = WebConfig(videos=12, min_scenes=2, max_scenes=3, min_scene_s=1.0, max_scene_s=2.0,
                  corrupt_share=5 / 12, reupload_share=2 / 12, slideshow_share=2 / 12, seed=3)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("web")
    synthesize_web(out, SMALL)
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    return out, manifest, json.loads((out / "truth.json").read_text())


def decode(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_plan_is_deterministic_and_follows_the_config():
    a, b = plan_corpus(SMALL), plan_corpus(SMALL)
    assert [p["texts"] for p in a] == [p["texts"] for p in b]
    assert [[s["spec"] for s in p["scenes"]] for p in a] == [[s["spec"] for s in p["scenes"]] for p in b]
    other = plan_corpus(WebConfig(**{**SMALL.__dict__, "seed": 4}))
    assert [p["texts"] for p in other] != [p["texts"] for p in a]
    roles = [p["role"] for p in a]
    assert (roles.count("corrupt"), roles.count("reupload"), roles.count("slideshow")) == (5, 2, 2)
    assert sorted(p["corrupt"]["kind"] for p in a if p["corrupt"]) == sorted(CORRUPTIONS)
    for plan in a:
        if plan["role"] != "reupload":
            assert SMALL.min_scenes <= len(plan["scenes"]) <= SMALL.max_scenes
        for scene in plan["scenes"]:
            assert SMALL.min_scene_s * shapes.FPS <= scene["frames"] <= SMALL.max_scene_s * shapes.FPS
    with pytest.raises(ValueError, match="scene lengths"):
        plan_corpus(WebConfig(max_scene_s=6.0))


def test_manifest_and_truth_agree(corpus):
    out, manifest, truth = corpus
    assert [m["id"] for m in manifest] == sorted(truth["videos"])
    for line in manifest:
        video = truth["videos"][line["id"]]
        assert line["video"] == video["video"] and (out / line["video"]).is_file()
        assert line["texts"] == [t["text"] for t in video["texts"]]
        assert set(line) == {"id", "video", "texts", "source"}  # no truth leaks into the manifest
        scenes = video["scenes"]
        assert scenes[0]["start_frame"] == 0 and scenes[-1]["end_frame"] == video["num_frames"]
        assert all(a["end_frame"] == b["start_frame"] for a, b in zip(scenes, scenes[1:]))
        assert video["cut_frames"] == [s["start_frame"] for s in scenes[1:]]
        assert video["cuts_s"] == pytest.approx([f / shapes.FPS for f in video["cut_frames"]])
        captions = [s["caption"] for s in scenes]
        for text in video["texts"]:
            if text["correct"]:
                assert captions[text["scene"]].removesuffix(".") in text["text"]
            else:
                assert text["text"] not in captions
            if text["kind"] == "other_video":
                source = truth["videos"][text["from"]["video"]]
                assert text["text"] == source["scenes"][text["from"]["scene"]]["caption"]
        if video["role"] == "slideshow":
            assert all(s["static"] for s in scenes)


def test_files_decode_to_the_planned_scenes(corpus):
    """Frame count and size by PyAV; each scene's first frame is the clean renderer's frame 0."""
    out, _, truth = corpus
    for vid, video in truth["videos"].items():
        if video["corrupt"]:
            continue
        frames = decode(out / video["video"])
        assert frames.shape == (video["num_frames"], video["height"], video["width"], 3), vid
        if (video["width"], video["height"]) != (shapes.WIDTH, shapes.HEIGHT):
            continue
        for scene in video["scenes"]:
            clean = shapes.render_frames(shapes.ClipSpec.from_dict(scene["spec"]))[0]
            error = np.abs(frames[scene["start_frame"]].astype(int) - clean).mean()
            assert error < 2.0, (vid, scene["start_frame"], error)


def _small(frame: np.ndarray) -> np.ndarray:
    """A decoded frame scaled to 160x120 RGB (int), to compare videos of different sizes."""
    rgb = av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(width=160, height=120, format="rgb24")
    return rgb.to_ndarray().astype(int)


def test_reuploads_are_the_same_scenes_at_another_size_and_bitrate(corpus):
    out, _, truth = corpus
    assert truth["duplicate_groups"]
    for group in truth["duplicate_groups"]:
        assert len(group) >= 2
        videos = [truth["videos"][m["video"]] for m in group]
        assert len({(v["width"], v["height"], v["crf"]) for v in videos}) > 1
        frames = [_small(decode(out / v["video"])[v["scenes"][m["scene"]]["start_frame"] + 3])
                  for m, v in zip(group, videos)]
        for other in frames[1:]:
            assert np.abs(other - frames[0]).mean() < 4.0
        # ... while the scene before it in the source (another spec) looks different.
        source, index = videos[0], group[0]["scene"]
        if index > 0:
            before = _small(decode(out / source["video"])[source["scenes"][index - 1]["start_frame"] + 3])
            assert np.abs(before - frames[0]).mean() > np.abs(frames[1] - frames[0]).mean()


def test_cli_writes_the_corpus(tmp_path, capsys):
    out = tmp_path / "web"
    assert main(["data", "web", "--out", str(out), "--videos", "3", "--scenes", "2", "2",
                 "--scene-seconds", "1", "1", "--corrupt-share", "0", "--reupload-share", "0"]) == 0
    assert "wrote 3 raw videos (6 scenes, 150 frames, 0 corrupt)" in capsys.readouterr().out
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 3
    assert main(["data", "web", "--out", str(out), "--scenes", "3", "2"]) == 2
