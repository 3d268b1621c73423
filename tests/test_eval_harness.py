"""The evaluation harness end to end: a tiny random model, a trained tokenizer, real MP4 clips.

Predictions are checked against :func:`videollama.inference.generate.generate` called directly on
one unpadded prompt and the whole video as ``load_windows`` decodes it (every window at once,
through the model's own windows path): batching, left padding, chunked encoding and latents
shared between questions must not change a single answer. Since issue 21 a video is seen whole:
the 4.5 s clips here are two 4 s windows (0-4 s and 0.5-4.5 s), no longer one centred window.
"""

from __future__ import annotations

import json
import logging
import re

import av
import numpy as np
import pytest
import torch

from videollama.config import VideoLlamaConfig
from videollama.data import load_clip
from videollama.data.evalset import read_eval_set
from videollama.data.tokenizer import (
    caption_prompt,
    encode_prompt,
    load_tokenizer,
    train_tokenizer,
    videoqa_prompt,
)
from videollama.data.windows import load_windows
from videollama.eval import harness
from videollama.eval.harness import evaluate
from videollama.eval.metrics import is_correct
from videollama.inference import generate as inference_generate
from videollama.inference.generate import generate
from videollama.model.videollama import VideoLlama, Windows

WORDS = ("a red green blue square circle triangle moves left right up down stays still what color shape "
         "is the which way does object how many objects are there one two three")


def _write_clip(path, *, color, direction, seconds=4.5, fps=8, width=80, height=64):
    """A small H.264 MP4: a colored square sliding across a gray background."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(int(seconds * fps)):
            img = np.full((height, width, 3), 40, dtype=np.uint8)
            x = 10 + direction * i
            img[24:40, x : x + 16] = color
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalset")
    videos = root / "videos"
    videos.mkdir()
    _write_clip(videos / "red_right.mp4", color=(220, 40, 40), direction=1)
    _write_clip(videos / "blue_left.mp4", color=(50, 90, 230), direction=-1)
    (videos / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 definitely not a video" * 20)

    model_dir = root / "model"
    torch.manual_seed(0)
    config = VideoLlamaConfig.from_name("tiny")
    model = VideoLlama(config).eval()
    tokenizer = train_tokenizer([WORDS] * 20, vocab_size=config.decoder.vocab_size)
    # The tiny corpus fills only ~360 of the 1024 ids; a random model would mostly emit ids that
    # decode to nothing. Zero logits for those (and for the special tokens other than EOS) so that
    # it speaks words: random words, but real text for the metrics to score.
    with torch.no_grad():
        model.lm_head.weight[tokenizer.get_vocab_size():] = 0
        model.lm_head.weight[[0, 1, 3, 4, 5, 6]] = 0
    model.save_pretrained(model_dir)
    tokenizer.save(str(model_dir / "tokenizer.json"))
    return root, model_dir


def _middle_frame(video_path, pre, seconds=4.5):
    """The frame on screen at half the clip's duration, as ``load_clip`` shows it: [1, 3, S, S]."""
    frame, _ = load_clip(video_path, num_frames=1, fps=pre.fps, size=pre.size, mean=pre.mean, std=pre.std,
                         start=seconds / 2)
    return frame


def _reference_prediction(model, tokenizer, prompt_ids, video_path, *, max_new_tokens, single_frame=False):
    """One item alone: no padding, no batching, no chunks, no shared latents; the whole video's
    windows from ``load_windows``, through the model's own windows path (``Windows``)."""
    pre = model.config.preprocess
    frames, times = load_windows(video_path, pre)  # [W, F, 3, S, S], [W, F]
    if single_frame:  # one frame for the whole video, in every frame of every window
        frames = _middle_frame(video_path, pre).expand_as(frames)
    eos = model.config.decoder.eos_token_id
    windows = Windows(times=times, video=torch.zeros(frames.shape[0], dtype=torch.long))
    new = generate(model, torch.tensor([prompt_ids]), frames, windows=windows, max_new_tokens=max_new_tokens,
                   temperature=0.0, eos_token_id=eos)[0].tolist()
    new = new[: new.index(eos)] if eos in new else new
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _videoqa_items():
    # Questions of different lengths (so that prompts are left-padded), three about one video,
    # interleaved with others so that the harness must group them to decode each video once.
    return [
        {"video": "videos/red_right.mp4", "question": "what color is the square?", "answer": "red", "kind": "static"},
        {"video": "videos/blue_left.mp4", "question": "which way does the blue square move?", "answer": "left",
         "kind": "temporal"},
        {"video": "videos/broken.mp4", "question": "how many objects are there?", "answer": "one", "kind": "static"},
        {"video": "videos/red_right.mp4", "question": "which way does the red square move?", "answer": "right",
         "kind": "temporal"},
        {"video": "videos/red_right.mp4", "question": "which way?", "answer": "b", "kind": "temporal",
         "options": ["left", "right", "up", "down"]},
    ]


