"""The server's limits: one dataclass with every bound and its default, its command-line options,
and the OpenAI-style error that each one raises when a request goes past it.

Every limit is the server's; no request field can raise one (the request schema has no field for
frames, resolution, fps or any decode setting, and unknown fields are ignored, never read).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, fields

MiB = 1 << 20
GiB = 1 << 30


@dataclass
class ServeLimits:
    """Bounds on one request and on the server as a whole (sizes in bytes, times in seconds)."""

    max_body_bytes: int = 64 * MiB          # the whole request body (413)
    max_inflight_body_bytes: int = 128 * MiB  # request bodies being received, all clients together (503)
    body_timeout_s: float = 30.0            # time to receive one request body, first byte to last (408)
    max_json_items: int = 65_536            # JSON objects, arrays and list items of a request body (400)
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
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"serve limit {f.name} must be a finite number, got {value!r}")
            if value <= 0 and not (f.name == "max_model_len" and value == 0):
                raise ValueError(f"serve limit {f.name} must be > 0, got {value}")
            if value > _MAXIMA[f.name]:
                raise ValueError(f"serve limit {f.name} must be at most {_MAXIMA[f.name]:g}, got {value:g}")
        if self.max_inflight_body_bytes < self.max_body_bytes:
            raise ValueError(f"serve limit max_inflight_body_bytes ({self.max_inflight_body_bytes}) must be at "
                             f"least max_body_bytes ({self.max_body_bytes})")


# Upper bounds of the limits themselves: past these a value is a typo or an attack on the server's
# own start (a million-row batch allocates its KV cache at start; an hour-long deadline is no deadline).
_DAY_S = 86_400.0
_MAXIMA = {
    "max_body_bytes": 4 * GiB, "max_inflight_body_bytes": 64 * GiB, "body_timeout_s": _DAY_S,
    "max_json_items": 1 << 24, "max_video_bytes": 4 * GiB, "max_video_duration_s": 10 * _DAY_S,
    "max_video_pixels": 16384 * 16384, "max_tokens": 1 << 20, "max_prompt_chars": 1 << 24,
    "max_messages": 1 << 16, "max_batch": 1024, "max_queue": 1 << 16, "request_timeout_s": _DAY_S,
    "decode_timeout_s": _DAY_S, "decode_memory_bytes": 1 << 40, "decode_workers": 256, "fetch_timeout_s": _DAY_S,
    "cache_bytes": 1 << 40, "cache_entries": 1 << 20, "retry_after_s": 3600, "max_model_len": 1 << 24,
}


_HELP = {
    "max_body_bytes": "request body size (413 above)",
    "max_inflight_body_bytes": "bytes of request bodies being received at once, all clients together (503 "
                               "with Retry-After above; a declared Content-Length is counted before reading)",
    "body_timeout_s": "time to receive a whole request body, seconds (408 above)",
    "max_json_items": "objects, arrays and items in a request's JSON, counted before parsing (400 above)",
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

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 408: "timeout_error", 413: "invalid_request_error",
             421: "invalid_request_error", 429: "rate_limit_error", 503: "server_error", 504: "timeout_error"}

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


# Sampling parameters are checked to ranges that decode. A temperature below this samples from
# logits scaled past float32's range (inf, then NaN probabilities): it decodes greedily, as vLLM
# does below its own epsilon. A top_p below MIN_TOP_P rounds to 0 in float32 and would keep no
# token: it keeps the most likely one only (the same greedy choice).
GREEDY_BELOW_TEMPERATURE = 1e-5
MIN_TOP_P = 1e-6
MAX_TEMPERATURE = 2.0
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed accepts


def check_sampling(temperature, top_p, seed) -> tuple[float, float, int | None]:
    """(temperature, top_p, seed) a decoder can use, or a 400 naming the field.

    temperature: 0 (greedy) to 2, finite; under GREEDY_BELOW_TEMPERATURE it is 0. top_p: over 0 to
    1, finite; under MIN_TOP_P it is MIN_TOP_P. seed: an integer torch's generator accepts, or None.
    """
    def finite_number(value, name: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise APIError(400, f"{name} must be a finite number, got {value!r}", param=name)
        return float(value)

    temperature, top_p = finite_number(temperature, "temperature"), finite_number(top_p, "top_p")
    if not 0.0 <= temperature <= MAX_TEMPERATURE:
        raise APIError(400, f"temperature must be 0 to {MAX_TEMPERATURE:g}, got {temperature:g}", param="temperature")
    if not 0.0 < top_p <= 1.0:
        raise APIError(400, f"top_p must be over 0 and at most 1, got {top_p:g}", param="top_p")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                             or not SEED_RANGE[0] <= seed <= SEED_RANGE[1]):
        raise APIError(400, f"seed must be an integer from -2**63 to 2**64-1, got {seed!r}", param="seed")
    if temperature < GREEDY_BELOW_TEMPERATURE:
        temperature = 0.0
    return temperature, max(top_p, MIN_TOP_P), seed


def deadline_error(limits: ServeLimits) -> APIError:
    return APIError(504, f"the request took longer than the server's deadline of {limits.request_timeout_s:g} s "
                    "(--request-timeout-s)", code="timeout")
