"""A chat request inside the engine: its checked arguments, its state while it waits and
decodes, and what it sends back to its client (text deltas, then one :class:`ChatResult`, or an
error), through its own asyncio queue from the scheduler thread."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from videollama.serve.cache import VideoEntry
from videollama.serve.limits import APIError, ServeLimits, check_sampling


@dataclass
class ChatResult:
    """The end of a chat: the whole ``text``, why it ended (``stop`` / ``length``), token counts
    and the timestamps (s) of every frame the model saw, per window (None without a video)."""

    text: str
    finish_reason: str
    usage: dict
    timestamps: list[list[float]] | None


@dataclass
class ChatRequest:
    prompt_ids: list[int]
    video: VideoEntry | None
    key: str | None
    max_new: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    deadline: float
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    arrival: float = field(default_factory=time.monotonic)
    tokens: list[int] = field(default_factory=list)
    generated: int = 0
    sent: int = 0
    slot: int | None = None
    cancelled: bool = False
    done: bool = False
    timestamps: list[list[float]] | None = None

    def send(self, event) -> None:
        """Hand ``event`` to the request's event loop (from any thread)."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the request's event loop has closed
            pass


def check_arguments(limits: ServeLimits, max_tokens, temperature, top_p, stop, seed):
    """The sampling arguments checked (APIError 400 otherwise): (temperature, top_p, seed, stop
    as a list)."""
    if max_tokens is not None and not 1 <= max_tokens <= limits.max_tokens:
        raise APIError(400, f"max_tokens must be 1 to {limits.max_tokens} (--max-tokens), got {max_tokens}",
                       param="max_tokens")
    temperature, top_p, seed = check_sampling(temperature, top_p, seed)
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stop) > 4 or not all(isinstance(s, str) and 0 < len(s) <= 64 for s in stop):
        raise APIError(400, "stop: at most 4 non-empty strings of up to 64 characters", param="stop")
    return temperature, top_p, seed, stop


def settled(text: str, stop: list[str]) -> str:
    """The part of an unfinished answer that can be sent: without what may still change (a cut
    UTF-8 sequence, trailing spaces (the answer is stripped, as eval strips it), and a tail that
    could be the start of a stop string)."""
    safe = text.rstrip("\ufffd").rstrip()
    for s in stop:
        for n in range(min(len(s) - 1, len(safe)), 0, -1):
            if safe.endswith(s[:n]):
                safe = safe[:-n].rstrip()
                break
    return safe