def test_videoqa_end_to_end(setup, tmp_path, monkeypatch, caplog):
    root, model_dir = setup
    model = VideoLlama.from_pretrained(model_dir).eval()
    tokenizer = load_tokenizer(model_dir)
    items = _videoqa_items()

    # The answer of the first item is set to what the model really says, so that accuracy is
    # known exactly: item 0 right, the others (random model) almost surely wrong - checked below.
    max_new = 6
    refs = []
    for it in items:
        prompt = encode_prompt(tokenizer, videoqa_prompt(it["question"], it.get("options")))
        refs.append(None if "broken" in it["video"] else
                    _reference_prediction(model, tokenizer, prompt, root / it["video"], max_new_tokens=max_new))
    assert refs[0], "the random model produced an empty answer; pick another seed"
    items[0]["answer"] = refs[0]
    data = root / "videoqa.jsonl"
    data.write_text("".join(json.dumps(it) + "\n" for it in items))

    # Count decodes and encodes: each good video once, however its questions are spread.
    decoded, encoded = [], []
    real_load_video, real_encode = harness.load_video, model.encode_video
    monkeypatch.setattr(harness, "load_video", lambda path, *a, **k: decoded.append(path.name)
                        or real_load_video(path, *a, **k))
    monkeypatch.setattr(model, "encode_video",
                        lambda video, times=None: encoded.append(video.shape[0]) or real_encode(video, times))

    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="videollama.eval.harness"):
        metrics = evaluate(model, tokenizer, "videoqa", data, None, out, batch_size=3, max_new_tokens=max_new,
                           progress=False)

    assert sorted(decoded) == ["blue_left.mp4", "broken.mp4", "red_right.mp4"]
    # One encoding per good video, whole (its two windows in one chunk): grouping puts the three red
    # questions in one batch of 3.
    assert encoded == [2, 2]
    assert any("broken.mp4" in r.getMessage() and "skipping" in r.getMessage() for r in caplog.records)

    preds = _read_jsonl(out / "predictions.jsonl")
    assert [p["question"] for p in preds] == [it["question"] for it in items]  # the file's order
    for p, it, ref in zip(preds, items, refs):
        assert set(p) >= {"video", "question", "prediction", "answer", "kind", "correct", "timestamps"}
        assert p["video"] == it["video"] and p["answer"] == it["answer"] and p["kind"] == it["kind"]
        if ref is None:  # the broken video: skipped, scored wrong, no timestamps
            assert p["prediction"] == "" and p["correct"] is False and p["timestamps"] is None
            assert "error" in p
        else:
            assert p["prediction"] == ref  # batching and padding change nothing
            # The whole 4.5 s clip (issue 21): two 4 s windows at 0 and 0.5 s, 16 frames each 0.25 s
            # apart, exactly the frames load_windows gives.
            _, times = load_windows(root / it["video"], model.config.preprocess)
            assert p["timestamps"] == [[round(float(t), 4) for t in window] for window in times]
            assert [window[0] for window in p["timestamps"]] == [0.0, 0.5]
            for window in p["timestamps"]:
                assert len(window) == 16 and np.diff(window) == pytest.approx([0.25] * 15, abs=0.07)
            assert p["correct"] == is_correct(ref, it["answer"], it.get("options"))
    assert preds[0]["correct"] is True
    n_correct = sum(p["correct"] for p in preds)

    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == metrics
    assert metrics["n"] == 5 and metrics["skipped"] == 1 and list(metrics["skipped_videos"]) == ["videos/broken.mp4"]
    assert metrics["frames"] == 16 and metrics["task"] == "videoqa"
    assert metrics["accuracy"] == pytest.approx(n_correct / 5)
    static = [p["correct"] for p in preds if p["kind"] == "static"]
    assert metrics["accuracy_by_kind"]["static"] == pytest.approx(sum(static) / len(static))


