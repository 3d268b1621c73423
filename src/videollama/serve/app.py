"""The HTTP API: OpenAI-compatible routes on FastAPI, over an :class:`~videollama.serve.engine.Engine`.

``POST /v1/chat/completions`` (string or ``text``/``video_url`` content parts; ``max_tokens``,
``temperature``, ``top_p``, ``stop``, ``seed``, ``stream`` + ``stream_options.include_usage``);
``GET /v1/models``; ``GET /health``; ``GET /metrics`` (Prometheus text). Errors are OpenAI's
``{"error": {"message", "type", "param", "code"}}`` with the status of :mod:`limits`. The
response carries ``usage`` and, as an extension, ``frame_timestamps_s``: the timestamps (s)
of the frames the model saw (null without a video). Unknown request fields are ignored: none
can change decoding. With an API key, every route but ``/health`` needs
``Authorization: Bearer KEY`` (401).
"""

from __future__ import annotations

import hmac
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError

from videollama.serve.engine import ChatResult, Engine
from videollama.serve.limits import APIError, too_large


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The fields we read; anything else a client sends is ignored (never a decode setting)."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class _APIKey:
    """ASGI middleware: ``Authorization: Bearer KEY`` on every route but /health (constant-time)."""

    def __init__(self, app, key: str | None) -> None:
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.key and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, f"Bearer {self.key}".encode()):
                error = APIError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                 code="invalid_api_key")
                return await _error(error)(scope, receive, send)
        return await self.app(scope, receive, send)


async def _read_body(request: Request, cap: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > cap:
        raise too_large("the request body", int(declared), cap, "--max-body-bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise too_large("the request body", size, cap, "--max-body-bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(engine: Engine, *, api_key: str | None = None) -> FastAPI:
    """The FastAPI app over a started ``engine`` (the caller starts and closes it)."""
    app = FastAPI(title="VideoLlama", docs_url=None, redoc_url=None, openapi_url=None)
    if api_key:
        app.add_middleware(_APIKey, key=api_key)
    metrics, limits = engine.metrics, engine.limits

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": 0,
                                            "owned_by": "videollama"}]}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(engine.cache), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        arrival = time.monotonic()
        try:
            body = await _read_body(request, limits.max_body_bytes)
            try:
                req = ChatRequest.model_validate_json(body)
            except ValidationError as e:
                first = e.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                raise APIError(400, f"invalid request: {where}: {first['msg']}", param=where or None) from None
            if req.model not in (None, engine.name):
                raise APIError(404, f"model {req.model!r} is not served here (GET /v1/models)", param="model",
                               code="model_not_found")
            if req.n != 1:
                raise APIError(400, "only n=1 is supported", param="n")
            submitted = await engine.submit(
                req.messages, max_tokens=req.max_tokens if req.max_tokens is not None else req.max_completion_tokens,
                temperature=0.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p, stop=req.stop, seed=req.seed)
        except APIError as e:
            metrics.request_done(e.status, time.monotonic() - arrival)
            return _error(e)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            return StreamingResponse(_sse(engine, submitted, cid, created, usage, arrival),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            result = None
            async for event in engine.events(submitted):
                if isinstance(event, ChatResult):
                    result = event
        except APIError as e:
            metrics.request_done(e.status, time.monotonic() - arrival)
            return _error(e)
        metrics.request_done(200, time.monotonic() - arrival)
        return {"id": cid, "object": "chat.completion", "created": created, "model": engine.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "finish_reason": result.finish_reason, "logprobs": None}],
                "usage": result.usage, "frame_timestamps_s": result.timestamps}

    return app


async def _sse(engine: Engine, submitted, cid: str, created: int, include_usage: bool, arrival: float):
    """``chat.completion.chunk`` events, a finish chunk, the usage chunk if asked, ``[DONE]``;
    an error (the deadline) is sent as an ``{"error": ...}`` event before ``[DONE]``."""

    def chunk(delta: dict, finish=None, **extra) -> str:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": engine.name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
        return f"data: {json.dumps(body)}\n\n"

    status = 200
    try:
        yield chunk({"role": "assistant", "content": ""})
        async for event in engine.events(submitted):
            if isinstance(event, str):
                yield chunk({"content": event})
                continue
            yield chunk({}, event.finish_reason, frame_timestamps_s=event.timestamps)
            if include_usage:
                body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": engine.name,
                        "choices": [], "usage": event.usage, "frame_timestamps_s": event.timestamps}
                yield f"data: {json.dumps(body)}\n\n"
    except APIError as e:
        status = e.status
        yield f"data: {json.dumps(e.body())}\n\n"
    finally:
        engine.metrics.request_done(status, time.monotonic() - arrival)
    yield "data: [DONE]\n\n"
