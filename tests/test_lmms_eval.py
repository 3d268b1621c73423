"""Our model inside lmms-eval, through lmms-eval's own command line, in its own environment.

The environment (.venv-lmms) is built by ``make lmms-eval`` (this module runs it, with this
interpreter's environment as the base; it is a no-op when up to date); a failed build fails the
tests with the command that builds it. On a Shapes evaluation split (real clips, plus one broken
video) and a tiny random model:

- ``lmms-eval --model videollama --tasks shapes_videoqa ...`` gives, item by item, the predictions
  of ``videollama eval`` (``evaluate``) and the same accuracy, overall and by kind;
- ``shapes_mc_ppl`` (lmms-eval's own ``multiple_choice`` scoring) picks, for every question, the
  option with the largest sum of token log-probabilities computed directly, one unpadded option at
  a time, and reports those sums (negated);
- the model encodes each video once, whole (its windows as ``load_windows`` gives them), however
  its requests are spread, and answers each request in its place.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_eval_harness import WORDS
from videollama.config import VideoLlamaConfig
from videollama.data import load_clip
from videollama.data.tokenizer import encode_prompt, train_tokenizer, videoqa_prompt
from videollama.data.windows import load_windows
from videollama.eval.harness import evaluate
from videollama.eval.likelihood import encode_videos, score_continuations
from videollama.eval.lmms_export import export_tasks, multiple_choice, question_family
from videollama.inference.load import load_for_inference
from videollama.model.videollama import VideoLlama

REPO = Path(__file__).resolve().parents[1]
LMMS_BIN = REPO / ".venv-lmms" / "bin"
BUILD = ["make", "-C", str(REPO), "lmms-eval", f"LMMS_BASE={sys.prefix}"]
SHAPES_WORDS = "yellow purple white circle square triangle still left right up down one two three the object"


@pytest.fixture(scope="module")
def lmms_env():
    """.venv-lmms/bin, built (or found up to date) by the make target."""
    try:
        proc = subprocess.run(BUILD, capture_output=True, text=True, timeout=1200)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.fail(f"the lmms-eval environment could not be built ({e}); build it with: {' '.join(BUILD)}")
    if proc.returncode != 0 or not (LMMS_BIN / "lmms-eval").is_file():
        pytest.fail(f"the lmms-eval environment could not be built; build it with: {' '.join(BUILD)}\n"
                    f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return LMMS_BIN


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A Shapes evaluation split (3 clips), one more item about a broken video, and a tiny random model."""
    from videollama.data.shapes_synth import synthesize

    root = tmp_path_factory.mktemp("lmms")
    synthesize(root / "shapes", train=0, eval=3, seed=0)
    eval_dir = root / "shapes" / "eval"
    (eval_dir / "videos" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a video" * 20)
    with (eval_dir / "videoqa.jsonl").open("a") as f:
        f.write(json.dumps({"video": "videos/broken.mp4", "question": "how many objects are there?",
                            "answer": "one", "kind": "static"}) + "\n")

    torch.manual_seed(0)
    config = VideoLlamaConfig.from_name("tiny")
    model = VideoLlama(config).eval()
    tokenizer = train_tokenizer([WORDS + " " + SHAPES_WORDS] * 20, vocab_size=config.decoder.vocab_size)
    with torch.no_grad():  # speak words: no ids past the trained vocabulary, no special tokens but EOS
        model.lm_head.weight[tokenizer.get_vocab_size():] = 0
        model.lm_head.weight[[0, 1, 3, 4, 5, 6]] = 0
    model.save_pretrained(root / "model")
    tokenizer.save(str(root / "model" / "tokenizer.json"))
    return eval_dir, root / "model"


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _samples(out: Path, task: str) -> list[dict]:
    (path,) = out.rglob(f"*_samples_{task}.jsonl")
    return sorted(_read_jsonl(path), key=lambda s: s["doc_id"])


def _run_lmms_eval(bin_dir: Path, model_dir: Path, tasks_dir: Path, out: Path, tmp: Path) -> dict:
    """lmms-eval's own command line, offline; returns its results.json."""
    cmd = [str(bin_dir / "lmms-eval"), "--model", "videollama", "--model_args", f"pretrained={model_dir},device=cpu",
           "--tasks", "shapes_videoqa,shapes_mc_ppl,shapes_mc_letter", "--include_path", str(tasks_dir),
           "--batch_size", "8", "--log_samples", "--output_path", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp / "hf")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env, cwd=tmp)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    (path,) = out.rglob("*_results.json")
    return json.loads(path.read_text())["results"]


