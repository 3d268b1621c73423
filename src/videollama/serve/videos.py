"""The engine's videos: a content part's bytes, the preview, and each video encoded once.

The engine (engine.py) holds one :class:`EngineVideos`. Reading a video's bytes and decoding it
wait on pools of their own (never asyncio's default one, which every ``to_thread`` of the process
shares), so a queue of videos holds no thread; at most ``decode_workers`` videos decode at once
(``decode_slots``). Encoding runs the model, so its chunks go to the scheduler thread through the
engine's ``run_on_model`` (encoding.py); the result is kept in the engine's video cache.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from videollama.serve import media
from videollama.serve.cache import VideoCache, VideoEntry
from videollama.serve.encoding import encode_video_entry
from videollama.serve.limits import APIError, ServeLimits, deadline_error, too_large


class EngineVideos:
    def __init__(self, model, limits: ServeLimits, cache: VideoCache, run_on_model: Callable, *,
                 allowed_local_path: Path | None = None, allowed_domains: tuple[str, ...] = ()) -> None:
        """``run_on_model(fn, deadline)`` runs ``fn()`` on the scheduler thread and returns its result."""
        self.model, self.limits, self.cache, self.run_on_model = model, limits, cache, run_on_model
        self.allowed_local_path = Path(allowed_local_path) if allowed_local_path else None
        self.allowed_domains = tuple(allowed_domains)
        self.decode_slots = threading.BoundedSemaphore(limits.decode_workers)
        workers = limits.decode_workers
        self.media_pool = ThreadPoolExecutor(max(2, workers), thread_name_prefix="videollama-media")
        self.decode_pool = ThreadPoolExecutor(workers, thread_name_prefix="videollama-decode")
        self._encoding: dict[str, Future] = {}  # videos being encoded, by key: one encoding each
        self._lock = threading.Lock()
        from videollama.data.untrusted import start_fork_server

        start_fork_server()  # the sandboxed decoders' parent, before the first request needs it

    def close(self) -> None:
        for pool in (self.media_pool, self.decode_pool):
            pool.shutdown(wait=False, cancel_futures=True)

    def from_part(self, part: dict, deadline: float | None = None) -> bytes:
        """The bytes of a ``video_url`` (or in-process ``video``) content part; blocking."""
        if part.get("type") == "video":
            data = part.get("video")
            if not isinstance(data, bytes | bytearray):
                raise APIError(400, "a video part's 'video' must be bytes", param="messages")
            if len(data) > self.limits.max_video_bytes:
                raise too_large("the video", len(data), self.limits.max_video_bytes, "--max-video-bytes")
            return bytes(data)
        url = (part.get("video_url") or {}).get("url") if isinstance(part.get("video_url"), dict) else None
        return media.video_bytes(url, self.limits, allowed_local_path=self.allowed_local_path,
                                 allowed_domains=self.allowed_domains, deadline=deadline)

    def preview(self, data: bytes, deadline: float | None = None):
        """The windows the model sees of ``data`` and a few of their frames
        (:class:`~videollama.serve.timeline.Preview`); decoded in a sandboxed worker (at most
        ``decode_workers`` at once), nothing encoded; blocking."""
        from videollama.serve.timeline import preview_video

        with self.decode_slots:
            if deadline is not None and time.monotonic() > deadline:
                raise deadline_error(self.limits)
            return preview_video(data, self.model.config.preprocess, self.limits, deadline)

    async def apreview(self, data: bytes):
        """:meth:`preview` on the decode pool, within ``--request-timeout-s``."""
        deadline = time.monotonic() + self.limits.request_timeout_s
        return await self.off_loop(self.decode_pool, deadline, self.preview, data, deadline)

    async def encoded(self, data: bytes, key: str, deadline: float) -> VideoEntry:
        """The video's entry, encoded once however many requests ask for it at the same time
        (a request that finds it being encoded waits for that encoding, and shares its outcome)."""
        with self._lock:
            shared = self._encoding.get(key)
            if shared is None:
                shared = self._encoding[key] = Future()
                owner = True
            else:
                owner = False
        if owner:
            try:
                shared.set_result(await self.off_loop(self.decode_pool, deadline, self._encode, data, key, deadline))
            except BaseException as e:
                shared.set_exception(e)
            finally:
                with self._lock:
                    self._encoding.pop(key, None)
        left = deadline - time.monotonic()
        try:
            return await asyncio.wait_for(asyncio.wrap_future(shared), max(left, 0.0))
        except asyncio.TimeoutError:
            raise deadline_error(self.limits) from None

    def _encode(self, data: bytes, key: str, deadline: float) -> VideoEntry:
        """Decode and encode a video (encoding.py) and keep it in the cache; blocking."""
        with self.decode_slots:
            entry = self.cache.peek(key)  # encoded meanwhile
            if entry is None:
                if time.monotonic() > deadline:
                    raise deadline_error(self.limits)
                entry = encode_video_entry(self.model, data, key, self.limits,
                                           lambda fn: self.run_on_model(fn, deadline), deadline=deadline)
                self.cache.put(entry)
            return entry

    async def off_loop(self, pool: ThreadPoolExecutor, deadline: float, fn, *args):
        """``fn(*args)`` on ``pool``, awaited until ``deadline`` at most (504 after; a job still
        waiting for a worker then never starts)."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise deadline_error(self.limits)
        future = pool.submit(fn, *args)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), left)
        except asyncio.TimeoutError:
            future.cancel()
            raise deadline_error(self.limits) from None
