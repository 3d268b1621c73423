"""The HTTP API: OpenAI-compatible routes on FastAPI, over an :class:`~videollama.serve.engine.Engine`.

``POST /v1/chat/completions`` (string or ``text``/``video_url`` content parts; ``max_tokens``,
``temperature``, ``top_p``, ``stop``, ``seed``, ``stream`` + ``stream_options.include_usage``);
``GET /v1/models``; ``GET /health``; ``GET /metrics`` (Prometheus text). Errors are OpenAI's
``{"error": {"message", "type", "param", "code"}}`` with the status of :mod:`limits`, an
unhandled one included (500). The response carries ``usage`` and, as an extension,
``frame_timestamps_s``: the timestamps (s) of the frames the model saw (null without a video).
Unknown request fields are ignored: none can change decoding.

:func:`create_api` gives the routes; :func:`create_app` puts them behind the request guard
(guard.py: Host and Origin, the API key on every route but ``/health``, body size, time and
bytes in flight). A body is parsed off the event loop, on a small pool of its own, and only once
its JSON is known to hold at most ``--max-json-items`` objects, arrays and items.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from videollama.serve.engine import ChatResult, Engine
from videollama.serve.guard import RELEASE_BODY, RequestGuard, allowed_hosts
from videollama.serve.limits import APIError, too_large
from videollama.serve.metrics import CONTENT_TYPE

log = logging.getLogger(__name__)
LOCAL_HOSTS = allowed_hosts("127.0.0.1")


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


def count_json_items(body: bytes) -> int:
    """An upper bound on the JSON values of ``body`` that are objects, arrays or items after a
    first: every one starts with ``{``, ``[`` or follows a ``,``. Brackets and commas inside strings
    count too (it only errs high); base64 has none."""
    return body.count(b"{") + body.count(b"[") + body.count(b",")


def parse_request(body: bytes, max_items: int) -> ChatRequest:
    """The request of ``body``, refused (400) before parsing when it holds too many JSON items:
    a body of ``{}`` or ``[0,0,...]`` would cost far more memory parsed than sent."""
    items = count_json_items(body)
    if items > max_items:
        raise APIError(400, f"the request's JSON holds up to {items} objects, arrays and items, over the "
                       f"server's limit of {max_items} (--max-json-items)", code="too_many_json_items")
    try:
        return ChatRequest.model_validate_json(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise APIError(400, f"invalid request: {where}: {first['msg']}", param=where or None) from None


def create_api(engine: Engine) -> FastAPI:
    """The FastAPI routes over a started ``engine`` (the caller starts and closes it), unguarded:
    serve them through :func:`create_app`."""
    app = FastAPI(title="VideoLlama", docs_url=None, redoc_url=None, openapi_url=None)
    metrics, limits = engine.metrics, engine.limits
    parse_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="videollama-json")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):  # 404, 405: OpenAI's form too
        return _error(APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": 0,
                                            "owned_by": "videollama"}]}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(engine.cache), media_type=CONTENT_TYPE)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        arrival = time.monotonic()
        try:
            body = await _read_body(request, limits.max_body_bytes)
            req = await asyncio.get_running_loop().run_in_executor(parse_pool, parse_request, body,
                                                                   limits.max_json_items)
            del body
            if req.model not in (None, engine.name):
                raise APIError(404, f"model {req.model[:100]!r} is not served here (GET /v1/models)", param="model",
                               code="model_not_found")
            if req.n != 1:
                raise APIError(400, "only n=1 is supported", param="n")
            submitted = await engine.submit(
                req.messages, max_tokens=req.max_tokens if req.max_tokens is not None else req.max_completion_tokens,
                temperature=0.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p, stop=req.stop, seed=req.seed)
            request.scope.get(RELEASE_BODY, lambda: None)()  # the bytes are decoded and dropped
        except ClientDisconnect:  # gone, or refused by the guard (which answered and counted it)
            return Response(status_code=400)
        except Exception as e:  # noqa: BLE001 - every error is OpenAI's JSON, and counted
            error = _api_error(e)
            metrics.request_done(error.status, time.monotonic() - arrival)
            return _error(error)
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
        except Exception as e:  # noqa: BLE001
            error = _api_error(e)
            metrics.request_done(error.status, time.monotonic() - arrival)
            return _error(error)
        metrics.request_done(200, time.monotonic() - arrival)
        return {"id": cid, "object": "chat.completion", "created": created, "model": engine.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "finish_reason": result.finish_reason, "logprobs": None}],
                "usage": result.usage, "frame_timestamps_s": result.timestamps}

    return app


def _api_error(e: Exception) -> APIError:
    """The APIError to answer ``e`` with, without its traceback: kept, the traceback's frames
    (which hold the request's body) and the route's own frame would form a cycle that only the
    garbage collector frees, so every refused large body would linger until it runs."""
    if isinstance(e, APIError):
        return e.with_traceback(None)
    log.error("unhandled error in a chat completion", exc_info=e)
    e.__traceback__ = None
    return APIError(500, f"internal server error ({type(e).__name__}; the server's log has the details)",
                    code="internal_error")


def api_paths(path: str) -> bool:
    """The paths of the API (the key guards them when the chat page is mounted beside it)."""
    return path == "/metrics" or path == "/v1" or path.startswith("/v1/")


def create_app(engine: Engine, *, api_key: str | None = None, hosts: frozenset[str] | None = LOCAL_HOSTS,
               inner=None, needs_key=lambda path: path != "/health", body_cap=None) -> RequestGuard:
    """The server's ASGI app: ``inner`` (default :func:`create_api`'s routes) behind the request
    guard. ``hosts``: the Host names it answers (:func:`~videollama.serve.guard.allowed_hosts`);
    ``needs_key(path)``: the paths the API key guards; ``body_cap(path)``: the largest body of a
    path (default ``--max-body-bytes``)."""
    return RequestGuard(create_api(engine) if inner is None else inner, limits=engine.limits,
                        metrics=engine.metrics, hosts=hosts, api_key=api_key, needs_key=needs_key, body_cap=body_cap)


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
    except Exception as e:  # noqa: BLE001 - the deadline, or a bug: an error event either way
        error = _api_error(e)
        status = error.status
        yield f"data: {json.dumps(error.body())}\n\n"
    finally:
        engine.metrics.request_done(status, time.monotonic() - arrival)
    yield "data: [DONE]\n\n"
