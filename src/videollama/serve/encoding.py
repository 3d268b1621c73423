"""A request's video -> its cache entry: the whole video under the model's policy, encoded a chunk
of windows at a time as the sandboxed decoder streams them (serve/frames.py).

    bytes -> stream_windows (child) -> chunk: uint8 pixels [w, F, 3, S, S], times [w, F]
          -> normalised -> model.encode_video(frames, times) -> latents [w, L, D_v]  (on the model's thread)
          -> written into the video's latents [W, L, D_v]; the chunk's frames are dropped
    -> every cross-attention block's K/V of the W * L latents, once -> VideoEntry

What ``videollama eval`` feeds the model for the same file, bit for bit: the same windows and
frame times (``data/windows.py``), the same normalisation, the same chunks of
``frames.WINDOWS_PER_CHUNK`` windows through ``encode_video`` (``inference/whole_video.py``).
Memory while a video is encoded: its latents, one chunk of frames (and the child's one chunk),
then the K/V (``cache.py`` says what an entry holds).

The model runs on one thread (the engine's scheduler): ``run_on_model(fn)`` hands it each chunk's
encoding and waits for the result, so encodings interleave with the decode steps of the requests
already answering, a chunk at a time.
"""

from __future__ import annotations

from collections.abc import Callable

from videollama.serve.cache import VideoEntry
from videollama.serve.frames import normalise, stream_windows
from videollama.serve.limits import ServeLimits


def encode_video_entry(model, data: bytes, key: str, limits: ServeLimits, run_on_model: Callable, *,
                       deadline: float | None = None) -> VideoEntry:
    """Decode ``data`` (sandboxed, streamed) and encode it chunk by chunk (module docstring).
    Raises APIError for the video's faults and the deadline; what the model raises propagates."""
    pre = model.config.preprocess
    param = next(model.vision.parameters())  # int8 weights leave the vision side in floating point
    state: dict = {}  # "latents": [W, L, D_v], allocated at the first chunk (W checked by stream_windows)

    def on_chunk(first: int, windows: int, pixels, times) -> None:
        frames = normalise(pixels, pre).to(device=param.device, dtype=param.dtype)  # [w, F, 3, S, S]
        del pixels

        def encode():
            chunk = model.encode_video(frames, times.to(param.device))  # [w, L, D_v]
            if "latents" not in state:
                state["latents"] = chunk.new_empty((windows, *chunk.shape[1:]))
            state["latents"][first:first + chunk.shape[0]] = chunk

        run_on_model(encode)

    video = stream_windows(data, pre, limits, on_chunk, deadline=deadline)
    latents = state["latents"].flatten(0, 1)[None]  # [1, W * L, D_v]
    media_kv = run_on_model(lambda: model.decoder.project_media(latents))
    return VideoEntry(key, latents, media_kv, video.frame_times_list())
