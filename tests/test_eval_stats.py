"""Intervals, comparisons, multiple choice and ranks in our own harness (``videollama eval``).

- The bootstrap interval by video against the closed-form Wilson score interval: on independent
  items (one item a video) they agree; when items share videos (four questions a video, answered
  alike) the interval widens to the Wilson interval of the VIDEOS, the effective sample.
- ``--compare`` flags a real difference, and passes the same predictions reshuffled.
- ``--task mc`` on a Shapes split: the likelihood choice is the argmax of each option's summed token
  log-probabilities computed directly (one unpadded option at a time, the whole video through the
  model's windows path); the letter answer is the unbatched greedy answer to the letter prompt,
  parsed by lmms-eval's rules; metrics.json holds both accuracies, their intervals, provenance.
- ``torchrun --nproc-per-node 2 -m videollama.cli eval`` (gloo, CPU) writes predictions.jsonl and
  metrics.json byte for byte as one process does.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import subprocess
import sys

import pytest
import torch

from serving import build_model_dir, free_port
from test_eval_harness import _reference_prediction
from videollama.data.tokenizer import encode_prompt, videoqa_prompt
from videollama.data.windows import load_windows
from videollama.eval.bootstrap import cluster_interval, paired_difference
from videollama.eval.compare import compare
from videollama.eval.harness import evaluate
from videollama.eval.multiple_choice import LETTERS, extract_letter, letter_question
from videollama.model.videollama import VideoLlama

Z95 = 1.959963984540054


def wilson(successes: int, n: int) -> tuple[float, float]:
    """The Wilson score 95% interval of a binomial proportion (closed form)."""
    p = successes / n
    centre = (p + Z95 ** 2 / (2 * n)) / (1 + Z95 ** 2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95 ** 2 / (4 * n * n)) / (1 + Z95 ** 2 / n)
    return centre - half, centre + half


# Tolerance on each end of a 95% interval of a proportion near 0.7: the percentile bootstrap with
# 4000 resamples puts an end within about 0.0015 (one standard error of a 2.5% quantile) of its
# limit, the accuracy moves on a lattice of 1/n (0.0025 at n = 400, 0.01 at n = 100), and Wilson
# and the bootstrap differ by O(1/n) in skew. 0.01 (0.015 at n = 100) is under a quarter of the
# half-widths (0.045 and 0.09), so a resampling that ignored videos (half the width) would fail.
def test_bootstrap_agrees_with_wilson_on_independent_items():
    correct = [1.0] * 280 + [0.0] * 120
    random.Random(0).shuffle(correct)
    low, high = cluster_interval(correct, [f"v{i}" for i in range(400)], resamples=4000)
    w_low, w_high = wilson(280, 400)
    assert abs(low - w_low) < 0.01 and abs(high - w_high) < 0.01, ((low, high), (w_low, w_high))


def test_the_interval_widens_when_items_share_videos():
    per_video = [1.0] * 70 + [0.0] * 30  # 100 videos, four questions each answered alike
    values = [v for v in per_video for _ in range(4)]
    shared = cluster_interval(values, [f"v{i // 4}" for i in range(400)], resamples=4000)
    independent = cluster_interval(values, [f"q{i}" for i in range(400)], resamples=4000)
    assert (shared[1] - shared[0]) > 1.8 * (independent[1] - independent[0])  # sqrt(4) = 2 in theory
    w_low, w_high = wilson(70, 100)  # the effective sample: 100 videos
    assert abs(shared[0] - w_low) < 0.015 and abs(shared[1] - w_high) < 0.015, (shared, (w_low, w_high))


def _write_predictions(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_compare_flags_a_real_difference_and_passes_a_reshuffle(tmp_path, capsys):
    from videollama.cli import main

    rng = random.Random(1)
    items = [{"video": f"v{i // 4}.mp4", "question": f"q{i % 4}?", "answer": "red"} for i in range(240)]
    a = [{**it, "correct": rng.random() < 0.8} for it in items]
    b = [{**it, "correct": rng.random() < 0.55} for it in items]
    _write_predictions(tmp_path / "a" / "predictions.jsonl", a)
    _write_predictions(tmp_path / "b" / "predictions.jsonl", b)
    reshuffled = list(a)
    rng.shuffle(reshuffled)
    _write_predictions(tmp_path / "a2" / "predictions.jsonl", reshuffled)

    real = compare(tmp_path / "a", tmp_path / "b" / "predictions.jsonl")["by_metric"]["correct"]
    assert real["significant"] and real["p_value"] < 0.01 and real["ci95"][0] > 0
    assert real["difference"] == pytest.approx(sum(r["correct"] for r in a) / 240 - sum(r["correct"] for r in b) / 240)
    same = compare(tmp_path / "a", tmp_path / "a2")["by_metric"]["correct"]
    assert not same["significant"] and same["difference"] == 0 and same["p_value"] == 1.0

    assert main(["eval", "--compare", str(tmp_path / "a"), str(tmp_path / "a2"), "--out", str(tmp_path / "c")]) == 0
    assert "no difference beyond noise" in capsys.readouterr().out
    assert main(["eval", "--compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "A differs from B" in capsys.readouterr().out
    _write_predictions(tmp_path / "short" / "predictions.jsonl", a[:-4])
    assert main(["eval", "--compare", str(tmp_path / "a"), str(tmp_path / "short")]) == 2
    assert "not on the same items" in capsys.readouterr().err


def test_paired_bootstrap_on_a_null_of_swapped_labels_is_not_flagged():
    # Each item's two scores swapped between systems by a coin: no system is better.
    rng = random.Random(2)
    base = [(rng.random() < 0.7, rng.random() < 0.7) for _ in range(400)]
    pairs = [(x, y) if rng.random() < 0.5 else (y, x) for x, y in base]
    result = paired_difference([float(x) for x, _ in pairs], [float(y) for _, y in pairs],
                               [f"v{i // 4}" for i in range(400)])
    assert not result["significant"] and result["p_value"] > 0.05


@pytest.mark.parametrize("text, letter", [
    ("B", "B"), ("(C)", "C"), ("The answer is D.", "D"), ("A. red", "A"), ("", ""), ("red", ""),
    ("I think B, no: C", "C"), ("D)", "D"),
])
def test_letter_parsing_follows_lmms_eval(text, letter):
    assert extract_letter(text, "ABCD") == letter


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A Shapes evaluation split (3 clips, about 15 questions) and a tiny random model."""
    from videollama.data.shapes_synth import synthesize

    root = tmp_path_factory.mktemp("mc")
    synthesize(root / "shapes", train=0, eval=3, seed=0)
    return root / "shapes" / "eval", build_model_dir(root / "model")


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _direct_option_logprobs(model, tokenizer, row, video_path, wholes):
    """Each option's summed token log-probabilities, one unpadded row at a time; ``wholes`` keeps
    each video's latents (its windows as ``load_windows`` gives them, through the windows path)."""
    if video_path not in wholes:
        frames, times = load_windows(video_path, model.config.preprocess)  # [W, F, 3, S, S], [W, F]
        with torch.no_grad():
            wholes[video_path], _ = model.gather_videos(model.encode_video(frames, times),
                                                        torch.zeros(frames.shape[0], dtype=torch.long))
    whole = wholes[video_path]  # [1, W * L, D_v]
    prompt = encode_prompt(tokenizer, videoqa_prompt(row["question"]))
    sums = []
    for option in row["options"]:
        ids = tokenizer.encode(option, add_special_tokens=False).ids
        with torch.no_grad():
            logits = model(torch.tensor([prompt + ids]), visual_latents=whole).logits[0]  # [T, V]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        sums.append(sum(float(logprobs[len(prompt) - 1 + k, t]) for k, t in enumerate(ids)))
    return sums


