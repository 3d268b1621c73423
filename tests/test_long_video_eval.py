"""``videollama eval`` on whole long videos: Shapes-Long's needle grid and whole-video split, a tiny
random model.

- VideoQA on the needle grid: every video seen under the model's policy (the frames the
  predictions list are ``load_windows``'s), accuracy by duration and depth, and the V-NIAH table
  and heatmap, checked against a count made here from predictions.jsonl with the question forms
  docs/SHAPES.md names (after some answers are set to what the model says, so that cells differ);
- grounding end to end: metrics.json equals ``eval/grounding.py`` on the saved predictions, and
  with known answers, equals IoUs worked out by hand;
- grounding lines read by data/evalset.py's rules (bad lines counted).
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from test_eval_harness import WORDS, _write_clip
from videollama.config import VideoLlamaConfig
from videollama.data.evalset import read_eval_set
from videollama.data.shapes_long_synth import TrainDurations, synthesize_long
from videollama.data.tokenizer import load_tokenizer, normalize_answer, train_tokenizer
from videollama.data.windows import load_windows
from videollama.eval.grounding import grounding_metrics, parse_time_range
from videollama.eval.harness import evaluate
from videollama.inference import generate as inference_generate
from videollama.model.videollama import VideoLlama

LONG_WORDS = "yellow purple white moves first last seconds from to when does 0 1 2 3 4 5 6 7 8 9 ."
DIRECTIONS = {"left", "right", "up", "down"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Shapes-Long at 20 and 40 s (the tiny preset's policy: 5 tiled windows, and 8 spread over
    40 s), needle depths 0 and 1, and a tiny random model that speaks words."""
    root = tmp_path_factory.mktemp("long")
    synthesize_long(root / "shapes-long", train=0, durations=TrainDurations("20:40"), eval_durations=[20, 40],
                    depths=[0.0, 1.0], per_cell=1, per_duration=1, seed=0)
    torch.manual_seed(0)
    config = VideoLlamaConfig.from_name("tiny")
    model = VideoLlama(config).eval()
    tokenizer = train_tokenizer([WORDS + " " + LONG_WORDS] * 20, vocab_size=config.decoder.vocab_size)
    with torch.no_grad():  # no ids past the trained vocabulary, no special tokens but EOS
        model.lm_head.weight[tokenizer.get_vocab_size():] = 0
        model.lm_head.weight[[0, 1, 3, 4, 5, 6]] = 0
    model.save_pretrained(root / "model")
    tokenizer.save(str(root / "model" / "tokenizer.json"))
    return root / "shapes-long" / "eval", root / "model"


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _is_needle(record) -> bool:
    """The needle questions SHAPES.md counts: which object moves D? / which way does the mover move?"""
    question = record["question"]
    return question.startswith("which object moves ") or (
        question.startswith("which way does ") and normalize_answer(record["answer"]) in DIRECTIONS)


