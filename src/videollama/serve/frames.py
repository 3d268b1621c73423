"""A request's video decoded into the model's windows, out of process, a chunk of windows at a time.

Decoding never runs in the server process. A first sandboxed child (``videollama.data.untrusted``'s
forkserver, with a memory limit and a wall-clock timeout) reads the declared resolution and
duration, which are checked against the server's limits (400 naming the limit) before anything
is sized by them. A second child opens the video under the model directory's own policy
(``preprocess``: ``data/windows.py``, exactly what ``videollama eval`` decodes: the windows that
tile the whole video, or ``max_windows`` of them spread over it) and streams the windows to the
server a chunk at a time (:func:`stream_windows`): per chunk its uint8 pixels
``[w, F, 3, S, S]`` and every frame's time ``[w, F]``, as raw bytes of the exact sizes the server
expects (never a pickle: the child handles hostile input, the server trusts nothing it says).
The child blocks until the server has taken a chunk, so neither side ever holds more than one
chunk of frames: the caller encodes each chunk and drops it (memory bounded by latents).

Time: ``--decode-timeout-s`` bounds the time the server waits for the child (its decoding), the
request's deadline bounds everything (past it: 504); the child is killed at either.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from videollama.serve.limits import ServeLimits, deadline_error
from videollama.serve.media import _bad

# What every chunk holds at most, in windows (eval's default too: the same latents, bit for bit).
WINDOWS_PER_CHUNK = 8
_HEADER_BYTES = 4096  # one JSON line: the video's duration and windows, or a chunk's place
_TIME_SLACK_S = 1.0  # a frame's time may lie this far past the declared duration (rounding)


@dataclass
class StreamedVideo:
    """What :func:`stream_windows` saw: ``duration`` (s), ``starts`` (one per window, the
    policy's) and ``frame_times`` float64 ``[W, F]``: the moment every frame the model sees shows."""

    duration: float
    starts: list[float]
    frame_times: object

    def frame_times_list(self, decimals: int = 4) -> list[list[float]]:
        """Per window, every frame's time, rounded: eval's ``timestamps`` in predictions.jsonl."""
        return [[round(float(t), decimals) for t in window] for window in self.frame_times]


# ---- the declaration ---------------------------------------------------------------------------

def _mapped() -> int:
    import resource

    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[0]) * resource.getpagesize()
    except OSError:
        return 0


def _limit_memory(memory_bytes: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (_mapped() + memory_bytes,) * 2)


def _probe_child(send, data: bytes, memory_bytes: int, time_budget_s: float) -> None:
    _limit_memory(memory_bytes)
    try:
        from videollama.data.decoding import open_and_time

        with open_and_time(data, f"<{len(data)} bytes>", 1, 3000, time.monotonic() + time_budget_s) as video:
            width, height = video.stream.codec_context.width, video.stream.codec_context.height
            duration = video.duration
        send.send(("ok", (int(width), int(height), float(duration))))
    except BaseException as e:  # noqa: BLE001 - reported to the parent as a bad video
        send.send(("bad", f"{type(e).__name__}: {e}"))
    send.close()


def _time_for(limits: ServeLimits, deadline: float | None) -> tuple[float, bool]:
    """(seconds a decode step may take, whether the request's deadline is what sets them)."""
    if deadline is None or deadline - time.monotonic() >= limits.decode_timeout_s:
        return limits.decode_timeout_s, False
    left = deadline - time.monotonic()
    if left <= 0:
        raise deadline_error(limits)
    return left, True


def probe_video(data: bytes, limits: ServeLimits, deadline: float | None = None) -> tuple[int, int, float]:
    """(width, height, duration s) as the file declares them, read in a sandboxed child."""
    from videollama.data.untrusted import mp_context

    seconds, by_deadline = _time_for(limits, deadline)
    receive, send = mp_context().Pipe(duplex=False)
    child = mp_context().Process(target=_probe_child, daemon=True,
                                  args=(send, data, limits.decode_memory_bytes, seconds))
    child.start()
    send.close()
    try:
        if not receive.poll(seconds + (0 if by_deadline else 1)):
            if by_deadline:
                raise deadline_error(limits)
            raise _bad(f"reading the video's header took over {limits.decode_timeout_s:g} s "
                       "(--decode-timeout-s)", "invalid_video")
        try:
            kind, payload = receive.recv()
        except EOFError:
            raise _bad("the video could not be read (its decoder died)", "invalid_video") from None
    finally:
        if child.is_alive():
            child.kill()
        child.join()
        receive.close()
    if kind != "ok":
        raise _bad(f"the video could not be read: {payload}", "invalid_video")
    return payload