def test_single_frame_and_limit(setup, tmp_path, monkeypatch):
    root, model_dir = setup
    model = VideoLlama.from_pretrained(model_dir).eval()
    tokenizer = load_tokenizer(model_dir)
    data = root / "videoqa_single.jsonl"
    data.write_text("".join(json.dumps(it) + "\n" for it in _videoqa_items()))

    seen = []
    real_encode = model.encode_video
    monkeypatch.setattr(model, "encode_video",
                        lambda video, times=None: seen.append(video.clone()) or real_encode(video, times))
    metrics = evaluate(model, tokenizer, "videoqa", data, root, tmp_path, batch_size=2, frames=1, limit=2,
                       max_new_tokens=4, progress=False)
    assert metrics["frames"] == 1 and metrics["n"] == 2 and metrics["skipped"] == 0
    # The model saw one frame repeated: all 16 frames of every clip are identical; and since issue 21
    # it is ONE frame for the whole video (the one at half its duration) in both of its windows.
    assert len(seen) == 2
    for video, item in zip(seen, _videoqa_items()[:2]):
        assert video.shape[1] == 16 and torch.equal(video, video[:, 8:9].expand_as(video))
        assert video.shape[0] == 2 and torch.equal(video, video[:1, :1].expand_as(video))
        assert torch.equal(video[0, 0], _middle_frame(root / item["video"], model.config.preprocess)[0])
    preds = _read_jsonl(tmp_path / "predictions.jsonl")
    assert len(preds) == 2 and all(len({t for window in p["timestamps"] for t in window}) == 1 for p in preds)
    assert all(len(p["timestamps"]) == 2 and p["timestamps"][0][0] == 2.25 for p in preds)
    item = _videoqa_items()[1]
    prompt = encode_prompt(tokenizer, videoqa_prompt(item["question"]))
    assert preds[1]["prediction"] == _reference_prediction(model, tokenizer, prompt, root / item["video"],
                                                          max_new_tokens=4, single_frame=True)


def test_caption_end_to_end(setup, tmp_path):
    root, model_dir = setup
    model = VideoLlama.from_pretrained(model_dir).eval()
    tokenizer = load_tokenizer(model_dir)
    items = [
        {"video": "videos/red_right.mp4", "captions": ["a red square moves right."]},
        {"video": "videos/broken.mp4", "captions": ["a green circle stays still."]},
        {"video": "videos/blue_left.mp4", "captions": ["a blue square moves left.", "a blue square goes left."]},
    ]
    data = root / "caption.jsonl"
    data.write_text("".join(json.dumps(it) + "\n" for it in items))
    metrics = evaluate(model, tokenizer, "caption", data, None, tmp_path, batch_size=2, max_new_tokens=5,
                       meteor=False, progress=False)
    preds = _read_jsonl(tmp_path / "predictions.jsonl")
    assert [p["references"] for p in preds] == [it["captions"] for it in items]
    assert preds[1]["prediction"] == "" and preds[1]["timestamps"] is None
    prompt = encode_prompt(tokenizer, caption_prompt())
    assert preds[2]["prediction"] == _reference_prediction(model, tokenizer, prompt, root / items[2]["video"],
                                                          max_new_tokens=5)
    from videollama.eval.metrics import caption_scores

    expected = caption_scores([p["prediction"] for p in preds], [it["captions"] for it in items], meteor=False)
    assert {k: metrics[k] for k in expected} == expected
    assert metrics["skipped"] == 1 and "METEOR" not in metrics


def test_cli(setup, tmp_path, capsys):
    from videollama.cli import main

    root, model_dir = setup
    data = root / "videoqa_cli.jsonl"
    data.write_text("".join(json.dumps(it) + "\n" for it in _videoqa_items()[:2]))
    rc = main(["eval", "--model", str(model_dir), "--task", "videoqa", "--data", str(data),
               "--video-root", str(root), "--out", str(tmp_path), "--batch-size", "2", "--frames", "1",
               "--max-new-tokens", "3"])
    assert rc == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["frames"] == 1 and metrics["n"] == 2 and metrics["max_new_tokens"] == 3
    assert len(_read_jsonl(tmp_path / "predictions.jsonl")) == 2
    assert '"accuracy"' in capsys.readouterr().out


