"""The serving engine: one scheduler thread owns the model and decodes every request together.

In-process API (the HTTP server in app.py and the ``videollama chat`` UI both use it)::

    engine = Engine.from_model_dir("runs/model", limits=ServeLimits())   # loads, does not start
    engine.start()                                   # the scheduler thread
    preview = engine.preview(video_bytes)           # the windows the model sees, a few frames of them (timeline.py)
    async for event in engine.chat(messages, max_tokens=32, temperature=0.0, top_p=1.0, stop=None, seed=None):
        if isinstance(event, str): ...                # a text delta
        else: event.usage, event.finish_reason, event.timestamps  # the final ChatResult ([W][F] s)
    engine.close()

``messages`` are OpenAI chat messages: ``{"role": "system"|"user"|"assistant", "content": str |
[parts]}``, a part being ``{"type": "text", "text": ...}``, ``{"type": "video_url", "video_url":
{"url": ...}}`` (data:, file:, http(s): under the engine's allowlists, see media.py) or, in
process only, ``{"type": "video", "video": bytes}``. A conversation is about at most one video
(its bytes may be sent again with every turn: the video cache makes that free).

Prompt: the model directory's template, the one ``videollama eval`` uses
(``videollama.data.tokenizer.videoqa_prompt`` + ``encode_prompt``): a single user turn with one
video and a question gives exactly eval's prompt. Later turns append ``answer </s>`` and
``<|question|> next question <|answer|>``. Decoding of the video follows the directory's own
``preprocess`` spec; no request value changes it: the whole video, under its policy (the windows
that tile it, or ``max_windows`` spread over it: exactly what eval sees), up to
``--max-video-duration-s``, streamed from the sandboxed decoder and encoded a chunk of windows at
a time (videos.py, encoding.py); the video cache keeps the latents and K/V by the bytes' SHA-256.

Scheduling: the scheduler thread alone runs the model. Between decode steps it encodes the
chunks of windows that decode workers hand it (``run_on_model``), admits waiting requests into the
decoder's free rows (prefill with the video's cached cross-attention K/V; rows read videos of
different lengths, padded and masked), runs one step for all rows, hands each row's token to its request (stop strings, ``max_tokens``, EOS, deadline,
client gone), and removes finished rows. Tokens reach each request's asyncio queue through
``call_soon_threadsafe`` (chat_request.py).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from concurrent.futures import CancelledError, Future
from pathlib import Path

from videollama.serve.cache import VideoCache, content_hash
from videollama.serve.chat_request import ChatRequest, ChatResult, check_arguments, settled
from videollama.serve.limits import APIError, ServeLimits, deadline_error
from videollama.serve.metrics import Metrics
from videollama.serve.prompt import build_prompt
from videollama.serve.videos import EngineVideos

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, model, tokenizer, *, limits: ServeLimits | None = None, name: str = "videollama",
                 allowed_local_path: Path | None = None, allowed_domains: tuple[str, ...] = (),
                 decoder_factory=None, compile: bool = False) -> None:
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.limits = limits or ServeLimits()
        self.cache = VideoCache(self.limits.cache_bytes, self.limits.cache_entries)
        self.metrics = Metrics()
        dec = model.config.decoder
        if self.limits.max_model_len > dec.max_seq_len:
            raise ValueError(f"--max-model-len {self.limits.max_model_len} is over the model's max_seq_len "
                             f"{dec.max_seq_len}")
        self.eos_id, self.max_seq_len = dec.eos_token_id, self.limits.max_model_len or dec.max_seq_len
        factory = decoder_factory or _default_decoder
        self.decoder = factory(model, max_batch=self.limits.max_batch, max_len=self.max_seq_len, compile=compile)
        self._waiting: collections.deque[ChatRequest] = collections.deque()
        self._jobs: collections.deque[tuple[Future, object]] = collections.deque()  # run_on_model's
        self._active: dict[int, ChatRequest] = {}
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = self._paused = False
        self.in_system = 0  # requests inside chat(), preparing, waiting or decoding
        self.warmup: dict | None = None  # warm_up()'s seconds and decode-step choices
        self.videos = EngineVideos(model, self.limits, self.cache, self.run_on_model,
                                   allowed_local_path=allowed_local_path, allowed_domains=allowed_domains)

    @classmethod
    def from_model_dir(cls, model_dir, *, device=None, adapter=None, quantize=None, **kwargs) -> Engine:
        """Load ``model_dir`` (config.json, weights, tokenizer.json; a LoRA ``adapter`` merged in,
        ``quantize`` none/int8/int4) the way generate and eval do, and build an engine (not started)."""
        from videollama.inference.load import load_for_inference

        model, tokenizer = load_for_inference(model_dir, adapter=adapter, quantize=quantize, device=device)
        kwargs.setdefault("name", Path(model_dir).resolve().name)
        return cls(model, tokenizer, **kwargs)

    # ---- lifecycle ----------------------------------------------------------------------------
    def warm_up(self) -> dict:
        """Before :meth:`start`: choose, and compile where compiling wins, the decode step of every
        batch bucket (with ``compile``; nothing otherwise); {"seconds": s, "steps": [records]}."""
        if self._thread is not None:
            raise RuntimeError("warm_up runs before start(): the scheduler thread owns the model")
        t = time.perf_counter()
        steps = self.decoder.warm_up() if hasattr(self.decoder, "warm_up") else []
        self.warmup = {"seconds": time.perf_counter() - t, "steps": steps}
        compiled = sorted(r["rows"] for r in steps if r["choice"] == "compiled")
        log.info("warm-up %.1f s: %d decode-step shapes, compiled at rows %s, eager for the rest",
                 self.warmup["seconds"], len(steps), compiled or "none")
        return self.warmup

    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="videollama-scheduler", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None
        with self._cv:
            while self._jobs:
                self._jobs.popleft()[0].cancel()
        self.videos.close()

    def pause(self) -> None:
        """Stop admitting waiting requests (running ones go on): for draining, and for tests."""
        with self._cv:
            self._paused = True

    def resume(self) -> None:
        with self._cv:
            self._paused = False
            self._cv.notify_all()

    # ---- videos (videos.py) ------------------------------------------------------------------
    def video_from_part(self, part: dict, deadline: float | None = None) -> bytes:
        """The bytes of a ``video_url`` (or in-process ``video``) content part; blocking."""
        return self.videos.from_part(part, deadline)

    def preview(self, data: bytes, deadline: float | None = None):
        """The windows the model sees of ``data`` and a few of their frames
        (:class:`~videollama.serve.timeline.Preview`); decoded in a sandboxed worker (at most
        ``decode_workers`` at once), nothing encoded; blocking."""
        return self.videos.preview(data, deadline)

    async def apreview(self, data: bytes):
        """:meth:`preview` on the decode pool, within ``--request-timeout-s``."""
        return await self.videos.apreview(data)

    def _read_video(self, part: dict, deadline: float) -> tuple[bytes, str]:
        data = self.video_from_part(part, deadline)
        return data, content_hash(data)

    def run_on_model(self, fn, deadline: float | None = None):
        """``fn()`` on the scheduler thread, between two decode steps; its result (blocking; 504
        past ``deadline``, 503 when the engine closes first)."""
        future: Future = Future()
        with self._cv:
            if self._closing:
                raise APIError(503, "the server is shutting down")
            self._jobs.append((future, fn))
            self._cv.notify_all()
        try:
            return future.result(None if deadline is None else max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            future.cancel()
            raise deadline_error(self.limits) from None
        except CancelledError:
            raise APIError(503, "the server is shutting down") from None

    # ---- prompts ------------------------------------------------------------------------------
    def build_prompt(self, messages: list) -> tuple[list[int], list[dict]]:
        """Token ids of the conversation, ending ready for the answer, and its video parts."""
        return build_prompt(self.tokenizer, messages, self.limits)

    # ---- chat ---------------------------------------------------------------------------------
    async def chat(self, messages: list, *, max_tokens: int | None = None, temperature: float = 0.0,
                   top_p: float = 1.0, stop: list[str] | str | None = None, seed: int | None = None):
        """Async iterator of text deltas (str), then one :class:`ChatResult`. Raises APIError."""
        request = await self.submit(messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                    stop=stop, seed=seed)
        async for event in self.events(request):
            yield event

    async def submit(self, messages: list, *, max_tokens: int | None = None, temperature: float = 0.0,
                     top_p: float = 1.0, stop: list[str] | str | None = None, seed: int | None = None) -> ChatRequest:
        """Check, fetch and decode, then queue a request; raises APIError (429 when full)."""
        lim = self.limits
        with self._cv:
            if self.in_system >= lim.max_batch + lim.max_queue:
                raise APIError(429, f"the server is at its limit of {lim.max_batch} running and {lim.max_queue} "
                               "queued requests (--max-batch, --max-queue); retry later", code="queue_full",
                               headers={"Retry-After": str(lim.retry_after_s)})
            self.in_system += 1  # back down in _finish, or below if the request never gets queued
        try:
            deadline = time.monotonic() + lim.request_timeout_s
            return await self._prepare(messages, max_tokens, temperature, top_p, stop, seed, deadline)
        except BaseException:
            with self._cv:
                self.in_system -= 1
            raise

    async def events(self, request: ChatRequest):
        """A submitted request's text deltas, then its ChatResult; raises its APIError."""
        try:
            while True:
                event = await request.queue.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, ChatResult):
                    return
        finally:
            if not request.done:
                request.cancelled = True  # the client went away: the scheduler drops the row

    async def _prepare(self, messages, max_tokens, temperature, top_p, stop, seed, deadline) -> ChatRequest:
        lim = self.limits
        temperature, top_p, seed, stop = check_arguments(lim, max_tokens, temperature, top_p, stop, seed)
        ids, videos = self.build_prompt(messages)
        budget = self.max_seq_len - len(ids)
        if budget < 1:
            raise APIError(400, f"the prompt is {len(ids)} tokens, which leaves no room in the server's context of "
                           f"{self.max_seq_len} tokens (--max-model-len)", param="messages", code="context_length_exceeded")
        video, key = None, None
        if videos:  # one video (build_prompt refused two different ones): read once, decode once
            blob, key = await self.videos.off_loop(self.videos.media_pool, deadline, self._read_video, videos[0],
                                                   deadline)
            video = self.cache.get(key) or await self.videos.encoded(blob, key, deadline)
            del blob
        request = ChatRequest(ids, video, key, min(max_tokens or lim.max_tokens, budget), float(temperature),
                           float(top_p), seed, stop, deadline, asyncio.get_running_loop(), asyncio.Queue())
        if time.monotonic() > deadline:
            raise deadline_error(lim)
        with self._cv:
            if self._closing:
                raise APIError(503, "the server is shutting down")
            self._waiting.append(request)
            self._cv.notify_all()
        return request

    # ---- the scheduler thread -----------------------------------------------------------------
    def _loop(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                with self._cv:
                    while not (self._closing or self._active or self._jobs or (self._waiting and not self._paused)):
                        self._cv.wait(0.05)
                        self._expire_waiting()
                    if self._closing:
                        break
                    jobs = list(self._jobs)
                    self._jobs.clear()
                    self._expire_waiting()
                    admit = []
                    while not self._paused and self._waiting and self.decoder.free_slots > len(admit):
                        admit.append(self._waiting.popleft())
                    self.metrics.queue_depth, self.metrics.running = len(self._waiting), len(self._active) + len(admit)
                for future, fn in jobs:  # chunks of videos being encoded: one each per decode worker
                    if future.set_running_or_notify_cancel():
                        try:
                            future.set_result(fn())
                        except BaseException as e:  # noqa: BLE001 - the worker that asked raises it
                            future.set_exception(e)
                for request in admit:
                    self._admit(request)
                if self._active:
                    tokens = self._step()
                    if tokens is None:
                        continue
                    self.metrics.tokens_generated(len(tokens))
                    for slot, token in tokens.items():
                        if slot in self._active:
                            self._on_token(self._active[slot], token)
                self.metrics.queue_depth, self.metrics.running = len(self._waiting), len(self._active)
        for request in [*self._active.values(), *self._waiting]:
            self._finish(request, error=APIError(503, "the server is shutting down"))

    def _step(self) -> dict[int, int] | None:
        """One decode step of every row, or None when every row failed.

        A step that raises advances no row (the decoder moves its rows on only once each has its
        token), so it can be tried again without the row at fault. Which row that is the step
        does not say: the likeliest goes first (a sampled row before a greedy one, the lowest
        temperature and top_p first), failing only its own request, until the step goes through.
        """
        suspects = sorted(self._active.values(), key=lambda r: (r.temperature == 0.0, r.temperature, r.top_p))
        for request in suspects:
            try:
                return self.decoder.step()
            except Exception as e:  # noqa: BLE001 - one row's failure must not end the others
                log.exception("a decode step failed; taking out one row")
                self._finish(request, error=APIError(500, f"decoding this request failed: {type(e).__name__}: {e}",
                                                     code="decode_failed"))
        return None  # every row was taken out

    def _expire_waiting(self) -> None:
        now = time.monotonic()
        for request in [r for r in self._waiting if r.cancelled or now > r.deadline]:
            self._waiting.remove(request)
            self._finish(request, error=None if request.cancelled else deadline_error(self.limits))

    def _admit(self, request: ChatRequest) -> None:
        try:
            media_kv = None
            if request.video is not None:
                media_kv, request.timestamps = request.video.media_kv, request.video.timestamps
            slot, token = self.decoder.add(request.prompt_ids, media_kv=media_kv, temperature=request.temperature,
                                           top_p=request.top_p, seed=request.seed, max_new_tokens=request.max_new)
        except Exception as e:  # noqa: BLE001 - one bad request must not stop the others
            log.exception("admitting a request failed")
            self._finish(request, error=e if isinstance(e, APIError) else APIError(500, f"{type(e).__name__}: {e}"))
            return
        request.slot = slot
        self._active[slot] = request
        self.metrics.first_token_after(time.monotonic() - request.arrival)
        self.metrics.tokens_generated(1)
        self._on_token(request, token)

    def _on_token(self, request: ChatRequest, token: int) -> None:
        if request.cancelled:
            return self._finish(request)
        request.generated += 1
        if time.monotonic() > request.deadline:
            return self._finish(request, error=deadline_error(self.limits))
        if token == self.eos_id:
            return self._finish(request, reason="stop")
        request.tokens.append(token)
        text = self._text(request)
        for s in request.stop:
            if s in text:
                return self._finish(request, reason="stop", text=text[: text.index(s)].rstrip())
        if request.generated >= request.max_new:
            return self._finish(request, reason="length")
        safe = settled(text, request.stop)
        if len(safe) > request.sent:
            request.send(safe[request.sent:])
            request.sent = len(safe)

    def _text(self, request: ChatRequest) -> str:
        return self.tokenizer.decode(request.tokens, skip_special_tokens=True).lstrip()

    def _finish(self, request: ChatRequest, *, reason: str | None = None, error: BaseException | None = None,
                text: str | None = None) -> None:
        with self._cv:
            if request.done:
                return
            request.done = True
            self.in_system -= 1
        if request.slot is not None and self._active.pop(request.slot, None) is not None:
            self.decoder.remove(request.slot)
        if error is not None:
            return request.send(error)
        if request.cancelled:
            return
        text = self._text(request).strip() if text is None else text
        if len(text) > request.sent:
            request.send(text[request.sent:])
        usage = {"prompt_tokens": len(request.prompt_ids), "completion_tokens": request.generated,
                 "total_tokens": len(request.prompt_ids) + request.generated}
        request.send(ChatResult(text, reason, usage, request.timestamps))


def _default_decoder(model, *, max_batch: int, max_len: int, compile: bool = False):
    from videollama.inference.batch import BatchDecoder

    return BatchDecoder(model, max_batch=max_batch, max_len=max_len, compile=compile)