@pytest.mark.slow
def test_lmms_eval_command_line_matches_videollama_eval(lmms_env, shapes, tmp_path):
    eval_dir, model_dir = shapes
    model, tokenizer = load_for_inference(model_dir, device="cpu")

    # Every other answer becomes what the model says, so that the accuracy is neither 0 nor 1.
    first = evaluate(model, tokenizer, "videoqa", eval_dir / "videoqa.jsonl", None, tmp_path / "first",
                     batch_size=8, progress=False)
    assert first["n"] == 20 and first["skipped"] == 1
    first_preds = _read_jsonl(tmp_path / "first" / "predictions.jsonl")
    items = _read_jsonl(eval_dir / "videoqa.jsonl")
    for i, (item, pred) in enumerate(zip(items, first_preds)):
        if i % 2 == 0 and pred["prediction"]:
            item["answer"] = pred["prediction"]
    data = eval_dir / "videoqa_answered.jsonl"
    data.write_text("".join(json.dumps(it) + "\n" for it in items))
    metrics = evaluate(model, tokenizer, "videoqa", data, None, tmp_path / "harness", batch_size=8, progress=False)
    harness_preds = [p["prediction"] for p in _read_jsonl(tmp_path / "harness" / "predictions.jsonl")]
    assert harness_preds == [p["prediction"] for p in first_preds]
    assert 0 < metrics["accuracy"] < 1 and set(metrics["accuracy_by_kind"]) == {"static", "temporal"}

    export_tasks(data, tmp_path / "tasks")
    results = _run_lmms_eval(lmms_env, model_dir, tmp_path / "tasks", tmp_path / "lmms", tmp_path)

    # Open-ended: the same predictions, item by item, and the same accuracy, overall and by kind.
    samples = _samples(tmp_path / "lmms", "shapes_videoqa")
    assert [s["exact_match"]["prediction"] for s in samples] == harness_preds
    assert results["shapes_videoqa"]["exact_match,none"] == pytest.approx(metrics["accuracy"])
    for kind in ("static", "temporal"):
        assert results["shapes_videoqa"][f"{kind},none"] == pytest.approx(metrics["accuracy_by_kind"][kind])

    # Multiple choice by likelihood: each option's summed log-probability, computed directly.
    mc_rows = _read_jsonl(tmp_path / "tasks" / "shapes_mc.json")
    samples = _samples(tmp_path / "lmms", "shapes_mc_ppl")
    assert len(samples) == len(mc_rows) > 10
    pre = model.config.preprocess
    latents, right = {}, []
    for row, sample in zip(mc_rows, samples):
        values = [float(v) for v, _ in sample["filtered_resps"]]
        if row["video"].endswith("broken.mp4"):  # no video: every option gets the same, worst score
            assert values == [float("inf")] * len(row["options"])
            right.append(sample["acc"])
            continue
        if row["video"] not in latents:  # the whole video (issue 21): its windows as load_windows gives them
            frames, times = load_windows(row["video_path"], pre)  # [W, F, 3, S, S], [W, F]
            with torch.no_grad():
                whole, _ = model.gather_videos(model.encode_video(frames, times),
                                               torch.zeros(frames.shape[0], dtype=torch.long))
                latents[row["video"]] = whole  # [1, W * L, D_v]
        prompt = encode_prompt(tokenizer, videoqa_prompt(row["question"]))
        direct = []
        for option in row["options"]:
            option_ids = tokenizer.encode(option, add_special_tokens=False).ids
            with torch.no_grad():
                logits = model(torch.tensor([prompt + option_ids]), visual_latents=latents[row["video"]]).logits[0]
            logprobs = torch.log_softmax(logits.float(), dim=-1)  # [T, V]
            direct.append(sum(float(logprobs[len(prompt) - 1 + k, t]) for k, t in enumerate(option_ids)))
        assert [-v for v in values] == pytest.approx(direct, abs=1e-3)
        best = max(range(len(direct)), key=direct.__getitem__)
        assert sample["acc"] == float(best == row["answer_index"])
        right.append(sample["acc"])
    assert results["shapes_mc_ppl"]["acc,none"] == pytest.approx(sum(right) / len(right))

    # Multiple choice by letter: the options listed as lmms-eval's video benchmarks list them.
    samples = _samples(tmp_path / "lmms", "shapes_mc_letter")
    for row, sample in zip(mc_rows, samples):
        listed = "".join(f"\n{'ABCD'[i]}. {o}" for i, o in enumerate(row["options"]))
        assert sample["input"] == (f"{row['question']}{listed}\n"
                                   "Answer with the option's letter from the given choices directly.")
    scores = [s["accuracy"]["score"] for s in samples]
    assert results["shapes_mc_letter"]["accuracy,none"] == pytest.approx(sum(scores) / len(scores))


