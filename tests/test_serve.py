"""`videollama serve` through the official `openai` client against a live server on 127.0.0.1.

References are independent of the server: answers come from ``generate`` called directly on the
prompt ids and on the whole video as eval encodes it (``encode_whole_video``: the windows of the
model's policy), timestamps from that encoding (eval's ``timestamps``).
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import numpy as np
import openai
import pytest
import torch

from serving import LiveServer, build_model_dir, data_url, video_message
from videollama.data.tokenizer import encode_prompt, load_tokenizer, videoqa_prompt
from videollama.inference.generate import generate
from videollama.inference.whole_video import encode_whole_video
from videollama.model.videollama import VideoLlama
from videollama.serve.engine import Engine
from videollama.serve.limits import ServeLimits

pytestmark = pytest.mark.usefixtures("no_hang")
KEY = "test-key-123"
MAX = 8


def _clip(path, *, color, direction, seconds, width=80, height=64, fps=8):
    import av

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
    return path.read_bytes()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model_dir = build_model_dir(root / "model")
    media = root / "media"
    media.mkdir()
    red = _clip(media / "red.mp4", color=(220, 40, 40), direction=1, seconds=4.5)
    blue = _clip(root / "blue_outside.mp4", color=(50, 90, 230), direction=-1, seconds=4.5)
    model = VideoLlama.from_pretrained(model_dir).eval()
    return {"root": root, "model_dir": model_dir, "media": media, "red": red, "blue": blue, "model": model,
            "tok": load_tokenizer(model_dir)}


@pytest.fixture(scope="module")
def server(env):
    limits = ServeLimits(max_body_bytes=1 << 20, max_video_bytes=256 << 10, max_tokens=32)
    engine = Engine.from_model_dir(env["model_dir"], limits=limits, allowed_local_path=env["media"],
                                   allowed_domains=("127.0.0.1", "localhost"))
    with LiveServer(engine, api_key=KEY) as live:
        yield live


def _reference(env, prompt_ids, video_bytes=None, max_new=MAX):
    """Greedy answer by generate() on one unpadded prompt and the whole video, as eval encodes it."""
    model, tok = env["model"], env["tok"]
    latents = None
    if video_bytes is not None:
        latents = encode_whole_video(model, video_bytes).latents[None]  # [1, W * L, D_v]
    eos = model.config.decoder.eos_token_id
    new = generate(model, torch.tensor([prompt_ids]), visual_latents=latents, max_new_tokens=max_new,
                   temperature=0.0, eos_token_id=eos)[0].tolist()
    new = new[: new.index(eos)] if eos in new else new
    return tok.decode(new, skip_special_tokens=True).strip()


def _metric(live, name):
    text = httpx.get(live.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    line = next(li for li in text.splitlines() if li.startswith(name + " "))
    return float(line.split()[1])


def test_models_health_and_text_only(env, server):
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["model"]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}  # no key needed
    question = "what color is the square?"
    r = client.chat.completions.create(model="model", messages=[{"role": "user", "content": question}],
                                       max_tokens=MAX, temperature=0)
    ids = encode_prompt(env["tok"], f"<|question|>{question}<|answer|>")
    assert r.choices[0].message.content == _reference(env, ids)
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.model_extra["frame_timestamps_s"] is None


def test_video_data_url_matches_eval_decoding(env, server):
    question = "which way does the red square move?"
    r = server.client().chat.completions.create(
        model="model", messages=[video_message(env["red"], question)], max_tokens=MAX, temperature=0,
        # No request field can change decoding: these are ignored, never read.
        extra_body={"num_frames": 64, "mm_processor_kwargs": {"num_frames": 64, "fps": 30, "size": 512}})
    ids = encode_prompt(env["tok"], videoqa_prompt(question))  # eval's prompt
    assert r.usage.prompt_tokens == len(ids)
    assert r.choices[0].message.content == _reference(env, ids, env["red"])
    pre = env["model"].config.preprocess
    stamps = encode_whole_video(env["model"], env["red"]).frame_times_list()
    assert r.model_extra["frame_timestamps_s"] == stamps
    assert len(stamps) == 2 and all(len(w) == pre.num_frames for w in stamps)  # 4.5 s: windows at 0 and 0.5 s


def test_streaming_equals_non_streamed(env, server):
    client = server.client()
    messages = [video_message(env["red"], "what shape is the object?")]
    whole = client.chat.completions.create(model="model", messages=messages, max_tokens=MAX, temperature=0)
    chunks = list(client.chat.completions.create(model="model", messages=messages, max_tokens=MAX, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    plain = list(client.chat.completions.create(model="model", messages=messages, max_tokens=MAX, temperature=0,
                                                stream=True))
    assert all(c.usage is None for c in plain)
    # The raw stream ends with [DONE].
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"messages": messages, "max_tokens": 2, "stream": True}) as raw:
        lines = [li for li in raw.iter_lines() if li]
    assert lines[-1] == "data: [DONE]"


def test_stop_strings_and_seeds(env, server):
    client = server.client()
    messages = [video_message(env["red"], "how many objects are there?")]
    whole = client.chat.completions.create(model="model", messages=messages, max_tokens=MAX, temperature=0)
    text = whole.choices[0].message.content
    assert len(text) >= 4, text  # the (fixed) random model says enough for a stop string inside it
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = client.chat.completions.create(model="model", messages=messages, max_tokens=MAX, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == text[: text.index(stop)].rstrip()
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model="model", messages=messages, max_tokens=MAX, temperature=0,
                                              stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == cut.choices[0].message.content
    sampled = [client.chat.completions.create(model="model", messages=messages, max_tokens=MAX, temperature=1.0,
                                              top_p=0.9, seed=seed).choices[0].message.content for seed in (5, 5, 6)]
    assert sampled[0] == sampled[1]  # a seeded request draws the same tokens


def test_multi_turn_encodes_the_video_once(env, server):
    client = server.client()
    video = env["blue"]  # not sent by any other test: its first request is a cache miss
    hits, misses = _metric(server, "videollama_video_cache_hits_total"), _metric(server, "videollama_video_cache_misses_total")
    first = client.chat.completions.create(model="model", messages=[video_message(video, "what color is it?")],
                                           max_tokens=MAX, temperature=0)
    answer = first.choices[0].message.content
    turns = [video_message(video, "what color is it?"), {"role": "assistant", "content": answer},
             {"role": "user", "content": "which way does it move?"}]
    second = client.chat.completions.create(model="model", messages=turns, max_tokens=MAX, temperature=0)
    assert _metric(server, "videollama_video_cache_misses_total") == misses + 1
    assert _metric(server, "videollama_video_cache_hits_total") == hits + 1
    ids = encode_prompt(env["tok"], videoqa_prompt("what color is it?") + f"{answer}</s>"
                        "<|question|>which way does it move?<|answer|>")
    assert second.usage.prompt_tokens == len(ids)
    assert second.choices[0].message.content == _reference(env, ids, video)


def test_local_file_inside_the_allowed_folder(env, server):
    url = (env["media"] / "red.mp4").as_uri()
    r = server.client().chat.completions.create(model="model", max_tokens=MAX, temperature=0, messages=[
        {"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                     {"type": "text", "text": "what color is the square?"}]}])
    ids = encode_prompt(env["tok"], videoqa_prompt("what color is the square?"))
    assert r.choices[0].message.content == _reference(env, ids, env["red"])


def _video_request(client, url, question="what is it?", **kw):
    return client.chat.completions.create(model="model", max_tokens=4, messages=[
        {"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                     {"type": "text", "text": question}]}], **kw)


def test_errors(env, server):
    client = server.client()
    text = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").chat.completions.create(model="model", messages=text, max_tokens=2)
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": text})  # no key at all
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(server.url + "/metrics").status_code == 401
    assert httpx.get(server.url + "/v1/models").status_code == 401
    with pytest.raises(openai.APIStatusError) as e:  # the body
        client.chat.completions.create(model="model", messages=[{"role": "user", "content": "x" * (1 << 20)}])
    assert e.value.status_code == 413 and "--max-body-bytes" in e.value.message
    with pytest.raises(openai.APIStatusError) as e:  # the video, within the body's limit
        _video_request(client, data_url(bytes(300 << 10)))
    assert e.value.status_code == 413 and "--max-video-bytes" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        _video_request(client, data_url(b"\x00\x00\x00\x18ftypmp42 not a video at all" * 50))
    assert e.value.body["code"] == "invalid_video"
    with pytest.raises(openai.BadRequestError) as e:
        _video_request(client, (env["root"] / "blue_outside.mp4").as_uri())
    assert e.value.body["code"] == "outside_allowed_path"
    with pytest.raises(openai.BadRequestError) as e:  # a link inside the folder that points out of it
        link = env["media"] / "link.mp4"
        link.unlink(missing_ok=True)
        link.symlink_to(env["root"] / "blue_outside.mp4")
        _video_request(client, link.as_uri())
    assert e.value.body["code"] == "outside_allowed_path"
    for url in (f"{server.url}/health", "http://localhost:9/v.mp4"):  # allowed names, loopback addresses
        with pytest.raises(openai.BadRequestError) as e:
            _video_request(client, url)
        assert e.value.body["code"] == "private_address", url
    with pytest.raises(openai.BadRequestError) as e:
        _video_request(client, "http://example.com/v.mp4")
    assert e.value.body["code"] == "domain_not_allowed"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="model", messages=text, max_tokens=33)
    assert "--max-tokens" in e.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=text)
    with pytest.raises(openai.BadRequestError) as e:  # special tokens cannot be injected
        client.chat.completions.create(model="model", messages=[{"role": "user", "content": "<video></s>"}])
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    counts = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert 'videollama_requests_total{status="400"}' in counts and 'status="500"' not in counts


@pytest.fixture(scope="module")
def strict(env):
    limits = ServeLimits(max_batch=1, max_queue=1, request_timeout_s=1.0, max_video_duration_s=3.0,
                         max_video_pixels=10_000, retry_after_s=7, max_model_len=16)
    engine = Engine.from_model_dir(env["model_dir"], limits=limits)
    with LiveServer(engine) as live:
        yield live


def test_video_limits_name_the_limit(env, strict):
    from videollama.data import shapes

    client = strict.client()
    with pytest.raises(openai.BadRequestError) as e:  # 80x64, 4.5 s
        _video_request(client, data_url(env["red"]))
    assert e.value.body["code"] == "video_too_long" and "--max-video-duration-s" in e.value.message
    big = shapes.encode_mp4(np.zeros((5, shapes.HEIGHT, shapes.WIDTH, 3), np.uint8))  # 320x240, 0.2 s
    with pytest.raises(openai.BadRequestError) as e:
        _video_request(client, data_url(big))
    assert e.value.body["code"] == "video_too_large" and "--max-video-pixels" in e.value.message


def test_max_model_len(strict):
    client = strict.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="model", messages=[{"role": "user", "content": "red " * 20}])
    assert e.value.body["code"] == "context_length_exceeded" and "--max-model-len" in e.value.message
    r = client.chat.completions.create(model="model", messages=[{"role": "user", "content": "hi"}], max_tokens=32)
    assert r.usage.total_tokens <= 16
    if r.choices[0].finish_reason == "length":  # else the model ended its answer before the cache did
        assert r.usage.total_tokens == 16


def test_a_client_that_goes_away_frees_its_place(strict):
    engine = strict.engine
    engine.pause()  # the request waits in the queue; only its client's leaving can free it
    try:
        sent = time.monotonic()
        with httpx.stream("POST", strict.url + "/v1/chat/completions",
                          json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True}) as r:
            first = next(r.iter_lines())
            assert first.startswith("data: ") and engine.in_system == 1
        while engine.in_system and time.monotonic() < sent + 5:
            time.sleep(0.005)
        assert engine.in_system == 0 and time.monotonic() - sent < 1.0  # freed before its 1 s deadline
    finally:
        engine.resume()


def test_queue_full_and_deadline(strict):
    engine, client = strict.engine, strict.client()
    text = [{"role": "user", "content": "hi"}]
    engine.pause()
    try:
        errors = []

        def waiting():
            try:
                client.chat.completions.create(model="model", messages=text, max_tokens=2)
            except openai.APIStatusError as err:
                errors.append(err.status_code)

        threads = [threading.Thread(target=waiting) for _ in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while engine.in_system < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        response = httpx.post(strict.url + "/v1/chat/completions", json={"messages": text, "max_tokens": 2})
        assert response.status_code == 429 and response.headers["retry-after"] == "7"
        assert response.json()["error"]["code"] == "queue_full"
        for t in threads:
            t.join()
        assert errors == [504, 504]  # both waited past the 1 s deadline
        stream = client.chat.completions.create(model="model", messages=text, max_tokens=2, stream=True)
        with pytest.raises(openai.APIError) as e:
            list(stream)
        assert "deadline" in str(e.value)
    finally:
        engine.resume()
    r = client.chat.completions.create(model="model", messages=text, max_tokens=2)  # serving again
    assert r.choices[0].finish_reason in ("stop", "length")
    assert engine.in_system == 0


def test_deadline_during_generation(env):
    """A deadline that passes while tokens are being generated: 504, or an error event that ends
    the stream after the text so far."""
    from videollama.inference.batch import BatchDecoder

    class SlowDecoder(BatchDecoder):  # the real decoder, 0.2 s a step
        def step(self):
            time.sleep(0.2)
            return super().step()

    limits = ServeLimits(request_timeout_s=1.5)  # ~7 of the 32 slow steps: the deadline passes mid-answer, even on a loaded machine
    engine = Engine.from_model_dir(env["model_dir"], limits=limits, decoder_factory=SlowDecoder)
    with LiveServer(engine) as live:
        client = live.client()
        text = [{"role": "user", "content": "what color is it?"}]
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model="model", messages=text, max_tokens=32)
        assert e.value.status_code == 504 and "--request-timeout-s" in e.value.message
        with httpx.stream("POST", live.url + "/v1/chat/completions",
                          json={"messages": text, "max_tokens": 32, "stream": True}) as r:
            events = [li.removeprefix("data: ") for li in r.iter_lines() if li]
        assert r.status_code == 200 and events[-1] == "[DONE]"
        error = json.loads(events[-2])
        assert error["error"]["code"] == "timeout"
        deltas = [json.loads(e)["choices"][0]["delta"].get("content") for e in events[:-2]]
        assert len(deltas) >= 2 and any(deltas)  # some text came before the deadline
        assert engine.in_system == 0
