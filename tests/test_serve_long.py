"""`videollama serve` on long videos, through the official `openai` client against a live server:
the whole video under the model's policy (the windows that tile it, or ``max_windows`` spread
over it), every frame's timestamp in the response, rows of different lengths in one batch; and
the hostile declarations (a thousand hours, sixty million frames, a decoder that lies about its
windows) refused or capped before anything sized by them is allocated.

References are independent of the server: ``encode_whole_video`` (what eval and generate use) and
``generate`` on its latents; the windows from ``window_starts`` on PyAV's own duration.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from badvideos import encode_video, mp4_claiming_frames
from serving import LiveServer, build_model_dir, video_message
from videollama.data import shapes_long
from videollama.data.tokenizer import encode_prompt, load_tokenizer, videoqa_prompt
from videollama.data.windows import open_windows, window_starts
from videollama.inference.generate import generate
from videollama.inference.whole_video import encode_whole_video
from videollama.model.videollama import VideoLlama
from videollama.serve.engine import Engine
from videollama.serve.frames import check_opening
from videollama.serve.limits import APIError, ServeLimits

pytestmark = [pytest.mark.usefixtures("no_hang"), pytest.mark.slow]
MAX = 8
HOUR = 3600.0


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-long")
    model_dir = build_model_dir(root / "model")
    spec = shapes_long.sample_long_spec(random.Random(0), 40)  # 40 s: 10 windows of 4 s needed, 8 allowed
    model = VideoLlama.from_pretrained(model_dir).eval()
    return {"model_dir": model_dir, "model": model, "tok": load_tokenizer(model_dir), "spec": spec,
            "long": shapes_long.encode_video(spec),
            "short": shapes_long.encode_video(shapes_long.sample_long_spec(random.Random(1), 20))}


def reference(env, video: bytes, question: str) -> tuple[str, list[list[float]]]:
    """eval's answer (greedy, unpadded) and timestamps for one question about ``video``."""
    model, tok = env["model"], env["tok"]
    encoded = encode_whole_video(model, video)
    ids = encode_prompt(tok, videoqa_prompt(question))
    eos = model.config.decoder.eos_token_id
    new = generate(model, torch.tensor([ids]), visual_latents=encoded.latents[None], max_new_tokens=MAX,
                   eos_token_id=eos)[0].tolist()
    new = new[: new.index(eos)] if eos in new else new
    return tok.decode(new, skip_special_tokens=True).strip(), encoded.frame_times_list()


def test_long_video_answered_whole_with_every_frame_timestamp(env):
    pre = env["model"].config.preprocess
    with open_windows(env["long"], pre) as whole:  # PyAV's own duration and the policy's windows
        duration = whole.duration
    starts = window_starts(duration, pre.window_s, pre.max_windows)
    assert duration >= 39 and len(starts) == pre.max_windows == 8  # spread: 40 s would take 10 tiles
    long_q = shapes_long.questions(env["spec"])[0]["question"]
    short_q = "when does the red square move?"
    expected = {"long": reference(env, env["long"], long_q), "short": reference(env, env["short"], short_q)}

    engine = Engine.from_model_dir(env["model_dir"], limits=ServeLimits(max_batch=2, max_tokens=MAX))
    with LiveServer(engine) as live:
        client = live.client()

        def ask(which: str, question: str):
            return client.chat.completions.create(model="model", messages=[video_message(env[which], question)],
                                                  max_tokens=MAX, temperature=0)

        # Once both are encoded, ask them together: one batch of rows reading 8 and 5 windows.
        ask("long", long_q), ask("short", short_q)
        engine.pause()
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(ask, "long", long_q), pool.submit(ask, "short", short_q)]
            while len(engine._waiting) < 2:
                time.sleep(0.01)
            engine.resume()
            answers = dict(zip(("long", "short"), (f.result() for f in futures)))
    for which, r in answers.items():
        text, stamps = expected[which]
        assert r.choices[0].message.content == text, which
        assert r.model_extra["frame_timestamps_s"] == stamps, which
    stamps = answers["long"].model_extra["frame_timestamps_s"]
    assert [w[0] for w in stamps] == [round(s, 4) for s in starts]  # every window, at the policy's start
    assert all(len(w) == pre.num_frames for w in stamps)  # and every frame of each
    assert len(answers["short"].model_extra["frame_timestamps_s"]) == 5  # 20 s: 5 windows tile it
    assert engine.cache.hits >= 2


def test_hostile_declarations_refused_or_capped(env):
    limits = ServeLimits(max_tokens=4, max_video_duration_s=3 * HOUR, decode_timeout_s=60, request_timeout_s=120)
    engine = Engine.from_model_dir(env["model_dir"], limits=limits)
    pre = engine.model.config.preprocess
    thousand_hours = encode_video(num_frames=2, pts=[0, int(1000 * HOUR * 25)], fmt="matroska")  # mp4's 32 bits wrap
    two_hours = encode_video(num_frames=2, pts=[0, int(2 * HOUR * 25)])
    with LiveServer(engine) as live:
        client = live.client()
        for name, video, code in (("a thousand hours", thousand_hours, "video_too_long"),
                                  ("sixty million frames", mp4_claiming_frames(), "invalid_video")):
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(model="model", messages=[video_message(video, "what?")], max_tokens=4)
            assert e.value.status_code == 400 and e.value.body["code"] == code, (name, e.value.body)
        # Two hours, within the server's limit: the policy caps it at max_windows windows.
        r = client.chat.completions.create(model="model", messages=[video_message(two_hours, "what?")], max_tokens=4)
        stamps = r.model_extra["frame_timestamps_s"]
        with open_windows(two_hours, pre) as whole:
            assert abs(whole.duration - 2 * HOUR) < 1
            starts = window_starts(whole.duration, pre.window_s, pre.max_windows)
        assert [w[0] for w in stamps] == [round(s, 4) for s in starts]
        assert len(stamps) == pre.max_windows and all(len(w) == pre.num_frames for w in stamps)
        assert httpx.get(live.url + "/health").json() == {"status": "ok"}
    assert engine.in_system == 0 and len(engine.cache) == 1


def test_a_decoder_that_lies_about_its_windows_is_refused():
    """What the sandboxed child says is checked before anything is sized by it."""
    from videollama.config import VideoLlamaConfig

    pre = VideoLlamaConfig.from_name("tiny").preprocess
    limits = ServeLimits(max_video_duration_s=600)
    assert check_opening({"duration": 40.0, "windows": 8}, pre, limits) == (40.0, window_starts(40.0, 4.0, 8))
    for header in ({"duration": 40.0, "windows": 1_000_000}, {"duration": 40.0, "windows": 10},
                   {"duration": 1000 * HOUR, "windows": 8}, {"duration": float("nan"), "windows": 8},
                   {"duration": -1.0, "windows": 1}, {"duration": "40", "windows": 8}, {"windows": 8}):
        with pytest.raises(APIError) as e:
            check_opening(header, pre, limits)
        assert e.value.status == 400, header
