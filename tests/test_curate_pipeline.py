"""``videollama curate`` end to end on a small raw web Shapes corpus, checked against its truth.json:
one clip per scene, corrupt files skipped and counted, re-uploads marked as duplicates of their
source, slideshows dropped as static, shards in the training format; the Ray engine gives the
same table and shards as the local pool; a run killed with SIGKILL and run again gives the same
output as an uninterrupted run without redoing the finished videos.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from videollama.curate.config import load_config
from videollama.curate.output import read_table
from videollama.curate.pipeline import curate

ROOT = Path(__file__).resolve().parent.parent
WEB = dict(videos=8, min_scenes=2, max_scenes=2, min_scene_s=2.0, max_scene_s=2.4, reupload_share=0.25,
           corrupt_share=0.25, slideshow_share=0.125, seed=3)
# threshold 0 on the mean: the tiny random scorer's PMIs are near 0, so that some texts pass and
# some do not. The marginal prior (3 reference clips) is what configs/curate-web.yaml thresholds.
OVERRIDES = ["workers=2", "scorer.batch_size=3", "captioner.batch_size=2", "captioner.max_new_tokens=4",
             "filter.threshold=0.0", "scorer.reference_clips=3", "filter.pmi_prior=marginal",
             "filter.pmi_reduce=mean"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from videollama.data.shapes_web import WebConfig, synthesize_web

    path = tmp_path_factory.mktemp("web")
    synthesize_web(path, WebConfig(**WEB))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random VideoLlama with a tokenizer: scorer and captioner (its scores are noise, but
    deterministic: enough to exercise every stage and compare engines and runs)."""
    import torch

    from videollama.config import VideoLlamaConfig
    from videollama.data.tokenizer import train_tokenizer
    from videollama.model.videollama import VideoLlama

    path = tmp_path_factory.mktemp("model")
    cfg = VideoLlamaConfig.from_name("tiny").with_overrides({
        "preprocess.num_frames": 2, "preprocess.fps": 1.0, "preprocess.size": 32, "vision.image_size": 32,
        "vision.max_frames": 2, "vision.gate_init": 1.0, "decoder.cross_attn_gate_init": 1.0})
    torch.manual_seed(0)
    VideoLlama(cfg).save_pretrained(path, tokenizer=train_tokenizer(["a red square moves left."] * 4, 300))
    return path


def _config(model_dir, *extra):
    return load_config(ROOT / "configs" / "curate-web.yaml",
                       [*OVERRIDES, f"scorer.model={model_dir}", f"captioner.model={model_dir}", *extra])


