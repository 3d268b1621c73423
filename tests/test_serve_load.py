"""A load test on loopback: many concurrent clients, good and hostile requests mixed. Every request
gets a correct answer (against generate() called directly) or a clear OpenAI-style error; no 500,
none lost (the server's own count agrees), and the server's memory stays bounded."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from badvideos import BAD_VIDEOS
from serving import LiveServer, build_model_dir, video_message
from videollama.data import load_clip, shapes
from videollama.data.tokenizer import encode_prompt, load_tokenizer, videoqa_prompt
from videollama.inference.generate import generate
from videollama.model.videollama import VideoLlama
from videollama.serve.engine import Engine
from videollama.serve.limits import ServeLimits

pytestmark = [pytest.mark.usefixtures("no_hang"), pytest.mark.slow]
KEY = "load-key"
MAX_NEW = 6
ROUNDS, CLIENTS = 3, 12


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _reference(model, tok, question, video):
    ids = encode_prompt(tok, videoqa_prompt(question) if video is not None else f"<|question|>{question}<|answer|>")
    frames = None
    if video is not None:
        pre = model.config.preprocess
        frames = load_clip(video, num_frames=pre.num_frames, fps=pre.fps, size=pre.size, mean=pre.mean,
                           std=pre.std)[0][None]
    eos = model.config.decoder.eos_token_id
    new = generate(model, torch.tensor([ids]), frames, max_new_tokens=MAX_NEW, eos_token_id=eos)[0].tolist()
    return tok.decode(new[: new.index(eos)] if eos in new else new, skip_special_tokens=True).strip()


def test_mixed_load(tmp_path):
    model_dir = build_model_dir(tmp_path / "model")
    model, tok = VideoLlama.from_pretrained(model_dir), load_tokenizer(model_dir)
    clips = [shapes.encode_mp4(shapes.iter_frames(shapes.sample_clip_spec(random.Random(s)))) for s in (1, 2)]
    questions = ["what color is the circle?", "which way does the object move?"]
    good = [(q, i) for i in range(len(clips)) for q in questions] + [("how many objects are there?", None)]
    expected = {(q, i): _reference(model, tok, q, None if i is None else clips[i]) for q, i in good}
    bad_videos = [make() for make, _ in list(BAD_VIDEOS.values())[:6]]

    def requests_of_round():
        reqs = []
        for q, i in good:
            msg = video_message(clips[i], q) if i is not None else {"role": "user", "content": q}
            reqs.append(("good", (q, i), {"messages": [msg]}))
        for v in bad_videos:
            reqs.append(("bad", None, {"messages": [video_message(v, "what?")]}))
        reqs += [
            ("bad", None, {"messages": [video_message(b"\x00" * 4000, "what?")]}),
            ("bad", None, {"messages": [video_message(bytes(300 << 10), "what?")]}),  # 413
            ("bad", None, {"messages": [{"role": "user", "content": [
                {"type": "video_url", "video_url": {"url": "http://127.0.0.1:1/x.mp4"}}, {"type": "text", "text": "q"}]}]}),
            ("bad", None, {"messages": [{"role": "user", "content": [
                {"type": "video_url", "video_url": {"url": "file:///etc/passwd"}}, {"type": "text", "text": "q"}]}]}),
            ("bad", None, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10_000}),
            ("bad", None, {"messages": []}),
            ("bad", None, "not json"),
            ("unauthorised", None, {"messages": [{"role": "user", "content": "hi"}]}),
        ]
        return reqs

    limits = ServeLimits(max_batch=4, max_queue=8, max_video_bytes=256 << 10, max_tokens=64, request_timeout_s=60)
    engine = Engine.from_model_dir(model_dir, limits=limits, allowed_domains=("127.0.0.1",))
    with LiveServer(engine, api_key=KEY) as live, httpx.Client(timeout=120) as http:
        def send(req):
            kind, ref, body = req
            headers = {} if kind == "unauthorised" else {"Authorization": f"Bearer {KEY}"}
            body = {"max_tokens": MAX_NEW, "temperature": 0, **body} if isinstance(body, dict) else body
            kwargs = {"json": body} if isinstance(body, dict) else {"content": body.encode()}
            r = http.post(live.url + "/v1/chat/completions", headers=headers, **kwargs)
            return kind, ref, r.status_code, r.json()

        results, rss = [], []
        for round_ in range(ROUNDS):
            reqs = requests_of_round()
            random.Random(round_).shuffle(reqs)
            with ThreadPoolExecutor(CLIENTS) as pool:
                results += list(pool.map(send, reqs))
            rss.append(_rss_bytes())
        text = http.get(live.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text

    assert len(results) == ROUNDS * len(requests_of_round())  # none lost
    answered = 0
    for kind, ref, status, body in results:
        assert status < 500, body
        if status == 200:
            assert kind == "good" and body["choices"][0]["message"]["content"] == expected[ref]
            answered += 1
        else:
            assert set(body) == {"error"} and body["error"]["message"] and body["error"]["type"], body
            assert status in ({401} if kind == "unauthorised" else {400, 413, 429} if kind == "bad" else {429})
    assert answered >= ROUNDS * len(good) // 2
    # The server counted every authorised request once, by status.
    counted = sum(float(li.split()[1]) for li in text.splitlines() if li.startswith("videollama_requests_total{"))
    assert counted == sum(1 for r in results if r[2] != 401)
    assert 'status="500"' not in text
    # Memory: after the first round (model, decode workers and caches warm) it does not keep growing.
    assert rss[-1] - rss[0] < 200 << 20, rss
    assert engine.cache.nbytes <= limits.cache_bytes and len(engine.cache) <= 2