_ONCE_SCRIPT = """
import json, sys
from types import SimpleNamespace
from videollama.eval.lmms import VideoLlamaLmms

model_dir, video_a, video_b = sys.argv[1:4]
lm = VideoLlamaLmms(pretrained=model_dir, device="cpu", batch_size=2)
docs = [{"v": video_a}, {"v": video_b}, {"v": video_a}, {"v": video_a}, {"v": video_b}]
lm.task_dict = {"t": {"test": docs}}
encoded = []
encode = lm.model.encode_video
lm.model.encode_video = lambda video, times=None: encoded.append(video.shape[0]) or encode(video, times)
visual = lambda doc: [doc["v"]]
questions = [json.loads(q) for q in sys.argv[4:]]
answers = lm.generate_until([SimpleNamespace(args=(q, {"max_new_tokens": 3, "until": []}, visual, i, "t", "test"))
                             for i, q in enumerate(questions)])
generation_encodes = list(encoded)
encoded.clear()
scores = lm.loglikelihood([SimpleNamespace(args=("what color is the square?", option, visual, i, "t", "test"))
                           for i in range(len(docs)) for option in ("red", "blue")])
likelihood_encodes = list(encoded)
too_long = "what color is " + "the red square and " * 60 + "?"  # past the tiny model's 128 tokens
long_answer = lm.generate_until([SimpleNamespace(args=(too_long, {"until": []}, visual, 0, "t", "test"))])
long_score = lm.loglikelihood([SimpleNamespace(args=(too_long, "red", visual, 0, "t", "test"))])
try:
    VideoLlamaLmms(pretrained=model_dir, colour="red")
    unknown = None
except ValueError as e:
    unknown = str(e)
print(json.dumps({"answers": answers, "generation_encodes": generation_encodes,
                  "likelihood_encodes": likelihood_encodes, "scores": [getattr(s, "text", s) for s in scores],
                  "long": [long_answer[0], getattr(long_score[0], "text", long_score[0])], "unknown": unknown}))
"""