def test_needle_grid_whole_videos_niah_table_and_heatmap(corpus, tmp_path):
    eval_dir, model_dir = corpus
    model, tokenizer = VideoLlama.from_pretrained(model_dir).eval(), load_tokenizer(model_dir)
    needle = eval_dir / "needle"
    first = evaluate(model, tokenizer, "videoqa", needle / "videoqa.jsonl", None, tmp_path / "first",
                     batch_size=8, max_new_tokens=3, progress=False)
    assert first["n"] > 8 and first["skipped"] == 0
    # Every answer about a depth-0 video becomes what the model said: those cells score 1 (a
    # mover's "which way" whose answer is no longer a direction drops out of the needle count).
    items = _read_jsonl(needle / "videoqa.jsonl")
    for item, pred in zip(items, _read_jsonl(tmp_path / "first" / "predictions.jsonl")):
        if item["depth"] == 0 and pred["prediction"]:
            item["answer"] = pred["prediction"]
    data = tmp_path / "answered.jsonl"
    data.write_text("".join(json.dumps(it) + "\n" for it in items))
    out = tmp_path / "second"
    metrics = evaluate(model, tokenizer, "videoqa", data, needle, out, batch_size=8, max_new_tokens=3,
                       progress=False)
    preds = _read_jsonl(out / "predictions.jsonl")

    # Whole videos under the policy: 20 s is 5 tiled 4 s windows, 40 s is 8 spread over it (the
    # tiny preset's max_windows), exactly the frames load_windows decodes.
    windows_seen = {}
    for p in preds:
        if p["video"] not in windows_seen:
            _, times = load_windows(needle / p["video"], model.config.preprocess)
            assert p["timestamps"] == [[round(float(t), 4) for t in window] for window in times]
            windows_seen[p["video"]] = (p["duration_s"], len(times))
    assert sorted(set(windows_seen.values())) == [(20, 5), (40, 8)]

    # Accuracy by duration and by depth: counted here.
    for field, keys in (("duration_s", ["20", "40"]), ("depth", ["0", "1"])):
        assert list(metrics[f"by_{field}"]) == keys
        for key in keys:
            group = [p for p in preds if float(p[field]) == float(key)]
            assert metrics[f"by_{field}"][key]["accuracy"] == pytest.approx(sum(p["correct"] for p in group) / len(group))
            assert metrics[f"by_{field}"][key]["n"] == len(group)

    # The V-NIAH table: rows are depths, columns durations, each cell the needle questions' accuracy.
    table = metrics["niah"]
    assert table["depths"] == ["0", "1"] and table["durations"] == ["20", "40"]
    expected = []
    for depth in (0.0, 1.0):
        row = []
        for duration in (20, 40):
            cell = [p for p in preds if p["depth"] == depth and p["duration_s"] == duration and _is_needle(p)]
            row.append(sum(normalize_answer(p["prediction"]) == normalize_answer(p["answer"]) for p in cell) / len(cell))
        expected.append(row)
    assert table["accuracy"] == expected  # ratios of small counts, computed alike: exactly equal
    assert table["accuracy"][0] == [1.0, 1.0]  # the depth-0 answers are what the model says
    assert table["mean"] == pytest.approx(sum(map(sum, expected)) / 4) and table["cells"] == 4
    assert table["questions"] == sum(_is_needle(p) for p in preds)
    png = (out / "niah.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    assert json.loads((out / "metrics.json").read_text()) == metrics


def test_whole_split_accuracy_by_duration_without_a_niah_table(corpus, tmp_path):
    eval_dir, model_dir = corpus
    model, tokenizer = VideoLlama.from_pretrained(model_dir).eval(), load_tokenizer(model_dir)
    metrics = evaluate(model, tokenizer, "videoqa", eval_dir / "whole" / "videoqa.jsonl", None, tmp_path,
                       batch_size=8, max_new_tokens=3, progress=False)
    preds = _read_jsonl(tmp_path / "predictions.jsonl")
    assert set(metrics["accuracy_by_kind"]) <= {"needle", "order", "count"} and "count" in metrics["accuracy_by_kind"]
    assert list(metrics["by_duration_s"]) == ["20", "40"] and "by_depth" not in metrics
    for key in ("20", "40"):
        group = [p for p in preds if p["duration_s"] == int(key)]
        assert metrics["by_duration_s"][key]["n"] == len(group) > 0
    # No depth on these lines: no needle grid, no heatmap.
    assert "niah" not in metrics and not (tmp_path / "niah.png").exists()


def test_grounding_end_to_end_equals_eval_grounding_on_the_predictions(corpus, tmp_path, capsys):
    from videollama.cli import main

    eval_dir, model_dir = corpus
    data = eval_dir / "whole" / "grounding.jsonl"
    assert main(["eval", "--model", str(model_dir), "--task", "grounding", "--data", str(data), "--out",
                 str(tmp_path), "--max-new-tokens", "6", "--windows-per-chunk", "3"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    preds = _read_jsonl(tmp_path / "predictions.jsonl")
    lines = _read_jsonl(data)
    assert [p["question"] for p in preds] == [line["question"] for line in lines]
    assert [p["segments"] for p in preds] == [line["segments"] for line in lines]
    assert metrics["task"] == "grounding" and metrics["n"] == len(lines) and metrics["skipped"] == 0
    # The scores are eval/grounding.py's on the saved answers, overall and by duration.
    expected = grounding_metrics([p["prediction"] for p in preds], [p["segments"] for p in preds])
    assert {k: metrics[k] for k in expected} == pytest.approx(expected)
    assert metrics["parse_failures"] == sum(parse_time_range(p["prediction"]) is None for p in preds)
    for key in ("20", "40"):
        group = [p for p in preds if p["duration_s"] == int(key)]
        by = grounding_metrics([p["prediction"] for p in group], [p["segments"] for p in group])
        assert metrics["by_duration_s"][key] == pytest.approx(by)
    for p in preds:
        assert "iou" in p and len(p["timestamps"]) in (5, 8)
    assert '"mIoU"' in capsys.readouterr().out


def test_grounding_scores_against_hand_computed_ious(tmp_path, monkeypatch):
    """Known answers (generation replaced by a table): IoUs worked out by hand, a parse failure, a
    skipped video (IoU 0, not a parse failure) and a bad line."""
    videos = tmp_path / "videos"
    videos.mkdir()
    _write_clip(videos / "clip.mp4", color=(220, 40, 40), direction=1)
    seg = [[2.0, 6.0]]
    lines = [  # (question, the model's answer, duration)
        ("when does the red square move?", "from 2.0 to 6.0 seconds", 20),  # IoU 1
        ("when does the red circle move?", "3 - 5", 20),  # overlap 2 / union 4 = 0.5
        ("when does the blue square move?", "from 4 to 10 seconds", 40),  # overlap 2 / union 8 = 0.25
        ("when does the blue circle move?", "it does not", 40),  # no time range: a parse failure
    ]
    rows = [json.dumps({"video": "videos/clip.mp4", "question": q, "segments": seg, "duration_s": d})
            for q, _, d in lines]
    rows.append(json.dumps({"video": "videos/missing.mp4", "question": "when does the green square move?",
                            "segments": seg, "duration_s": 40}))  # skipped: IoU 0
    rows.append(json.dumps({"video": "videos/clip.mp4", "question": "when?", "segments": [[5, 2]]}))  # bad line
    data = tmp_path / "grounding.jsonl"
    data.write_text("\n".join(rows) + "\n")
    answers = {q: a for q, a, _ in lines}

    def table_answers(model, tokenizer, prompts, videos, video_index, *, max_new_tokens):
        texts = [tokenizer.decode(p, skip_special_tokens=True) for p in prompts]
        return [next(a for q, a in answers.items() if q in t) for t in texts]

    monkeypatch.setattr(inference_generate, "generate_batch", table_answers)
    torch.manual_seed(0)
    model = VideoLlama(VideoLlamaConfig.from_name("tiny")).eval()
    tokenizer = train_tokenizer([WORDS + " when green"] * 20, vocab_size=model.config.decoder.vocab_size)
    metrics = evaluate(model, tokenizer, "grounding", data, None, tmp_path / "out", progress=False)

    assert metrics["n"] == 5 and metrics["evaluated"] == 4 and metrics["skipped"] == 2
    assert metrics["skipped_by_reason"] == {"invalid_line": 1, "missing_video": 1}
    assert "each segment must be [start, end]" in metrics["bad_lines"][0]["error"]
    assert metrics["R@0.3"] == pytest.approx(2 / 5) and metrics["R@0.5"] == pytest.approx(2 / 5)
    assert metrics["R@0.7"] == pytest.approx(1 / 5) and metrics["mIoU"] == pytest.approx(1.75 / 5)
    assert metrics["parse_failures"] == 1
    short, long = metrics["by_duration_s"]["20"], metrics["by_duration_s"]["40"]
    assert (short["R@0.5"], short["R@0.7"], short["mIoU"], short["n"]) == pytest.approx((1.0, 0.5, 0.75, 2))
    assert (long["R@0.3"], long["mIoU"], long["parse_failures"], long["n"]) == pytest.approx((0.0, 0.25 / 3, 1, 3))
    preds = _read_jsonl(tmp_path / "out" / "predictions.jsonl")
    assert [p["iou"] for p in preds] == pytest.approx([1.0, 0.5, 0.25, None, None])
    assert preds[4]["skip_reason"] == "missing_video" and preds[4]["timestamps"] is None


@pytest.mark.parametrize("segments, says", [
    ("[[1, 2]]", None),
    ("[]", "'segments' must be a list of 1 to"),
    ("[[3, 1]]", "each segment must be"),
    ("[[-1, 2]]", "each segment must be"),
    ("[[1, 2, 3]]", "each segment must be"),
    ('[["1", 2]]', "each segment must be"),
    ("[[true, 2]]", "each segment must be"),
    ("[[1, 1e999]]", "each segment must be"),  # infinity
])
def test_grounding_lines_are_read_by_the_evaluation_set_rules(tmp_path, segments, says):
    path = tmp_path / "g.jsonl"
    path.write_text(f'{{"video": "a.mp4", "question": "when does it move?", "segments": {segments}, '
                    f'"duration_s": 30}}\n')
    items, bad = read_eval_set(path, "grounding")
    if says is None:
        assert not bad and items[0].segments == [[1.0, 2.0]] and items[0].extra == {"duration_s": 30}
        assert items[0].task == "grounding"
        meta = items[0].training_meta()  # what the training loader makes of it: the answer it teaches
        assert meta["qa"] == [{"question": "when does it move?", "answer": "from 1.0 to 2.0 seconds",
                               "kind": "grounding"}]
        assert parse_time_range(meta["qa"][0]["answer"]) == (1.0, 2.0)
    else:
        assert not items and re.search(re.escape(says), bad[0][1]) and "g.jsonl:1" in bad[0][1]
    path.write_text(json.dumps({"video": "a.mp4", "question": "q?", "segments": [[0, 1]] * 1001}) + "\n")
    assert "1 to 1000" in read_eval_set(path, "grounding")[1][0][1]