@pytest.fixture(scope="module")
def local_run(corpus, model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    stats = curate(corpus / "manifest.jsonl", out, _config(model_dir))
    return out, stats


def _shard_members(out: Path) -> dict[str, bytes]:
    members = {}
    for shard in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for info in tar.getmembers():
                members[info.name] = tar.extractfile(info).read()
    return members


@pytest.mark.usefixtures("no_hang")
def test_local_run_against_the_corpus_truth(corpus, local_run):
    out, stats = local_run
    truth = json.loads((corpus / "truth.json").read_text())
    rows = read_table(out / "clips.parquet")
    assert [r["clip_id"] for r in rows] == sorted(r["clip_id"] for r in rows)
    # Corrupt files: each skipped with the reason the corpus says, and counted.
    assert stats["corrupt"] == {reason: list(truth["corrupt"].values()).count(reason)
                                for reason in set(truth["corrupt"].values())}
    assert set(stats["skipped_sources"]) == set(truth["corrupt"])
    # One clip per scene of every readable video, at the scene's times (to the frame).
    expected = sorted((vid, round(s["start_s"], 2), round(s["end_s"], 2)) for vid, v in truth["videos"].items()
                      if not v["corrupt"] for s in v["scenes"])
    got = sorted((r["source_id"], round(r["start_s"], 2), round(r["end_s"], 2)) for r in rows)
    assert got == expected
    # Slideshow scenes are dropped as static; nothing moving is.
    static = {(vid, round(s["start_s"], 2)) for vid, v in truth["videos"].items() for s in v["scenes"] if s["static"]}
    for r in rows:
        assert (r["drop_reason"] == "static") == ((r["source_id"], round(r["start_s"], 2)) in static), r
    # Re-uploads: of the clips of a duplicate group still in the running at dedup (not dropped for
    # another reason first), the one kept has the best score of its caption under the run's metric
    # (rounded to dedup.score_step, 0.1; a generated caption has none: lowest), then the most
    # pixels, then the longest duration, then the first clip id; all the others are duplicates of it.
    by_scene = {(r["source_id"], round(r["start_s"], 2)): r for r in rows}
    scene_start = {(vid, j): round(s["start_s"], 2) for vid, v in truth["videos"].items()
                   for j, s in enumerate(v["scenes"])}

    def preference(r):
        caption_score = [s[stats["metric"]] for s in r["scores"] if s["text"] == r["caption"]]
        score = caption_score[0] if r["caption_source"] == "input" and caption_score[0] is not None else -math.inf
        score = round(score / 0.1) * 0.1 if math.isfinite(score) else score
        return score, r["width"] * r["height"], r["duration_s"]

    duplicates = {}
    for group in truth["duplicate_groups"]:
        members = [by_scene[(m["video"], scene_start[(m["video"], m["scene"])])] for m in group]
        live = sorted((r for r in members if r["drop_reason"] in (None, "duplicate")), key=lambda r: r["clip_id"])
        if live:
            kept = max(live, key=preference)  # the first of equals: ties go to the first clip id
            duplicates.update({r["clip_id"]: kept["clip_id"] for r in live if r is not kept})
    assert duplicates, "the corpus must hold a re-upload of a moving scene"
    assert {r["clip_id"]: r["duplicate_of"] for r in rows if r["duplicate_of"]} == duplicates
    # Every clip left is kept, with a caption from its texts or generated: a text captions a clip
    # when it passes the threshold there and scores no higher on another clip of its video
    # (filter.assign: best_clip); the best such text wins.
    threshold, col = stats["threshold"], stats["metric"]
    assert stats["assign"] == "best_clip" and col == "pmi_marginal"
    scored = [r for r in rows if r["drop_reason"] not in ("static", "too_short", "low_resolution")]
    # Both priors are in the table; the reference set is 3 evenly spaced clips of the scored ones.
    assert all(s["pmi"] is not None and s[col] is not None and s["pmi_marginal_span"] is not None
               for r in scored for s in r["scores"])
    assert stats["reference_clips"] == [sorted(r["clip_id"] for r in scored)[(i * len(scored)) // 3]
                                        for i in range(3)]

    def fits_here(r, s):
        others = [o for o in scored if o["source_id"] == r["source_id"] and o["clip_id"] != r["clip_id"]]
        return s[col] >= threshold and all(
            t[col] < s[col] or (t[col] == s[col] and o["clip_id"] > r["clip_id"])
            for o in others for t in o["scores"] if t["text"] == s["text"])

    for r in rows:
        assert r["kept"] == (r["drop_reason"] is None)
        if r in scored:
            fitting = [s for s in r["scores"] if fits_here(r, s)]
            if fitting:
                assert r["caption_source"] == "input" and r["caption"] == max(fitting, key=lambda s: s[col])["text"]
            else:
                assert r["caption_source"] == "generated" or r["drop_reason"] == "empty_caption"
    assert {r["caption_source"] for r in rows if r["kept"]} == {"input", "generated"}
    # Shards: KEY.mp4 + KEY.json of every kept clip, in the training format.
    members = _shard_members(out)
    kept = [r for r in rows if r["kept"]]
    assert sorted(members) == sorted([f"{r['clip_id']}.mp4" for r in kept] + [f"{r['clip_id']}.json" for r in kept])
    from videollama.data.video import load_clip

    for r in kept:
        meta = json.loads(members[f"{r['clip_id']}.json"])
        assert meta["caption"] == r["caption"] and meta["source"] == r["source_id"]
        assert meta["start_s"] == r["start_s"] and [t["text"] for t in meta["texts"]] == r["texts"]
        frames, _ = load_clip(members[f"{r['clip_id']}.mp4"], num_frames=2, fps=1.0, size=32)
        assert frames.shape == (2, 3, 32, 32)
    assert stats["counts"]["kept"] == len(kept) and (out / "stats.png").stat().st_size > 0
    assert json.loads((out / "stats.json").read_text())["counts"] == stats["counts"]


@pytest.mark.usefixtures("no_hang")
def test_every_bad_video_is_skipped_and_counted(tmp_path):
    from badvideos import BAD_VIDEOS
    from helpers import good_video

    folder = tmp_path / "in"
    folder.mkdir()
    expected: dict[str, int] = {}
    for name, (make, reason) in BAD_VIDEOS.items():
        (folder / f"bad_{name}.mp4").write_bytes(make())
        if name != "too_many_frames":  # bad for a 4 s window of load_clip, but a readable whole video
            expected[reason] = expected.get(reason, 0) + 1
    for i in range(2):
        (folder / f"good{i}.mp4").write_bytes(good_video(i) * 1)
        (folder / f"good{i}.txt").write_text("a pattern")
    cfg = load_config(None, ["workers=2", "scenes.min_clip_s=0.5", "filter.min_duration_s=0.5", "filter.min_width=16",
                             "filter.min_height=16", "filter.min_motion=0", "dedup.enabled=false"])
    stats = curate(folder, tmp_path / "out", cfg)
    assert stats["corrupt"] == dict(sorted(expected.items()))
    assert stats["counts"]["sources"] == len(BAD_VIDEOS) + 2 and stats["counts"]["sources_ok"] == 3
    rows = read_table(tmp_path / "out" / "clips.parquet")
    # (too_many_frames's gray ramp wraps every 0.32 s: hard cuts, so scenes too short for a clip)
    assert sorted({r["source_id"] for r in rows}) == ["good0", "good1"]
    assert all(r["kept"] for r in rows)


RAY_DRIVER = r"""
import sys
import ray
from videollama.curate.config import load_config
from videollama.curate.pipeline import curate
ray.init(num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False)
try:
    curate(sys.argv[1], sys.argv[2], load_config(sys.argv[3], sys.argv[4:]))
finally:
    ray.shutdown()
"""


@pytest.mark.slow
def test_ray_engine_gives_the_same_table_and_shards(corpus, model_dir, local_run, tmp_path):
    """The Ray driver runs in its own interpreter: Ray's state (and the memory its libraries take)
    never enters this test process."""
    pytest.importorskip("ray")
    local_out, local_stats = local_run
    out = tmp_path / "ray"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    overrides = [*OVERRIDES, f"scorer.model={model_dir}", f"captioner.model={model_dir}", "engine=ray"]
    result = subprocess.run([sys.executable, "-c", RAY_DRIVER, str(corpus / "manifest.jsonl"), str(out),
                             str(ROOT / "configs" / "curate-web.yaml"), *overrides],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["engine"] == "ray" and stats["resumed_videos"] == 0
    assert read_table(out / "clips.parquet") == read_table(local_out / "clips.parquet")
    assert _shard_members(out) == _shard_members(local_out)
    assert stats["counts"] == local_stats["counts"] and stats["corrupt"] == local_stats["corrupt"]


@pytest.mark.slow
def test_kill_9_then_the_same_command_finishes_with_the_same_output(corpus, model_dir, local_run, tmp_path):
    local_out, _ = local_run
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "videollama.cli", "curate", "--input", str(corpus / "manifest.jsonl"),
               "--out", str(out), "--config", str(ROOT / "configs" / "curate-web.yaml"),
               "--scorer", str(model_dir), "--captioner", str(model_dir), *OVERRIDES, "workers=1"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    records = out / ".work" / "videos"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list(records.glob("*.json"))) < 2 and process.poll() is None:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # the CLI and its pool workers, mid-run
    process.wait()
    done = {p.stem for p in records.glob("*.json")}
    assert 2 <= len(done) < 8, "the kill must land after some videos finished and before all did"
    assert not (out / "clips.parquet").exists()

    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["resumed_videos"] >= len(done)
    assert read_table(out / "clips.parquet") == read_table(local_out / "clips.parquet")
    assert _shard_members(out) == _shard_members(local_out)
    # A third run redoes nothing: every video and batch has its record.
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["resumed_videos"] == WEB["videos"] and all(n > 0 for n in stats["resumed_batches"].values())
    assert read_table(out / "clips.parquet") == read_table(local_out / "clips.parquet")


@pytest.mark.usefixtures("no_hang")
def test_a_changed_config_is_not_resumed_into_old_records(corpus, tmp_path):
    with pytest.raises(ValueError, match="filter.metric pmi needs --scorer"):
        curate(corpus / "manifest.jsonl", tmp_path / "out", load_config(ROOT / "configs" / "curate-web.yaml"))
    cfg = load_config(ROOT / "configs" / "curate-web.yaml", ["workers=1", "dedup.enabled=false", "filter.metric=auto"])
    subset = corpus / "one.jsonl"
    subset.write_text((corpus / "manifest.jsonl").read_text().splitlines()[0] + "\n")
    curate(subset, tmp_path / "out", cfg)
    with pytest.raises(ValueError, match="other input or settings"):
        curate(subset, tmp_path / "out", load_config(ROOT / "configs" / "curate-web.yaml",
                                                       ["filter.metric=auto", "filter.threshold=1"]))


@pytest.mark.usefixtures("no_hang")
def test_a_run_cut_during_the_model_stages_resumes_them_batch_by_batch(corpus, model_dir, local_run, tmp_path):
    """What a kill in the middle of a model stage leaves: some batch records, a half-written temp
    file, no outputs. The rerun redoes only the missing batches and videos and ends identical."""
    import shutil

    local_out, local_stats = local_run
    out = tmp_path / "cut"
    shutil.copytree(local_out, out)
    for name in ("clips.parquet", "stats.json", "stats.png"):
        (out / name).unlink()
    shutil.rmtree(out / "shards")
    pmi = sorted((out / ".work" / "pmi").glob("*.json"))
    captions = sorted((out / ".work" / "caption").glob("*.json"))
    videos = sorted((out / ".work" / "videos").glob("*.json"))
    assert len(pmi) >= 3 and len(captions) >= 2
    for record in [pmi[-1], pmi[-2], captions[-1], videos[-1]]:
        record.unlink()
    (out / ".work" / "pmi" / f".{pmi[-1].name}.123.tmp").write_bytes(b'{"clip_ids": ["half')
    stats = curate(corpus / "manifest.jsonl", out, _config(model_dir))
    assert stats["resumed_videos"] == len(videos) - 1
    assert stats["resumed_batches"] == {"pmi": len(pmi) - 2, "caption": len(captions) - 1}
    assert read_table(out / "clips.parquet") == read_table(local_out / "clips.parquet")
    assert _shard_members(out) == _shard_members(local_out)