@pytest.mark.slow
def test_each_video_is_encoded_once_and_answers_keep_their_places(lmms_env, shapes, tmp_path):
    eval_dir, model_dir = shapes
    video_a, video_b = sorted((eval_dir / "videos").glob("eval-*.mp4"))[:2]
    questions = ["what color is the square?", "which way does the object move?", "how many objects are there?",
                 "what shape is the red object?", "is there a circle?"]
    proc = subprocess.run([str(lmms_env / "python"), "-c", _ONCE_SCRIPT, str(model_dir), str(video_a), str(video_b),
                           *map(json.dumps, questions)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-6000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # Five requests, batches of 2, about a, b, a, a, b: grouped as a a | a b | b, each video encoded once,
    # whole (issue 21): its two 4 s windows (a 5 s Shapes clip) in one chunk.
    assert out["generation_encodes"] == [2, 2] and out["likelihood_encodes"] == [2, 2]

    # Each answer is the harness's answer to its own question (same order of work, same batches).
    videos = [video_a, video_b, video_a, video_a, video_b]
    data = tmp_path / "once.jsonl"
    data.write_text("".join(json.dumps({"video": v.name, "question": q, "answer": "x", "kind": "static"}) + "\n"
                            for v, q in zip(videos, questions)))
    model, tokenizer = load_for_inference(model_dir, device="cpu")
    evaluate(model, tokenizer, "videoqa", data, eval_dir / "videos", tmp_path / "harness", batch_size=2,
             max_new_tokens=3, progress=False)
    assert out["answers"] == [p["prediction"] for p in _read_jsonl(tmp_path / "harness" / "predictions.jsonl")]
    # The same question about the same video scores the same wherever it stands.
    scores = [tuple(s) for s in out["scores"]]
    assert scores[0:2] == scores[4:6] == scores[6:8] and scores[2:4] == scores[8:10]
    # A question longer than the context is scored wrong, as the harness scores it; a typo is named.
    assert out["long"] == ["", [float("inf"), False]]
    assert "unknown --model_args colour" in out["unknown"]


# ---- in the main environment: the exporter and the likelihood scorer --------------------------------
def test_multiple_choice_variant(shapes, tmp_path):
    eval_dir, _ = shapes
    summary = export_tasks(eval_dir / "videoqa.jsonl", tmp_path / "tasks", num_options=4, seed=0)
    assert summary["items"] == 20 and summary["refused_videos"] == []
    assert {p.name for p in (tmp_path / "tasks").iterdir()} >= {
        "shapes_videoqa.yaml", "shapes_mc_letter.yaml", "shapes_mc_ppl.yaml", "_shapes_template_yaml", "utils.py",
        "shapes_videoqa.json", "shapes_mc.json", "shapes_mc.jsonl"}
    items = _read_jsonl(eval_dir / "videoqa.jsonl")
    rows = _read_jsonl(tmp_path / "tasks" / "shapes_mc.json")
    answers_by_family: dict[str, set] = {}
    for it in items:
        answers_by_family.setdefault(question_family(it["question"]), set()).add(it["answer"])
    # Every item whose family has another answer to offer, in the file's order.
    kept = [i for i, it in enumerate(items) if len(answers_by_family[question_family(it["question"])]) > 1]
    assert [row["index"] for row in rows] == kept and 0 < len(kept) < len(items)
    for row in rows:
        item = items[row["index"]]
        assert row["question"] == item["question"] and row["answer"] == item["answer"]
        assert row["options"][row["answer_index"]] == item["answer"] and row["answer_letter"] == "ABCD"[row["answer_index"]]
        family = answers_by_family[question_family(item["question"])]
        # The answer and up to three distinct distractors, each an answer of the same family.
        assert len(set(row["options"])) == len(row["options"]) == min(4, len(family))
        assert set(row["options"]) <= family
        assert Path(row["video_path"]).is_file()
    # Seeded: the same variant again; another seed, other draws.
    export_tasks(eval_dir / "videoqa.jsonl", tmp_path / "again")
    assert _read_jsonl(tmp_path / "again" / "shapes_mc.json") == rows
    from videollama.data.evalset import read_eval_set

    parsed, bad = read_eval_set(tmp_path / "tasks" / "shapes_mc.jsonl", "videoqa")  # our own format, for `eval`
    assert bad == [] and [it.options for it in parsed] == [r["options"] for r in rows]
    reseeded = multiple_choice(parsed, num_options=4, seed=1)
    assert [it.options for it in reseeded] == [it.options for it in parsed]  # options given are kept


def test_an_escaping_video_path_is_written_empty(tmp_path):
    data = tmp_path / "set.jsonl"
    data.write_text(json.dumps({"video": "../outside.mp4", "question": "what color is the square?",
                                "answer": "red", "kind": "static"}) + "\n")
    summary = export_tasks(data, tmp_path / "tasks")
    assert summary["refused_videos"] == ["../outside.mp4"]
    assert _read_jsonl(tmp_path / "tasks" / "shapes_videoqa.json")[0]["video_path"] == ""
    assert summary["multiple_choice_items"] == 0  # one answer in its family: no distractor to offer


def test_batched_scores_equal_one_row_at_a_time(shapes):
    eval_dir, model_dir = shapes
    model, tokenizer = load_for_inference(model_dir, device="cpu")
    pre = model.config.preprocess
    clips = [load_clip(p, num_frames=pre.num_frames, fps=pre.fps, size=pre.size, mean=pre.mean, std=pre.std)[0]
             for p in sorted((eval_dir / "videos").glob("eval-*.mp4"))[:2]]
    latents = encode_videos(model, clips)  # [2, L, D_v]
    prompts = [encode_prompt(tokenizer, videoqa_prompt(q)) for q in
               ("what color is the square?", "which way does the red circle move?", "how many?")]
    conts = [tokenizer.encode(t, add_special_tokens=False).ids for t in ("red", "left", "two objects")]
    scores = score_continuations(model, prompts, conts, latents, [0, 1, 1])
    for prompt, cont, video, score in zip(prompts, conts, [0, 1, 1], scores):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + cont]), video=clips[video][None]).logits[0]  # [T, V]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        expected = sum(float(logprobs[len(prompt) - 1 + k, t]) for k, t in enumerate(cont))
        assert score.logprob == pytest.approx(expected, abs=1e-4) and score.num_tokens == len(cont)
        greedy = all(int(logprobs[len(prompt) - 1 + k].argmax()) == t for k, t in enumerate(cont))
        assert score.greedy == greedy
    with pytest.raises(ValueError, match="max_seq_len"):
        score_continuations(model, [prompts[0]], [[7] * model.config.decoder.max_seq_len], latents, [0])
