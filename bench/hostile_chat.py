"""The chat page's cases of ``bench/bench_hostile.py`` (see bench/hostile_serve.py): hostile
clients against a real ``videollama chat``, logged in with the server's key, through Gradio's own
routes (upload, queue join and data, file), as a browser or gradio_client sends them."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import httpx

HANG_S = 90.0
KEY = "bench-key"


def _gradio_event(client: httpx.Client, url: str, api_name: str, data: list) -> dict:
    config = client.get(url + "/config", timeout=30).json()
    fn_index = next(d["id"] for d in config["dependencies"] if d["api_name"] == api_name)
    session = f"bench{time.monotonic_ns()}"
    body = {"data": data, "fn_index": fn_index, "session_hash": session, "event_data": None, "trigger_id": None}
    client.post(url + "/gradio_api/queue/join", content=json.dumps(body), timeout=30,
                headers={"Content-Type": "application/json"}).raise_for_status()
    with client.stream("GET", url + f"/gradio_api/queue/data?session_hash={session}", timeout=HANG_S) as events:
        for line in events.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:]).get("msg") == "process_completed":
                return json.loads(line[6:])
    raise RuntimeError("the event never completed")


def _preview_status(client, url, path: str) -> int:
    """200 when the page showed frames of ``path``, 400 when it refused it."""
    message = _gradio_event(client, url, "on_preview", [{"path": path, "meta": {"_type": "gradio.FileData"}}])
    return 200 if message["success"] and message["output"]["data"][0] else 400


def chat_cases(work: Path, scale: float) -> dict:
    media = work / "media"
    mib = int((1 << 20) * scale)
    fifo = work / "chat.fifo"
    if not fifo.exists():
        os.mkfifo(fifo)

    @contextlib.contextmanager
    def logged_in(server):
        with httpx.Client(timeout=30) as client:
            client.post(server.url + "/login", data={"username": "bench", "password": KEY}).raise_for_status()
            yield client

    def upload_then_preview(server):
        with logged_in(server) as client:
            r = client.post(server.url + "/gradio_api/upload",
                            files={"files": ("good.mp4", (media / "good.mp4").read_bytes(), "video/mp4")})
            return [r.status_code, _preview_status(client, server.url, r.json()[0])]

    def file_data(paths):
        def case(server):
            with logged_in(server) as client:
                return [_preview_status(client, server.url, p) for p in paths]
        return case

    def chat_with(path):
        def case(server):
            with logged_in(server) as client:
                message = _gradio_event(client, server.url, "respond", [
                    "what moves?", [], {"path": path, "meta": {"_type": "gradio.FileData"}}, 4, 0.0, 1.0, 0])
                content = message["success"] and message["output"]["data"][1][-1]["content"]
                text = "".join(p.get("text", "") for p in content) if isinstance(content, list) else content
                return [400 if not text or text.startswith("[error") else 200]
        return case

    def file_route(server):
        with logged_in(server) as client:
            return [client.get(server.url + p).status_code for p in (
                "/gradio_api/file=/etc/passwd", f"/gradio_api/file={media / 'good.mp4'}", "/file=/etc/passwd",
                f"/gradio_api/file={work / 'gradio'}/../model/config.json")]

    def swollen_event(server):
        with logged_in(server) as client:
            body = b'{"data": [' + b"{}," * (20 * mib) + b'{}], "fn_index": 1, "session_hash": "x"}'
            return [client.post(server.url + "/gradio_api/queue/join", content=body,
                                headers={"Content-Type": "application/json"}).status_code]

    return {
        "upload_then_preview (control)": upload_then_preview,
        "filedata_outside_uploads": file_data([str(media / "good.mp4"), "/etc/passwd", "/etc/shadow"]),
        "filedata_dev_zero_and_fifo": file_data(["/dev/zero", str(fifo)]),
        "filedata_url": file_data(["http://169.254.169.254/latest/meta-data/", "https://example.com/v.mp4"]),
        "chat_with_outside_video": chat_with(str(media / "good.mp4")),
        "host_rebinding": lambda s: [httpx.get(s.url + p, headers={"Host": "attacker.example"}).status_code
                                     for p in ("/", "/config", "/gradio_api/upload", "/v1/models")],
        "cross_origin_upload": lambda s: [httpx.post(s.url + "/gradio_api/upload", headers={"Origin": "http://a.example"},
                                                     files={"files": ("x.mp4", b"x", "video/mp4")}).status_code],
        "api_and_page_without_key": lambda s: [httpx.get(s.url + p).status_code for p in
                                               ("/v1/models", "/metrics", "/config", "/gradio_api/info")],
        "gradio_file_route": file_route,
        f"gradio_event_{60 * scale:g}MiB_of_objects": swollen_event,
    }
