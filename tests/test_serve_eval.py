"""Answers through the API equal `videollama eval --task videoqa`'s predictions (greedy) on a small
held-out Shapes split: same prompt, same decoding of the video, same answer, same timestamps,
with the requests sent concurrently so that they share decode steps in the server's batch."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from serving import LiveServer, build_model_dir, data_url
from videollama.data import shapes_synth
from videollama.data.tokenizer import load_tokenizer
from videollama.eval.harness import evaluate
from videollama.model.videollama import VideoLlama
from videollama.serve.engine import Engine
from videollama.serve.limits import ServeLimits

pytestmark = [pytest.mark.usefixtures("no_hang"), pytest.mark.slow]
MAX_NEW = 8


def test_api_answers_equal_eval_predictions(tmp_path):
    model_dir = build_model_dir(tmp_path / "model")
    shapes_synth.synthesize(tmp_path / "shapes", train=0, eval=3, seed=0)
    data = tmp_path / "shapes" / "eval" / "videoqa.jsonl"
    model = VideoLlama.from_pretrained(model_dir)
    metrics = evaluate(model, load_tokenizer(model_dir), "videoqa", data, None, tmp_path / "eval",
                       batch_size=4, max_new_tokens=MAX_NEW, meteor=False, progress=False)
    records = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert metrics["evaluated"] == len(records) >= 9
    assert len({r["prediction"] for r in records}) > 1  # the model says different things to different items

    engine = Engine.from_model_dir(model_dir, limits=ServeLimits(max_batch=4))
    with LiveServer(engine) as live:
        client = live.client()
        videos = {r["video"]: data_url((data.parent / r["video"]).read_bytes()) for r in records}

        def ask(record):
            return client.chat.completions.create(model="model", max_tokens=MAX_NEW, temperature=0, messages=[
                {"role": "user", "content": [{"type": "video_url", "video_url": {"url": videos[record["video"]]}},
                                             {"type": "text", "text": record["question"]}]}])

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(ask, records))
    assert [a.choices[0].message.content for a in answers] == [r["prediction"] for r in records]
    assert [a.model_extra["frame_timestamps_s"] for a in answers] == [r["timestamps"] for r in records]
