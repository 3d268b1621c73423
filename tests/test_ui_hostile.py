"""Hostile clients against `videollama chat`, through Gradio's real HTTP routes (upload, queue
join, queue data: what the browser and gradio_client send), never through our Python functions.

A Gradio event names its input file by a ``FileData`` path the client sends back, so a client can
name any path: a video or a secret outside the uploads, ``/dev/zero``, a FIFO, a URL. The page
must read only what it received as an upload. The server beside it must check Host and Origin,
and its API must ask for the API key as ``videollama serve`` does (the page: Gradio's login).
"""

from __future__ import annotations

import json
import os
import time

import httpx
import pytest

from conftest import shapes_clip
from serving import build_model_dir
from videollama.data.windows import load_windows

pytestmark = pytest.mark.usefixtures("no_hang")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from videollama.serve.engine import Engine
    from videollama.serve.limits import ServeLimits

    model_dir = build_model_dir(tmp_path_factory.mktemp("ui-hostile") / "model")
    engine = Engine.from_model_dir(model_dir, limits=ServeLimits(max_tokens=8, decode_timeout_s=20)).start()
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def clip() -> bytes:
    return shapes_clip(5)


@pytest.fixture
def page(engine, tmp_path, monkeypatch):
    """The chat page and API (no key) on 127.0.0.1; its upload folder under tmp_path."""
    from videollama.serve.ui import serving

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    with serving(engine, port=0) as url:
        yield url


def file_data(path: str) -> dict:
    return {"path": path, "meta": {"_type": "gradio.FileData"}, "orig_name": "clip.mp4"}


