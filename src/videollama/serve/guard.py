"""What every request passes before any route: the server's outermost ASGI layer, for ``serve``
and for ``chat`` (the Gradio page's own routes included).

In order:

1. ``Host`` must name this server: ``localhost``, ``127.0.0.1``, ``::1``, the bind address and
   the names given with ``--allowed-hosts`` (421 otherwise). A page on another site cannot reach
   a local server by pointing its own name at 127.0.0.1 (DNS rebinding): the browser sends that
   name as the Host.
2. ``Origin``, when a browser sends one, must be such a name too (403 otherwise): another site's
   page cannot post to the API or drive the chat page (a "simple" cross-site POST needs no
   preflight, so CORS alone would not stop it).
3. The API key (``Authorization: Bearer KEY``) on the API's routes (401).
4. Request bodies: a declared ``Content-Length`` over ``--max-body-bytes`` is refused before a
   byte is read (413); bodies being received hold a share of ``--max-inflight-body-bytes``, all
   clients together, reserved from the declared length up front or as chunks arrive (503 with
   Retry-After when it is spent); a body must arrive within ``--body-timeout-s`` (408). The share
   is given back when the route says it is done with the bytes, when the response starts or when
   the request ends.
5. An exception no route handled becomes OpenAI's JSON error with status 500, and so does a
   plain-text 500 of a mounted app (Gradio's own routes).

Every response is counted in ``videollama_http_responses_total{route,status}``. A refusal after
the route started reading is sent by this layer, and the route then sees the client gone.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import urllib.parse
from collections.abc import Callable, Iterable

from videollama.serve.limits import APIError, ServeLimits, too_large

log = logging.getLogger(__name__)

LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
RELEASE_BODY = "videollama.release_body"  # scope key: a route calls it when done with the body's bytes


def host_name(value: str) -> str | None:
    """The name of a ``Host`` header value (port, IPv6 brackets and a final dot removed, lower
    case), or None when it is not one."""
    value = value.strip().lower()
    if value.startswith("["):
        name, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
        return name or None
    name, _, port = value.partition(":")
    if port and not port.isdigit():
        return None
    name = name.rstrip(".")
    return name if name and all(c.isalnum() or c in "-._" for c in name) else None


def allowed_hosts(bind: str, extra: Iterable[str] = ()) -> frozenset[str] | None:
    """The Host names a server bound to ``bind`` answers: the local names, the bind address and
    ``extra``; None (any Host) only when ``extra`` holds ``*``."""
    extra = [e.strip() for e in extra]
    if "*" in extra:
        return None
    names = set(LOCAL_NAMES)
    for value in [bind, *extra]:
        name = host_name(value) if not (":" in value and "[" not in value) else value.lower()  # bare IPv6
        if name is None:
            raise ValueError(f"--allowed-hosts: {value!r} is not a host name or address")
        names.add(name)
    return frozenset(names)


def origin_host(origin: str) -> str | None:
    try:
        parts = urllib.parse.urlsplit(origin)
        return parts.hostname if parts.scheme in ("http", "https") and parts.hostname else None
    except ValueError:
        return None


def error_message(error: APIError) -> tuple[dict, bytes]:
    """The ``http.response.start`` message and body of an OpenAI-style JSON error."""
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    return {"type": "http.response.start", "status": error.status, "headers": headers}, body


def _is_json(start_message) -> bool:
    return any(k.lower() == b"content-type" and v.startswith(b"application/json") for k, v in start_message["headers"])


def _internal_error() -> APIError:
    return APIError(500, "internal server error (the server's log has the details)", code="internal_error")


class _BodyBudget:
    """Bytes of request bodies in flight, all clients together (the event loop's thread only)."""

    def __init__(self, total: int) -> None:
        self.total, self.used = total, 0

    def take(self, n: int) -> bool:
        if self.used + n > self.total:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n


class RequestGuard:
    """The ASGI wrapper described in the module docstring, around ``app``.

    ``hosts``: from :func:`allowed_hosts` (None: any). ``needs_key(path)``: whether a path needs
    the API key (when there is one). ``body_cap(path)``: the largest body a path takes (default
    ``--max-body-bytes`` for all). ``metrics``: a :class:`~videollama.serve.metrics.Metrics`.
    """

    def __init__(self, app, *, limits: ServeLimits, metrics, hosts: frozenset[str] | None,
                 api_key: str | None = None, needs_key: Callable[[str], bool] = lambda path: path != "/health",
                 body_cap: Callable[[str], int] | None = None) -> None:
        self.app, self.limits, self.metrics, self.hosts = app, limits, metrics, hosts
        self.api_key, self.needs_key = api_key, needs_key
        self.body_cap = body_cap or (lambda path: limits.max_body_bytes)
        self.budget = _BodyBudget(limits.max_inflight_body_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        request = _Request(self, scope, receive, send)
        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                return await request.refuse(refusal)
            if scope["type"] == "http" and not await request.admit_body():
                return
            await self.app(scope, request.receive, request.send)
        except Exception:  # noqa: BLE001 - no route handled it: the client gets JSON, the log the traceback
            log.exception("unhandled error on %s %s", scope.get("method", ""), scope.get("path", ""))
            await request.refuse(_internal_error())
        finally:
            request.release()
            if request.status is not None:
                self.metrics.http_response(scope.get("path", ""), request.status)

    def _refusal(self, scope) -> APIError | None:
        headers = {}
        for key, value in scope.get("headers", []):
            headers.setdefault(key.lower(), value.decode("latin-1"))
        if self.hosts is not None:
            name = host_name(headers.get(b"host", ""))
            if name not in self.hosts:
                return APIError(421, f"this server does not answer for the Host {headers.get(b'host', '')!r} "
                                "(--allowed-hosts)", code="host_not_allowed")
            origin = headers.get(b"origin")
            if origin is not None and origin_host(origin) not in self.hosts:
                return APIError(403, f"requests from the origin {origin!r} are not allowed (--allowed-hosts)",
                                code="origin_not_allowed")
        if self.api_key and self.needs_key(scope.get("path", "")):
            given = headers.get(b"authorization", "").encode("latin-1")
            if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
                return APIError(401, "invalid or missing API key (Authorization: Bearer KEY)", code="invalid_api_key")
        return None


class _Request:
    """One request's passage through the guard: its body accounting and its response status."""

    def __init__(self, guard: RequestGuard, scope, receive, send) -> None:
        self.guard, self.scope, self._receive, self._send = guard, scope, receive, send
        self.status: int | None = None
        self.started = self.refused = self.body_done = self.released = False
        self.reserved = self.received = 0
        self.deadline = time.monotonic() + guard.limits.body_timeout_s
        self.cap = guard.body_cap(scope.get("path", ""))

    async def admit_body(self) -> bool:
        headers = dict(self.scope.get("headers", []))
        declared = headers.get(b"content-length")
        # HTTP/1.1: without Content-Length or Transfer-Encoding a request has no body, so no
        # deadline for one (a long event stream that listens for the client's leaving has none).
        self.body_done = declared in (None, b"0") and b"transfer-encoding" not in headers
        if declared is not None:
            if not declared.isdigit():
                await self.refuse(APIError(400, "Content-Length is not a number"))
                return False
            size = int(declared)
            if size > self.cap:
                await self.refuse(self._too_large(size))
                return False
            if not self._reserve_upto(size):
                await self.refuse(self._busy())
                return False
        self.scope[RELEASE_BODY] = self.release
        return True

    def _reserve_upto(self, n: int) -> bool:
        """Hold ``n`` bytes of the budget for this body in all (after release: nothing more)."""
        need = n - self.reserved
        if self.released or need <= 0:
            return True
        if not self.guard.budget.take(need):
            return False
        self.reserved = n
        return True

    def _too_large(self, size: int) -> APIError:
        lim = self.guard.limits
        if self.cap == lim.max_body_bytes:
            return too_large("the request body", size, self.cap, "--max-body-bytes")
        return too_large("the request body", size, self.cap, "a page event's own cap; uploads and the API take up to "
                         "--max-body-bytes")

    def _busy(self) -> APIError:
        lim = self.guard.limits
        return APIError(503, f"the server is receiving {lim.max_inflight_body_bytes} bytes of request bodies "
                        "already (--max-inflight-body-bytes); retry later", code="server_busy",
                        headers={"Retry-After": str(lim.retry_after_s)})

    def release(self) -> None:
        self.guard.budget.give(self.reserved)
        self.reserved, self.released = 0, True

    async def receive(self):
        if self.refused:
            return {"type": "http.disconnect"}
        if self.body_done:  # only the client's leaving is left to hear of: no deadline on that
            return await self._receive()
        try:
            message = await asyncio.wait_for(self._receive(), max(0.0, self.deadline - time.monotonic()))
        except asyncio.TimeoutError:
            lim = self.guard.limits
            await self.refuse(APIError(408, f"the request body did not arrive within {lim.body_timeout_s:g} s "
                                       "(--body-timeout-s)", code="body_timeout"))
            return {"type": "http.disconnect"}
        if message["type"] != "http.request":
            return message
        lim = self.guard.limits
        self.received += len(message.get("body", b""))
        if self.received > self.cap:
            await self.refuse(self._too_large(self.received))
            return {"type": "http.disconnect"}
        if not self._reserve_upto(self.received):
            await self.refuse(self._busy())
            return {"type": "http.disconnect"}
        if not message.get("more_body", False):
            self.body_done = True
        return message

    async def send(self, message):
        if self.refused:  # the guard answered already: what the route says after is dropped
            return
        if message["type"] == "http.response.start" and message["status"] == 500 and not _is_json(message):
            # An error a mounted app (Gradio) answered in plain text: ours in JSON instead.
            return await self.refuse(_internal_error())
        if message["type"] == "http.response.start":
            self.started, self.status = True, message["status"]
            self.release()
        elif message["type"] == "websocket.close" and not self.started:
            self.status = 403
        elif message["type"] == "websocket.accept":
            self.started, self.status = True, 101
        await self._send(message)

    async def refuse(self, error: APIError) -> None:
        if self.started or self.refused:
            self.refused = True
            return
        self.refused, self.status = True, error.status
        self.release()
        if self.scope["type"] == "websocket":
            await self._send({"type": "websocket.close", "code": 1008})
            return
        start, body = error_message(error)
        await self._send(start)
        await self._send({"type": "http.response.body", "body": body})
