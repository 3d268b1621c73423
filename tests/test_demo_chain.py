"""The `make demo` chain at toy size: synth, web pool, tokenizer, curator, curate, pre-train on the
curated shards, fine-tune, eval, plot, generate.

Runs the demo's real stages (the `videollama` entry point, in this interpreter to save a
torch start-up per stage) on 32 clean training clips and 6 raw web uploads, with 5 steps for each
training run, then checks what the demo promises against the files the stages wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from videollama.data.tokenizer import normalize_answer
from videollama.demo import CORPUS_STAMP, DemoSettings, make_corpus, make_web_corpus, question_type, run_demo

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[DemoSettings, dict]:
    tmp = tmp_path_factory.mktemp("demo")
    settings = DemoSettings(
        data=str(tmp / "shapes"), out=str(tmp / "run"), train_clips=32, eval_clips=4, synth_workers=1,
        web=str(tmp / "web"), web_videos=6, curator_steps=5,
        curator_config=str(ROOT / "configs" / "demo-curator.yaml"),
        curate_config=str(ROOT / "configs" / "curate-web.yaml"),
        pretrain_config=str(ROOT / "configs" / "demo-pretrain.yaml"),
        finetune_config=str(ROOT / "configs" / "demo-finetune.yaml"),
        pretrain_steps=5, finetune_steps=5, eval_batch_size=16, caption_eval=True, in_process=True,
        train_overrides=("global_batch=4", "micro_batch=4", "data.num_workers=0", "log.tensorboard=false"),
    )
    return settings, run_demo(settings)


def test_demo_writes_model_report_and_predictions(demo):
    from videollama.model.videollama import VideoLlama

    s, report = demo
    out, data = Path(s.out), Path(s.data)
    questions = [json.loads(line) for line in (data / "eval" / "videoqa.jsonl").read_text().splitlines()]
    assert report["n_questions"] == len(questions) > 0
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))

    # The report's accuracy is what the saved predictions say, rescored here independently.
    preds = [json.loads(line) for line in (out / "eval-videoqa" / "predictions.jsonl").read_text().splitlines()]
    assert [p["question"] for p in preds] == [q["question"] for q in questions]
    correct = [normalize_answer(p["prediction"]) == normalize_answer(q["answer"]) for p, q in zip(preds, questions)]
    assert report["accuracy"] == pytest.approx(sum(correct) / len(correct))
    for kind in ("static", "temporal"):
        hits = [c for c, q in zip(correct, questions) if q["kind"] == kind]
        assert report["accuracy_by_kind"][kind] == pytest.approx(sum(hits) / len(hits))
    num_frames = json.loads((out / "model" / "config.json").read_text())["preprocess"]["num_frames"]
    # Each clip is seen whole (issue 21; it was one centred window before): a 5 s Shapes clip is two
    # windows of num_frames frames, 0-4 s and 1-5 s, exactly the frames load_windows gives.
    assert all([len(w) for w in p["timestamps"]] == [num_frames, num_frames] for p in preds)
    from videollama.data.windows import load_windows

    _, times = load_windows(data / "eval" / preds[0]["video"], VideoLlama.from_pretrained(out / "model").config.preprocess)
    assert preds[0]["timestamps"] == [[round(float(t), 4) for t in w] for w in times]

    # The ablation really saw one frame: the same time in every frame of both windows.
    single = [json.loads(line) for line in (out / "eval-videoqa-1frame" / "predictions.jsonl").read_text().splitlines()]
    assert all(len(p["timestamps"]) == 2 and len({t for w in p["timestamps"] for t in w}) == 1 for p in single)
    assert set(report["single_frame_accuracy_by_kind"]) == {"static", "temporal"}

    # Caption metrics, curves, timings, examples.
    assert set(report["caption_metrics"]) >= {"BLEU-4", "ROUGE-L", "CIDEr"}
    assert (out / "pretrain-curves.png").stat().st_size > 0 and (out / "finetune-curves.png").stat().st_size > 0
    assert report["training"]["pretrain"]["steps"] == 5 and report["training"]["finetune"]["steps"] == 5
    assert report["training"]["pretrain"]["clips_per_s"] > 0
    assert {"corpus", "web_corpus", "tokenizer", "curator", "curate", "pretrain", "finetune", "eval_videoqa",
            "total"} <= set(report["timings_s"])
    assert [e["kind"] for e in report["examples"]] == ["temporal", "static"]

    # Fine-tuning started from the pre-trained model and moved it; both load as model directories.
    pre = VideoLlama.from_pretrained(out / "pretrain-model").state_dict()
    final = VideoLlama.from_pretrained(out / "model").state_dict()
    assert pre.keys() == final.keys()
    assert any(not torch.equal(pre[k], final[k]) for k in pre)
    assert (out / "model" / "tokenizer.json").read_text() == (data / "tokenizer.json").read_text()


def _shard_keys(folder: Path) -> list[str]:
    import tarfile

    keys = []
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as t:
            keys += [m.name.rsplit(".", 1)[0] for m in t if m.name.endswith(".json")]
    return keys


def test_demo_curates_the_web_pool_and_pretrains_on_what_it_kept(demo):
    from videollama.curate.output import read_table

    s, report = demo
    out, web = Path(s.out), Path(s.web)
    truth = json.loads((web / "truth.json").read_text())
    c = report["curation"]
    stats = json.loads((out / "curated" / "stats.json").read_text())
    rows = read_table(out / "curated" / "clips.parquet")
    # The curator is a model directory, bootstrapped on the clean captions and the raw web pairs.
    assert (out / "curator" / "config.json").is_file() and c["curator"] == str(out / "curator")
    curator_cfg = json.loads((out / "curator-run" / "train_config.json").read_text())
    assert curator_cfg["data"]["sources"] == [str(Path(s.data) / "train"), str(web / "raw-shards")]
    raw = [json.loads(line) for line in (web / "raw-pairs.jsonl").read_text().splitlines()]
    manifest = [json.loads(line) for line in (web / "manifest.jsonl").read_text().splitlines()]
    assert [r["captions"] for r in raw] == [m["texts"] for m in manifest if m["texts"]]
    # The report's counts are the run's; one clip per scene of every readable upload; the kept
    # clips are exactly what the pre-training read (its data source is the curated shards).
    assert c["counts"] == stats["counts"] and c["counts"]["sources"] == len(manifest) == s.web_videos
    assert len(rows) == sum(len(v["scenes"]) for v in truth["videos"].values() if not v["corrupt"])
    assert sorted(_shard_keys(out / "curated" / "shards")) == sorted(r["clip_id"] for r in rows if r["kept"])
    assert c["counts"]["kept"] == sum(r["kept"] for r in rows) > 0
    pre_cfg = json.loads((out / "pretrain" / "train_config.json").read_text())
    assert pre_cfg["data"]["sources"] == [str(out / "curated" / "shards")]
    assert c["filter"] == {"metric": "pmi_marginal_span", "threshold": stats["threshold"], "pmi_prior": "marginal",
                           "pmi_reduce": "max_span"}
    assert set(c["targets_met"]) >= {"caption_precision", "caption_recall", "duplicate_recall", "generated_equal"}
    assert (out / "curator-run-curves.png").stat().st_size > 0
    assert report["training"]["curator"]["steps"] == 5


def test_web_pool_is_kept_when_parameters_match_and_rebuilt_otherwise(demo, tmp_path):
    s, _ = demo
    video = next((Path(s.web) / "videos").glob("*.mp4"))
    before = video.stat().st_mtime_ns
    assert make_web_corpus(s) is False and video.stat().st_mtime_ns == before
    other = DemoSettings(web=str(tmp_path / "web"), web_videos=3, synth_workers=1, in_process=True)
    assert make_web_corpus(other) is True
    (tmp_path / "web" / "videos" / "stale.mp4").write_bytes(b"old")
    assert make_web_corpus(DemoSettings(**{**other.__dict__, "web_videos": 2})) is True
    assert sorted(p.name for p in (tmp_path / "web" / "videos").iterdir()) == ["web-000000.mp4", "web-000001.mp4"]


def test_corpus_is_kept_when_parameters_match_and_rebuilt_otherwise(demo, tmp_path):
    s, _ = demo
    shard = next((Path(s.data) / "train").glob("*.tar"))
    before = shard.stat().st_mtime_ns
    assert make_corpus(s) is False
    assert shard.stat().st_mtime_ns == before

    other = DemoSettings(data=str(tmp_path / "shapes"), train_clips=4, eval_clips=2, synth_workers=1, in_process=True)
    assert make_corpus(other) is True
    stamp = json.loads((tmp_path / "shapes" / CORPUS_STAMP).read_text())
    assert stamp["train"] == 4 and stamp["eval"] == 2
    changed = DemoSettings(**{**other.__dict__, "train_clips": 3})
    assert make_corpus(changed) is True
    tars = list((tmp_path / "shapes" / "train").glob("*.tar"))
    import tarfile

    with tarfile.open(tars[0]) as tar:
        assert sum(m.name.endswith(".mp4") for m in tar) == 3  # replaced, not mixed with the old corpus


def test_question_types_cover_every_shapes_template(demo):
    s, _ = demo
    rows = [json.loads(line) for line in (Path(s.data) / "eval" / "videoqa.jsonl").read_text().splitlines()]
    kinds = {"color": "static", "shape": "static", "count": "static", "direction": "temporal",
             "which_object": "temporal"}
    for row in rows:
        assert kinds[question_type(row["question"])] == row["kind"]


def test_shapes_preset_starts_with_open_gates_in_both_init_paths():
    """The demo's preset opens its gates; the meta-device init (the GPU default) must agree."""
    from videollama.config import VideoLlamaConfig
    from videollama.model.videollama import VideoLlama
    from videollama.train.loop import materialize

    cfg = VideoLlamaConfig.from_name("shapes")
    fresh = dict(VideoLlama(cfg).named_parameters())
    with torch.device("meta"):
        meta_built = VideoLlama(cfg)
    materialize(meta_built, torch.device("cpu"), seed=0)
    gates = [n for n in fresh if n.endswith("gate")]
    assert len(gates) == 7
    for name, p in meta_built.named_parameters():
        if name in gates:
            assert p.item() == fresh[name].item() == 1.0, name
    tiny = VideoLlama(VideoLlamaConfig.from_name("tiny"))
    assert all(float(p) == 0.0 for n, p in tiny.named_parameters() if n.endswith("gate"))


def test_curation_only_with_an_existing_curator(demo, tmp_path):
    """--curator DIR --curation-only: no bootstrap, the given model scores and captions, and the
    demo stops after the curation figures."""
    s, first = demo
    settings = DemoSettings(**{**s.__dict__, "out": str(tmp_path / "run"), "curator": str(Path(s.out) / "curator"),
                               "curation_only": True})
    report = run_demo(settings)
    assert "curator" not in report["timings_s"] and {"curate", "total"} <= set(report["timings_s"])
    assert not (tmp_path / "run" / "curator-run").exists() and not (tmp_path / "run" / "pretrain").exists()
    assert report["curation"]["curator"] == str(Path(s.out) / "curator")
    assert report["curation"]["counts"] == first["curation"]["counts"]  # the same model on the same pool
    assert json.loads((tmp_path / "run" / "report.json").read_text()) == json.loads(json.dumps(report))