def check_declared(width: int, height: int, duration: float, limits: ServeLimits) -> None:
    """A 400 naming the limit for a video whose declared frame size or duration is over it."""
    if width * height > limits.max_video_pixels:
        raise _bad(f"the video's frames are {width}x{height} = {width * height} pixels, over the server's "
                   f"limit of {limits.max_video_pixels} (--max-video-pixels)", "video_too_large")
    if not math.isfinite(duration) or duration > limits.max_video_duration_s:
        raise _bad(f"the video lasts {duration:.1f} s, over the server's limit of {limits.max_video_duration_s:g} s "
                   "(--max-video-duration-s)", "video_too_long")


# ---- the windows -------------------------------------------------------------------------------

def _windows_child(send, data: bytes, preprocess, memory_bytes: int, time_budget_s: float,
                   windows_per_chunk: int) -> None:
    """Open the video under the policy, then stream its windows (module docstring)."""
    _limit_memory(memory_bytes)

    def say(**fields) -> None:
        send.send_bytes(json.dumps(fields).encode())

    try:
        import torch

        from videollama.data.errors import BadSample
        from videollama.data.windows import open_windows

        try:
            with open_windows(data, preprocess, name=f"<{len(data)} bytes>", normalize=False,
                              time_budget_s=time_budget_s) as whole:
                say(duration=float(whole.duration), windows=whole.num_windows)
                for chunk in whole.chunks(windows_per_chunk):
                    # normalize=False is the uint8 values / 255: back to them exactly.
                    pixels = (chunk.frames * 255.0).round_().to(torch.uint8)  # [w, F, 3, S, S]
                    say(first=chunk.first, windows=chunk.frames.shape[0])
                    send.send_bytes(pixels.numpy().tobytes())
                    send.send_bytes(chunk.times.numpy().astype("<f8").tobytes())
                    del chunk, pixels
            say(done=True)
        except BadSample as e:
            oom = isinstance(e.__cause__, MemoryError)
            say(bad="out_of_memory" if oom else e.reason, message=str(e))
    except MemoryError as e:
        say(bad="out_of_memory", message=f"{type(e).__name__}: {e}")
    except Exception as e:  # noqa: BLE001 - reported to the parent as a bad video
        say(bad="error", message=f"{type(e).__name__}: {e}")
    send.close()


class _Child:
    """The windows child's pipe, read within the decode time and the request's deadline."""

    def __init__(self, receive, limits: ServeLimits, deadline: float | None) -> None:
        self.receive, self.limits, self.deadline = receive, limits, deadline
        self.waited = 0.0  # seconds spent waiting for the child (its decoding)

    def _wait(self) -> None:
        budget = self.limits.decode_timeout_s - self.waited
        by_deadline = self.deadline is not None and self.deadline - time.monotonic() < budget
        if by_deadline:
            budget = self.deadline - time.monotonic()
        t = time.monotonic()
        ready = budget > 0 and self.receive.poll(budget)
        self.waited += time.monotonic() - t
        if not ready:
            if by_deadline:
                raise deadline_error(self.limits)
            raise _bad(f"decoding the video took over {self.limits.decode_timeout_s:g} s (--decode-timeout-s)",
                       "invalid_video")

    def message(self, size: int | None = None) -> dict | bytes:
        """The next message: a JSON header (``size`` None), or exactly ``size`` raw bytes."""
        self._wait()
        try:
            raw = self.receive.recv_bytes(_HEADER_BYTES if size is None else size)
        except EOFError:
            raise _bad("the video could not be decoded (its decoder died)", "invalid_video") from None
        except OSError:  # longer than allowed
            raise _bad("the video's decoder sent more than it may", "invalid_video") from None
        if size is not None:
            if len(raw) != size:
                raise _bad("the video's decoder sent a chunk of the wrong size", "invalid_video")
            return raw
        try:
            header = json.loads(raw)
        except ValueError:
            header = None
        if not isinstance(header, dict):
            raise _bad("the video's decoder sent a malformed message", "invalid_video")
        if "bad" in header:
            if header.get("bad") == "timeout" and self.deadline is not None and time.monotonic() > self.deadline:
                raise deadline_error(self.limits)
            raise _bad(f"the video could not be decoded: {str(header.get('message'))[:500]}", "invalid_video")
        return header