def test_bad_evaluation_sets(tmp_path):
    """Each bad line is reported as FILE:LINE: what is wrong, and the reading goes on."""
    path = tmp_path / "set.jsonl"
    cases = [
        ('{"video": "a.mp4", "question": "q?", "answer": "red"}\n{not json\n', r"set\.jsonl:2: not valid JSON"),
        ('{"video": "a.mp4", "answer": "red"}\n', r"set\.jsonl:1: 'question' must be a non-empty string"),
        ('["a.mp4"]\n', r"set\.jsonl:1: expected a JSON object"),
        ('{"video": "a.mp4", "question": "q?", "answer": "pink", "options": ["red", "blue"]}\n',
         r"set\.jsonl:1: answer 'pink' is not one of the options"),
    ]
    for text, message in cases:
        path.write_text(text)
        items, bad = read_eval_set(path, "videoqa")
        assert len(bad) == 1 and re.search(message, bad[0][1]), (bad, message)
    path.write_text("\n\n")
    assert read_eval_set(path, "videoqa") == ([], [])
    path.write_text('{"video": "a.mp4", "captions": "a red square."}\n')
    _, bad = read_eval_set(path, "caption")
    assert re.search(r"set\.jsonl:1: 'captions' must be a non-empty list", bad[0][1])
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_eval_set(tmp_path / "missing.jsonl", "videoqa")
    path.write_text('{"video": "a.mp4", "question": "q?", "answer": "red"}\n' * 5)
    items, bad = read_eval_set(path, "videoqa", limit=3)
    assert len(items) == 3 and not bad and items[2].kind == "unspecified"


# ---- hostile and careless input -------------------------------------------------------------
def test_bad_items_are_counted_and_the_rest_is_evaluated(setup, tmp_path):
    """Every kind of bad line or item is a counted skip by reason; the good items are evaluated."""
    root, model_dir = setup
    model, tokenizer = VideoLlama.from_pretrained(model_dir, return_tokenizer=True)
    outside = tmp_path / "outside.mp4"
    (root / "videos" / "link_out.mp4").unlink(missing_ok=True)
    (root / "videos" / "link_out.mp4").symlink_to(outside)
    good = {"video": "videos/red_right.mp4", "question": "which way does the red square move?",
            "answer": "right", "kind": "temporal"}
    lines = [
        json.dumps(good),
        b'{"video": "videos/red_right.mp4", "question": "caf\xe9?", "answer": "x"}',  # Latin-1: not UTF-8
        json.dumps({**good, "question": "q" * 100_000_000}),  # a 100 MB question: over the 1 MiB line cap
        "[" * 100_000 + "]" * 100_000,  # nested far too deep
        json.dumps({**good, "video": "../../../../etc/passwd"}),
        json.dumps({**good, "video": "/etc/passwd"}),
        json.dumps({**good, "video": "videos/link_out.mp4"}),
        json.dumps({**good, "question": "what " * 400}),  # 2,000 characters: more tokens than the context
        json.dumps({**good, "question": "q" * 20_000}),  # over the character cap: never tokenized
        json.dumps(good),
    ]
    data = root / "hostile.jsonl"
    data.write_bytes(b"\n".join(ln if isinstance(ln, bytes) else ln.encode() for ln in lines) + b"\n")
    metrics = evaluate(model, tokenizer, "videoqa", data, None, tmp_path / "out", batch_size=3,
                       max_new_tokens=3, progress=False)
    assert metrics["skipped_by_reason"] == {"invalid_line": 4, "outside_root": 3, "prompt_too_long": 1}
    assert metrics["n"] == 6 and metrics["evaluated"] == 2 and metrics["skipped"] == 8
    assert [b["line"] for b in metrics["bad_lines"]] == [2, 3, 4, 9]
    assert "not valid UTF-8" in metrics["bad_lines"][0]["error"] and "hostile.jsonl:2" in metrics["bad_lines"][0]["error"]
    assert "longer than" in metrics["bad_lines"][1]["error"]
    assert "over the 16384-character cap" in metrics["bad_lines"][3]["error"]
    preds = _read_jsonl(tmp_path / "out" / "predictions.jsonl")
    assert len(preds) == 6 and [p.get("skip_reason") for p in preds] == [
        None, "outside_root", "outside_root", "outside_root", "prompt_too_long", None]
    # The two good copies get the same (real) prediction; no message says whether /etc/passwd exists.
    assert preds[0]["prediction"] == preds[5]["prediction"] and preds[0]["timestamps"]
    messages = [p["error"] for p in preds[1:4]]
    assert all("leaves its root folder" in m and "exist" not in m for m in messages)