def test_multiple_choice_by_likelihood_and_by_letter(shapes, tmp_path):
    eval_dir, model_dir = shapes
    model, tokenizer = VideoLlama.from_pretrained(model_dir, return_tokenizer=True)
    data = eval_dir / "videoqa.jsonl"
    metrics = evaluate(model, tokenizer, "mc", data, None, tmp_path, batch_size=3, num_options=5, progress=False,
                       model_dir=model_dir, resamples=500)
    rows = _read_jsonl(tmp_path / "predictions.jsonl")
    assert len(rows) == metrics["n"] >= 10 and all(2 <= len(r["options"]) <= 5 for r in rows)
    wholes = {}
    for r in rows:
        direct = _direct_option_logprobs(model, tokenizer, r, eval_dir / r["video"], wholes)
        assert r["option_logprobs"] == pytest.approx(direct, abs=1e-3)
        assert r["choice_likelihood"] == max(range(len(direct)), key=direct.__getitem__)
        prompt = encode_prompt(tokenizer, videoqa_prompt(letter_question(r["question"], r["options"])))
        alone = _reference_prediction(model, tokenizer, prompt, eval_dir / r["video"], max_new_tokens=16)
        assert r["letter_output"] == alone
        assert r["choice_letter"] == extract_letter(alone, LETTERS[: len(r["options"])])
        assert r["correct_letter"] == (r["choice_letter"] == r["answer_letter"])
    for way in ("likelihood", "letter"):
        accuracy = sum(r[f"correct_{way}"] for r in rows) / len(rows)
        assert metrics[f"accuracy_{way}"] == pytest.approx(accuracy)
        low, high = metrics["ci95"][f"accuracy_{way}"]["all"]
        assert low <= accuracy <= high
        assert set(metrics["ci95"][f"accuracy_{way}"]["by_kind"]) == {"static", "temporal"}
    prov = json.loads((tmp_path / "metrics.json").read_text())["provenance"]
    assert prov["data"]["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    weights = hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()
    assert prov["model_dir"]["files"]["model.safetensors"] == weights
    assert prov["torch"] == torch.__version__ and prov["seeds"] == {"options": 0, "bootstrap": 0}
    assert prov["preprocess"]["num_frames"] == model.config.preprocess.num_frames


def _eval_argv(model_dir, data, out, task):
    return ["-m", "videollama.cli", "eval", "--model", str(model_dir), "--task", task, "--data", str(data),
            "--out", str(out), "--batch-size", "2", "--max-new-tokens", "6", "--resamples", "200", "--device", "cpu"]


@pytest.mark.parametrize("task", ["videoqa", "mc"])
def test_two_ranks_write_the_files_of_one_process(shapes, tmp_path, task):
    from test_train_dist import env

    eval_dir, model_dir = shapes
    data = eval_dir / "videoqa.jsonl"
    one = subprocess.run([sys.executable, *_eval_argv(model_dir, data, tmp_path / "one", task)], env=env(),
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--rdzv-backend=c10d",
                          f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--max-restarts=0",
                          *_eval_argv(model_dir, data, tmp_path / "two", task)],
                         env=env(), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "rank 0 of 2" in two.stderr and "rank 1 of 2" in two.stderr  # each answered its share
    for name in ("predictions.jsonl", "metrics.json"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["metrics.json", "predictions.jsonl"]