def check_opening(header: dict, preprocess, limits: ServeLimits) -> tuple[float, list[float]]:
    """The child's opening line, checked: (duration, window starts). The number of windows is the
    policy's for that duration, so at most ``max_windows``; nothing is sized before this passes."""
    from videollama.data.windows import window_starts

    duration, windows = header.get("duration"), header.get("windows")
    if not isinstance(duration, float | int) or isinstance(duration, bool) or not 0 <= duration < math.inf:
        raise _bad("the video's decoder sent no valid duration", "invalid_video")
    check_declared(0, 0, float(duration), limits)
    starts = window_starts(float(duration), preprocess.window_s, preprocess.max_windows)
    if windows != len(starts):
        raise _bad(f"the video's decoder announced {windows!r} windows; the policy gives {len(starts)}",
                   "invalid_video")
    return float(duration), starts


def stream_windows(data: bytes, preprocess, limits: ServeLimits, on_chunk: Callable, *,
                   deadline: float | None = None, windows_per_chunk: int = WINDOWS_PER_CHUNK) -> StreamedVideo:
    """Check the video's declaration, then decode its windows in a sandboxed child, calling
    ``on_chunk(first, windows, pixels uint8 [w, F, 3, S, S], times float64 [w, F])`` for each chunk
    in order (``windows``: the video's W) (module docstring). Raises APIError (400 for the video's faults, 504 past ``deadline``)."""
    import numpy as np
    import torch

    from videollama.data.untrusted import mp_context

    width, height, declared = probe_video(data, limits, deadline)
    check_declared(width, height, declared, limits)
    _time_for(limits, deadline)  # 504 now if the deadline has passed
    f, size = preprocess.num_frames, preprocess.size
    receive, send = mp_context().Pipe(duplex=False)
    # The child's own budget only backs up the server's: it is killed when the server stops waiting.
    child = mp_context().Process(target=_windows_child, daemon=True, args=(
        send, data, preprocess, limits.decode_memory_bytes, limits.decode_timeout_s + limits.request_timeout_s,
        windows_per_chunk))
    child.start()
    send.close()
    try:
        pipe = _Child(receive, limits, deadline)
        duration, starts = check_opening(pipe.message(), preprocess, limits)
        frame_times = torch.empty(len(starts), f, dtype=torch.float64)
        done = 0
        while done < len(starts):
            header = pipe.message()
            first, w = header.get("first"), header.get("windows")
            if first != done or not isinstance(w, int) or isinstance(w, bool) or not 1 <= w <= windows_per_chunk \
                    or done + w > len(starts):
                raise _bad("the video's decoder sent windows out of order", "invalid_video")
            raw = pipe.message(w * f * 3 * size * size)
            pixels = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(w, f, 3, size, size)
            del raw
            times = np.frombuffer(pipe.message(w * f * 8), dtype="<f8").reshape(w, f)
            if not (np.isfinite(times).all() and times.min() >= 0 and times.max() <= duration + _TIME_SLACK_S):
                raise _bad("the video's decoder sent frame times outside the video", "invalid_video")
            frame_times[done:done + w] = torch.from_numpy(times.copy())
            on_chunk(done, len(starts), pixels, frame_times[done:done + w])
            del pixels
            done += w
        if pipe.message().get("done") is not True:
            raise _bad("the video's decoder sent more windows than the policy gives", "invalid_video")
    finally:
        if child.is_alive():
            child.kill()
        child.join()
        receive.close()
    return StreamedVideo(duration=duration, starts=starts, frame_times=frame_times)


def normalise(pixels, preprocess):
    """uint8 pixels [..., 3, S, S] -> float32 as the model expects, with ``load_clip``'s (and
    ``open_windows``') own arithmetic on the same values: bit-identical to what eval feeds."""
    import torch

    std = torch.tensor(preprocess.std, dtype=torch.float32).view(3, 1, 1)
    mean = torch.tensor(preprocess.mean, dtype=torch.float32).view(3, 1, 1)
    return pixels.float().mul_(1.0 / (255.0 * std)).sub_(mean / std)


@dataclass
class DecodedVideo:
    """Every window at once (:func:`decode_video`): ``pixels`` uint8 ``[W, F, 3, S, S]``,
    ``frames`` float32 normalised, ``timestamps`` per window every frame's time (s)."""

    pixels: object
    frames: object
    timestamps: list[list[float]]


def decode_video(data: bytes, preprocess, limits: ServeLimits, deadline: float | None = None) -> DecodedVideo:
    """Every window's frames at once, through :func:`stream_windows`: for short videos and tests
    (the server encodes chunk by chunk instead, never holding a long video's frames)."""
    import torch

    chunks = []
    video = stream_windows(data, preprocess, limits, lambda first, windows, pixels, times: chunks.append(pixels),
                           deadline=deadline)
    pixels = torch.cat(chunks)
    return DecodedVideo(pixels=pixels, frames=normalise(pixels, preprocess), timestamps=video.frame_times_list())