def test_a_nul_byte_in_a_video_path_is_a_counted_skip(setup, tmp_path, capsys):
    # Every os call on such a path raises ValueError ("embedded null byte"), which ended the run.
    from videollama.cli import main

    root, model_dir = setup
    model, tokenizer = VideoLlama.from_pretrained(model_dir, return_tokenizer=True)
    good = {"video": "videos/red_right.mp4", "question": "what color is the square?", "answer": "red"}
    data = root / "nul.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in
                            [good, {**good, "video": "videos/red\u0000right.mp4"}, {**good, "video": "\u0000"}, good]))
    metrics = evaluate(model, tokenizer, "videoqa", data, None, tmp_path / "out", batch_size=2, max_new_tokens=2,
                       progress=False)
    assert metrics["skipped_by_reason"] == {"not_a_file": 2} and metrics["evaluated"] == 2 and metrics["n"] == 4
    preds = _read_jsonl(tmp_path / "out" / "predictions.jsonl")
    assert [p.get("skip_reason") for p in preds] == [None, "not_a_file", "not_a_file", None]
    assert "NUL byte" in preds[1]["error"]
    for argv in (["--data", str(root / "nul\0.jsonl")], ["--data", str(data), "--video-root", str(root) + "\0"]):
        assert main(["eval", "--model", str(model_dir), "--task", "videoqa", "--out", str(tmp_path / "o"), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("videollama: error:") and "\n" not in err, err


def test_eval_exits_non_zero_when_nothing_could_be_evaluated(setup, tmp_path, capsys):
    from videollama.cli import main

    root, model_dir = setup
    data = tmp_path / "missing.jsonl"
    data.write_text(json.dumps({"video": "nope.mp4", "question": "q?", "answer": "a"}) + "\n")
    assert main(["eval", "--model", str(model_dir), "--task", "videoqa", "--data", str(data),
                 "--out", str(tmp_path / "o")]) == 1
    assert "nothing in" in capsys.readouterr().err
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["skipped_by_reason"] == {"missing_video": 1}


@pytest.mark.parametrize("argv, says", [
    (["--out", "FILE"], "is a file"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--data", "no/such.jsonl"], "no/such.jsonl: evaluation set not found"),
])
def test_eval_checks_its_arguments_before_loading_the_model(setup, tmp_path, monkeypatch, capsys, argv, says):
    from videollama.cli import main

    root, model_dir = setup
    (tmp_path / "FILE").write_text("not a folder")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(VideoLlama, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    base = {"--model": str(model_dir), "--task": "videoqa", "--data": str(root / "videoqa_cli.jsonl"), "--out": "o"}
    (root / "videoqa_cli.jsonl").write_text(json.dumps(_videoqa_items()[0]) + "\n")
    base.update(dict(zip(argv[::2], argv[1::2])))
    assert main(["eval", *[x for kv in base.items() for x in kv]]) == 2
    assert says in capsys.readouterr().err


def test_an_interrupted_eval_keeps_the_predictions_made(setup, tmp_path, monkeypatch):
    root, model_dir = setup
    model, tokenizer = VideoLlama.from_pretrained(model_dir, return_tokenizer=True)
    data = root / "interrupted.jsonl"
    data.write_text("".join(json.dumps(it) + "\n" for it in _videoqa_items()))
    calls = []
    real = inference_generate.generate_batch

    def stop_on_the_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(inference_generate, "generate_batch", stop_on_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, tokenizer, "videoqa", data, None, tmp_path, batch_size=2, max_new_tokens=3, progress=False)
    kept = _read_jsonl(tmp_path / "predictions.jsonl")
    assert len(kept) == 2 and all(set(p) >= {"line_index", "prediction", "answer"} for p in kept)