def upload(url: str, data: bytes, client: httpx.Client | None = None) -> str:
    """Upload through Gradio's own route, as the browser does: the path Gradio gives back."""
    r = (client or httpx).post(url + "gradio_api/upload", files={"files": ("clip.mp4", data, "video/mp4")}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()[0]


def call(url: str, api_name: str, data: list, client: httpx.Client | None = None) -> dict:
    """One event through Gradio's queue (join, then the session's event stream): its
    ``process_completed`` message."""
    http = client or httpx.Client()
    config = http.get(url + "config", timeout=30).json()
    fn_index = next(d["id"] for d in config["dependencies"] if d["api_name"] == api_name)
    session = f"s{time.monotonic_ns()}"
    body = {"data": data, "fn_index": fn_index, "session_hash": session, "event_data": None, "trigger_id": None}
    joined = http.post(url + "gradio_api/queue/join", timeout=30, content=json.dumps(body),  # NaN as JSON does not
                       headers={"Content-Type": "application/json"})
    assert joined.status_code == 200, joined.text
    with http.stream("GET", url + f"gradio_api/queue/data?session_hash={session}", timeout=60) as events:
        for line in events.iter_lines():
            if line.startswith("data: "):
                message = json.loads(line[6:])
                if message.get("msg") == "process_completed":
                    return message
    raise AssertionError("the event never completed")


def preview(url: str, path: str, client=None) -> tuple[list, str, dict]:
    """The gallery and status the page shows for a video ``path``."""
    message = call(url, "on_preview", [file_data(path)], client)
    if not message["success"]:
        return [], str(message["output"].get("error")), message
    gallery, status = message["output"]["data"]
    return gallery or [], status, message


def last_answer(message: dict) -> str:
    """The text of the chat's last message in a ``respond`` event's output."""
    content = message["output"]["data"][1][-1]["content"]
    if isinstance(content, list):  # Gradio's message parts
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content


def cached_copies(tmp_path, data: bytes) -> list[str]:
    found = []
    for root, _, files in os.walk(tmp_path / "gradio"):
        for name in files:
            path = os.path.join(root, name)
            if os.path.getsize(path) == len(data) and open(path, "rb").read() == data:
                found.append(path)
    return found


def test_preview_reads_uploads_and_nothing_else(page, clip, tmp_path, engine):
    gallery, status, _ = preview(page, upload(page, clip))
    windows, _ = load_windows(clip, engine.model.config.preprocess)  # [W, F, 3, S, S]: every frame of the video's windows
    assert len(gallery) == windows.shape[0] * windows.shape[1] and status.startswith("The model sees")

    outside = tmp_path / "private" / "secret.mp4"  # a video on the machine, never uploaded
    outside.parent.mkdir()
    outside.write_bytes(clip[:-1] + b"\x00")
    (tmp_path / "fifo.mp4").unlink(missing_ok=True)
    os.mkfifo(tmp_path / "fifo.mp4")
    for path in (str(outside), "/etc/hostname", "/etc/shadow", "/dev/zero", str(tmp_path / "fifo.mp4"),
                 str(tmp_path / "gradio" / ".." / "private" / "secret.mp4"), "http://127.0.0.1:9/v.mp4"):
        gallery, status, message = preview(page, path)
        assert gallery == [] and not status.startswith("The model sees"), (path, message)
        assert str(os.path.getsize(outside)) not in status
    assert cached_copies(tmp_path, outside.read_bytes()) == []  # Gradio copied nothing into its cache


def test_chat_reads_uploads_and_nothing_else(page, clip, tmp_path):
    outside = tmp_path / "secret.mp4"
    outside.write_bytes(clip)
    for path in (str(outside), "/dev/zero"):
        message = call(page, "respond", ["what color?", [], file_data(path), 4, 0.0, 1.0, 0])
        answered = message["success"] and last_answer(message)
        assert not answered or answered.startswith("[error"), (path, message)
    # Values no control offers, sent through the route: a clear error in the chat, never a crash
    # (Gradio's sliders refuse what is out of their range, NaN passes their check).
    video = file_data(upload(page, clip))
    for sampling, error in (([4, 1.0, 1.0, 2**70], "[error: seed"), ([4, float("nan"), 1.0, 0], "[error: temperature"),
                            ([float("nan"), 0.0, 1.0, 0], "[error: max_tokens")):
        message = call(page, "respond", ["what color?", [], video, *sampling])
        assert message["success"], message
        assert last_answer(message).startswith(error), message


def test_the_chat_server_checks_host_and_origin(page, clip):
    for path in ("", "config", "gradio_api/upload", "v1/models", "health"):
        r = httpx.get(page + path, headers={"Host": "attacker.example"})
        assert r.status_code == 421 and r.json()["error"]["code"] == "host_not_allowed", path
    r = httpx.post(page + "gradio_api/upload", files={"files": ("c.mp4", clip, "video/mp4")},
                   headers={"Origin": "http://attacker.example"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
    r = httpx.post(page + "gradio_api/queue/join", json={"data": [None], "fn_index": 1, "session_hash": "x"},
                   headers={"Origin": "http://attacker.example"})
    assert r.status_code == 403
    assert httpx.get(page + "config", headers={"Origin": page.rstrip("/")}).status_code == 200
    # Gradio parses an event's JSON on the event loop: a 15 MiB one is refused before it is read.
    swollen = b'{"data": [' + b"{}," * (5 << 20) + b'{}], "fn_index": 1, "session_hash": "x"}'
    r = httpx.post(page + "gradio_api/queue/join", content=swollen, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
    # An event that does not exist: Gradio fails it with a plain-text 500; the client gets JSON.
    r = httpx.post(page + "gradio_api/queue/join", json={"data": [None], "fn_index": 999, "session_hash": "x"})
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"


def test_with_a_key_the_api_and_the_page_ask_for_it(engine, clip, tmp_path, monkeypatch):
    from videollama.serve.ui import serving

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    with serving(engine, port=0, api_key="sekrit") as url:
        assert httpx.get(url + "v1/models").status_code == 401
        assert httpx.get(url + "metrics").status_code == 401
        assert httpx.get(url + "v1/models", headers={"Authorization": "Bearer sekrit"}).status_code == 200
        r = httpx.post(url + "v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(url + "health").status_code == 200
        for path in ("config", "gradio_api/info"):
            assert httpx.get(url + path).status_code == 401, path
        r = httpx.post(url + "gradio_api/upload", files={"files": ("c.mp4", clip, "video/mp4")})
        assert r.status_code == 401
        with httpx.Client() as browser:
            assert browser.post(url + "login", data={"username": "me", "password": "wrong"}).status_code != 200
            assert browser.post(url + "login", data={"username": "me", "password": "sekrit"}).status_code == 200
            gallery, status, _ = preview(url, upload(url, clip, browser), browser)
            windows, _ = load_windows(clip, engine.model.config.preprocess)  # [W, F, 3, S, S]
            assert len(gallery) == windows.shape[0] * windows.shape[1], status
