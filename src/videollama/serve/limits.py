"""The server's limits: one dataclass with every bound and its default, its command-line options,
and the OpenAI-style error that each one raises when a request goes past it.

Every limit is the server's; no request field can raise one (the request schema has no field for
frames, resolution, fps or any decode setting, and unknown fields are ignored, never read).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

MiB = 1 << 20


@dataclass
class ServeLimits:
    """Bounds on one request and on the server as a whole (sizes in bytes, times in seconds)."""

    max_body_bytes: int = 64 * MiB          # the whole request body (413)
    max_video_bytes: int = 32 * MiB         # one video's file, after base64 decoding (413)
    max_video_duration_s: float = 600.0     # the duration a video declares (400)
    max_video_pixels: int = 1920 * 1088     # width x height of a video's frames as declared (400)
    max_tokens: int = 256                   # cap on a request's max_tokens (400 above it)
    max_prompt_chars: int = 16_384          # all message text of a request together (400)
    max_messages: int = 64                  # messages in one request (400)
    max_batch: int = 8                      # requests decoded together, sharing each step
    max_queue: int = 32                     # requests waiting (and preparing) beyond those (429)
    request_timeout_s: float = 60.0         # deadline of one request, queueing included (504 / error event)
    decode_timeout_s: float = 20.0          # wall-clock limit of one video decode worker
    decode_memory_bytes: int = 1 << 30      # address space a decode worker may map beyond its start
    decode_workers: int = 2                 # video decode worker processes at once
    fetch_timeout_s: float = 10.0           # an http(s) video download, connect to last byte
    cache_bytes: int = 512 * MiB            # the video cache (encoder outputs + cross-attn K/V)
    cache_entries: int = 64
    retry_after_s: int = 1                  # the Retry-After header of a 429
    max_model_len: int = 0                  # prompt + new tokens per request, the KV cache's length (0: the model's)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value <= 0 and not (f.name == "max_model_len" and value == 0):
                raise ValueError(f"serve limit {f.name} must be > 0, got {value}")


_HELP = {
    "max_body_bytes": "request body size (413 above)",
    "max_video_bytes": "one video's bytes, after base64 decoding (413 above)",
    "max_video_duration_s": "a video's declared duration, seconds (400 above)",
    "max_video_pixels": "width x height of a video's frames (400 above)",
    "max_tokens": "the largest max_tokens a request may ask for (400 above)",
    "max_prompt_chars": "characters of message text in one request (400 above)",
    "max_messages": "messages in one request (400 above)",
    "max_batch": "requests decoded together in one batch",
    "max_queue": "requests waiting beyond the batch (429 with Retry-After above)",
    "request_timeout_s": "deadline of a request, seconds (504; a stream ends with an error event)",
    "decode_timeout_s": "wall-clock limit of a video decode worker, seconds",
    "decode_memory_bytes": "memory a video decode worker may map, bytes",
    "decode_workers": "video decode worker processes running at once",
    "fetch_timeout_s": "time limit of an http(s) video download, seconds",
    "cache_bytes": "video cache size, bytes (encoder outputs and cross-attention K/V)",
    "cache_entries": "videos in the video cache",
    "retry_after_s": "Retry-After seconds sent with a 429",
    "max_model_len": "tokens of prompt + answer per request, the length of each KV-cache row; a shorter "
                     "cache makes each decode step cheaper (0: the model's max_seq_len; 400 above)",
}


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--max-body-bytes``-style option per :class:`ServeLimits` field, default shown."""
    group = parser.add_argument_group("limits")
    defaults = ServeLimits()
    for f in fields(ServeLimits):
        kind = float if isinstance(getattr(defaults, f.name), float) else int
        group.add_argument("--" + f.name.replace("_", "-"), type=kind, default=getattr(defaults, f.name),
                           metavar=kind.__name__.upper(), help=f"{_HELP[f.name]} (default %(default)s)")


def limits_from_args(args: argparse.Namespace) -> ServeLimits:
    return ServeLimits(**{f.name: getattr(args, f.name) for f in fields(ServeLimits)})


class APIError(Exception):
    """An error the client caused or must wait out, sent as OpenAI's ``{"error": {...}}``.

    ``status``: HTTP status; ``type``: OpenAI's error type; ``param``: the request field at fault;
    ``code``: a short stable code (e.g. ``video_too_long``); ``headers``: extra response headers.
    """

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 429: "rate_limit_error", 503: "server_error", 504: "timeout_error"}

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


def too_large(what: str, size: int, limit: int, option: str, param: str | None = None) -> APIError:
    return APIError(413, f"{what} is {size} bytes, over the server's limit of {limit} bytes ({option})",
                    code="too_large", param=param)
