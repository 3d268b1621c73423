"""Hostile and careless clients against `videollama serve` on 127.0.0.1: Host and Origin (DNS
rebinding), one video per request, bodies that stall, JSON that swells when parsed, deadlines that
cover waiting for a decode worker, sampling values that do not decode, a row that fails in a
decode step, malformed URLs, and every error as OpenAI's JSON, counted in /metrics (read with
prometheus_client's own parser)."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import shapes_clip
from serving import LiveServer, build_model_dir, video_message
from videollama.serve import engine as engine_module
from videollama.serve.engine import Engine
from videollama.serve.guard import allowed_hosts
from videollama.serve.limits import ServeLimits

pytestmark = pytest.mark.usefixtures("no_hang")
TEXT = [{"role": "user", "content": "what color is it?"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("hostile") / "model")


@pytest.fixture(scope="module")
def clip() -> bytes:
    return shapes_clip(4)


def chat(live, body, **kwargs) -> httpx.Response:
    return httpx.post(live.url + "/v1/chat/completions", json=body, timeout=30, **kwargs)


def scrape(live, key: str | None = None) -> dict[tuple[str, tuple], float]:
    """/metrics as {(sample name, sorted labels): value}, parsed by prometheus_client."""
    from prometheus_client.parser import text_string_to_metric_families

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    text = httpx.get(live.url + "/metrics", headers=headers).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def responses(metrics, route: str, status: int) -> float:
    return metrics.get(("videollama_http_responses_total", (("route", route), ("status", str(status)))), 0.0)


def test_host_and_origin_must_name_this_server(model_dir):
    """DNS rebinding: a page on attacker.example whose name now points at 127.0.0.1 sends its own
    name as Host; a cross-site POST carries its Origin. Both are refused before any route."""
    engine = Engine.from_model_dir(model_dir, limits=ServeLimits(max_tokens=4))
    with LiveServer(engine) as live:
        r = httpx.get(live.url + "/v1/models", headers={"Host": f"attacker.example:{live.port}"})
        assert r.status_code == 421 and r.json()["error"]["code"] == "host_not_allowed"
        r = httpx.post(live.url + "/v1/chat/completions", content=json.dumps({"messages": TEXT, "max_tokens": 2}),
                       headers={"Origin": "http://attacker.example", "Content-Type": "text/plain"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
        assert httpx.get(live.url + "/health", headers={"Origin": "null"}).status_code == 403
        for host in (f"localhost:{live.port}", f"[::1]:{live.port}", "127.0.0.1"):
            assert httpx.get(live.url + "/v1/models", headers={"Host": host}).status_code == 200, host
        same_origin = {"Origin": f"http://localhost:{live.port}"}
        assert chat(live, {"messages": TEXT, "max_tokens": 2}, headers=same_origin).status_code == 200
        metrics = scrape(live)
        assert responses(metrics, "/v1/models", 421) == 1 and responses(metrics, "/v1/chat/completions", 403) == 1
        assert responses(metrics, "/health", 403) == 1
    named = Engine.from_model_dir(model_dir)
    with LiveServer(named, hosts=allowed_hosts("127.0.0.1", ["videos.internal"])) as live:
        assert httpx.get(live.url + "/health", headers={"Host": "videos.internal:80"}).status_code == 200
        assert httpx.get(live.url + "/health", headers={"Host": "other.internal"}).status_code == 421


def test_one_video_per_request_is_counted_before_reading(model_dir, clip, tmp_path):
    """A 2 KB request naming one allowed file:// video 25 times reads it once; two different
    sources are refused before either is read."""
    (tmp_path / "clip.mp4").write_bytes(clip)
    engine = Engine.from_model_dir(model_dir, limits=ServeLimits(max_tokens=4), allowed_local_path=tmp_path)
    reads = []
    read = engine.video_from_part
    engine.video_from_part = lambda part, *args: reads.append(part) or read(part, *args)
    url = (tmp_path / "clip.mp4").as_uri()
    with LiveServer(engine) as live:
        parts = [{"type": "video_url", "video_url": {"url": url}}] * 25 + [{"type": "text", "text": "what?"}]
        body = {"messages": [{"role": "user", "content": parts}], "max_tokens": 2}
        assert len(json.dumps(body)) < 4096
        r = chat(live, body)
        assert r.status_code == 200, r.text
        assert len(reads) == 1
        other = url.replace("/clip.mp4", "/./clip.mp4")  # the same file, another source
        parts = [{"type": "video_url", "video_url": {"url": u}} for u in (url, other)] + [{"type": "text", "text": "?"}]
        r = chat(live, {"messages": [{"role": "user", "content": parts}], "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["code"] == "one_video_only"
        assert len(reads) == 1


def _send_head(port: int, declared: int, body: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json"
                 f"\r\nContent-Length: {declared}\r\n\r\n".encode() + body)
    return sock


def _status(sock: socket.socket) -> tuple[int, dict]:
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_stalled_bodies_hold_a_bounded_share_for_a_bounded_time(model_dir):
    """Clients that declare a large body, send part of it and stall: the bytes in flight are
    capped for all clients together (the next is refused at once, before its body is read), and
    each stalled body ends with a 408 at the body timeout, giving its share back."""
    limits = ServeLimits(max_body_bytes=1 << 20, max_inflight_body_bytes=2 << 20, body_timeout_s=2.0, max_tokens=4)
    engine = Engine.from_model_dir(model_dir, limits=limits)
    with LiveServer(engine) as live:
        guard = live.server.config.app
        declared, sent = 900_000, b'{"messages": "' + b"x" * 600_000
        stalled = [_send_head(live.port, declared, sent) for _ in range(2)]
        deadline = time.monotonic() + 20
        while guard.budget.used < 2 * declared and time.monotonic() < deadline:
            time.sleep(0.01)
        assert guard.budget.used == 2 * declared
        refused = [_send_head(live.port, declared, sent) for _ in range(2)]
        for sock in refused:
            status, body = _status(sock)
            assert status == 503 and body["error"]["code"] == "server_busy"
        assert httpx.get(live.url + "/health", timeout=5).status_code == 200
        for sock in stalled:
            status, body = _status(sock)
            assert status == 408 and body["error"]["code"] == "body_timeout"
        for sock in stalled + refused:
            sock.close()
        assert guard.budget.used == 0
        assert chat(live, {"messages": TEXT, "max_tokens": 2}).status_code == 200
        metrics = scrape(live)
        assert responses(metrics, "/v1/chat/completions", 503) == 2
        assert responses(metrics, "/v1/chat/completions", 408) == 2


def test_json_that_swells_when_parsed_is_refused_first(model_dir):
    """Bodies small on the wire but large as Python objects ({} by the hundred thousand, a list
    of zeros, deep nesting) are counted before parsing and refused with a 400."""
    limits = ServeLimits(max_json_items=10_000, max_tokens=4)
    engine = Engine.from_model_dir(model_dir, limits=limits)
    with LiveServer(engine) as live:
        for body in (b'{"messages": [' + b"{}," * 300_000 + b"{}]}", b'{"messages": [' + b"0," * 300_000 + b"0]}",
                     b"[" * 200_000 + b"]" * 200_000):
            r = httpx.post(live.url + "/v1/chat/completions", content=body, timeout=30)
            assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_json_items", r.text[:200]
        assert chat(live, {"messages": TEXT * 9 + [{"role": "user", "content": "a, b, c"}], "max_tokens": 2}).status_code == 200


def test_the_deadline_covers_waiting_for_a_decode_worker(model_dir, clip):
    """A request whose video waits for a decode worker past its deadline ends with a 504 at the
    deadline; it held no thread while waiting, and leaves nothing behind."""
    limits = ServeLimits(request_timeout_s=1.0, decode_workers=1, max_tokens=4)
    engine = Engine.from_model_dir(model_dir, limits=limits)
    with LiveServer(engine) as live:
        engine.videos.decode_slots.acquire()  # every decode worker busy
        try:
            r = chat(live, {"messages": [video_message(clip, "what?")], "max_tokens": 2})
        finally:
            engine.videos.decode_slots.release()
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        assert engine.in_system == 0
        r = chat(live, {"messages": [video_message(clip, "what?")], "max_tokens": 2})
        assert r.status_code == 200, r.text


def test_sampling_values_that_do_not_decode(model_dir):
    """A denormal temperature decodes greedily (its answer is the greedy one), never failing the
    rows batched with it; NaN, infinities, top_p 0 and seeds torch cannot take are 400s."""
    engine = Engine.from_model_dir(model_dir, limits=ServeLimits(max_tokens=8, max_batch=6))
    with LiveServer(engine) as live:
        greedy = chat(live, {"messages": TEXT, "max_tokens": 8, "temperature": 0}).json()
        bodies = [{"messages": TEXT, "max_tokens": 8, "temperature": 0}] * 5 + [
            {"messages": TEXT, "max_tokens": 8, "temperature": 1.9e-39}]
        engine.pause()  # all six join one batch
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(chat, live, body) for body in bodies]
            while engine.in_system < 6:
                time.sleep(0.01)
            engine.resume()
            replies = [f.result() for f in futures]
        assert [r.status_code for r in replies] == [200] * 6, [r.text for r in replies]
        texts = {r.json()["choices"][0]["message"]["content"] for r in replies}
        assert texts == {greedy["choices"][0]["message"]["content"]}
        assert chat(live, {"messages": TEXT, "max_tokens": 2, "temperature": 1.0, "top_p": 1e-320}).status_code == 200
        assert chat(live, {"messages": TEXT, "max_tokens": 2, "temperature": 5e-324}).status_code == 200
        assert chat(live, {"messages": TEXT, "max_tokens": 2, "temperature": 1, "seed": (1 << 64) - 1}).status_code == 200
        raw = '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, %s}'
        for field, value in (("temperature", "NaN"), ("temperature", "Infinity"), ("temperature", "-1e-39"),
                             ("top_p", "NaN"), ("top_p", "0"), ("seed", str(1 << 70)), ("seed", str(-(1 << 70)))):
            r = httpx.post(live.url + "/v1/chat/completions", content=raw % f'"{field}": {value}', timeout=30)
            assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, value, r.text)
        assert ("videollama_requests_total", (("status", "500"),)) not in scrape(live)


class _PoisonedDecoder:
    """The real decoder, whose step fails while a row sampled at POISON is in the batch."""

    POISON = 0.777

    def __init__(self, inner) -> None:
        self.inner, self.temperatures = inner, {}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def add(self, prompt_ids, **kwargs):
        slot, token = self.inner.add(prompt_ids, **kwargs)
        self.temperatures[slot] = kwargs["temperature"]
        return slot, token

    def remove(self, slot) -> None:
        self.temperatures.pop(slot, None)
        self.inner.remove(slot)

    def step(self):
        if self.POISON in self.temperatures.values():
            raise FloatingPointError("this row's sampling failed")
        return self.inner.step()


def test_a_row_that_fails_in_a_decode_step_fails_alone(model_dir):
    def factory(model, **kwargs):
        return _PoisonedDecoder(engine_module._default_decoder(model, **kwargs))

    engine = Engine.from_model_dir(model_dir, limits=ServeLimits(max_tokens=8, max_batch=6), decoder_factory=factory)
    with LiveServer(engine) as live:
        alone = chat(live, {"messages": TEXT, "max_tokens": 8}).json()["choices"][0]["message"]["content"]
        bodies = [{"messages": TEXT, "max_tokens": 8}] * 5 + [
            {"messages": TEXT, "max_tokens": 8, "temperature": _PoisonedDecoder.POISON}]
        engine.pause()
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(chat, live, body) for body in bodies]
            while engine.in_system < 6:
                time.sleep(0.01)
            engine.resume()
            replies = [f.result() for f in futures]
        assert [r.status_code for r in replies] == [200] * 5 + [500], [r.text for r in replies]
        assert {r.json()["choices"][0]["message"]["content"] for r in replies[:5]} == {alone}
        assert replies[5].json()["error"]["code"] == "decode_failed"
        assert engine.in_system == 0


def test_malformed_urls_and_unhandled_errors_are_json_and_counted(model_dir, tmp_path, monkeypatch):
    engine = Engine.from_model_dir(model_dir, limits=ServeLimits(max_tokens=4), allowed_local_path=tmp_path,
                                   allowed_domains=("127.0.0.1", "localhost"))
    key = "k-123"
    auth = {"Authorization": f"Bearer {key}"}
    with LiveServer(engine, api_key=key) as live:
        for url in ("file:///a%00b.mp4", f"{tmp_path.as_uri()}/%ff.mp4", "http://127.0.0.1:99999/v.mp4",
                    "http://[::1/x", "http://localhost:0x50/v.mp4"):
            body = {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                                              {"type": "text", "text": "?"}]}]}
            r = chat(live, body, headers=auth)
            assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", (url, r.text)
        assert chat(live, {"messages": TEXT}).status_code == 401  # no key
        for method, path in (("GET", "/v1/chat/completions"), ("GET", "/nothing"), ("DELETE", "/v1/models")):
            r = httpx.request(method, live.url + path, headers=auth)
            assert r.status_code in (404, 405) and r.json()["error"]["message"], (method, path, r.text)

        def broken(messages):
            raise RuntimeError("a bug of ours")

        monkeypatch.setattr(engine, "build_prompt", broken)
        r = chat(live, {"messages": TEXT}, headers=auth)
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
        metrics = scrape(live, key)
        assert metrics[("videollama_requests_total", (("status", "500"),))] == 1
        assert metrics[("videollama_requests_total", (("status", "400"),))] == 5
        assert responses(metrics, "/v1/chat/completions", 401) == 1
        assert responses(metrics, "/v1/chat/completions", 500) == 1


def test_limits_past_their_bounds_are_refused():
    for bad in ({"max_batch": 1_000_000}, {"request_timeout_s": float("nan")}, {"fetch_timeout_s": -1.0},
                {"decode_timeout_s": float("inf")}, {"max_inflight_body_bytes": 1, "max_body_bytes": 2}):
        with pytest.raises(ValueError, match="serve limit"):
            ServeLimits(**bad)
