"""A whole video -> the visual latents the decoder reads, a few windows at a time.

    video file -> open_windows (the model's policy: data/windows.py) -> chunk of w windows
        frames [w, F, 3, S, S] -> model.encode_video(frames, times) -> latents [w, L, D_v]
        -> written into the video's latents [W, L, D_v]; the chunk's frames are dropped
    -> EncodedVideo(latents [W * L, D_v], frame_times [W, F])

Every consumer of a whole video at inference time (``videollama generate``, ``videollama eval``)
encodes it here, so memory is bounded by latents, never by frames. While a video is encoded,
what tensors hold at most (bytes, ``b`` per element, float32 pixels):

    latents                 W x L x D_v x b          (the video's, filled chunk by chunk)
  + one chunk of frames     w x F x 3 x S^2 x 4      (and its uint8 pixels while they are converted)
  + the encoder's activations for one chunk

and while it is answered (``inference.generate.generate``):

    latents x (1 + 2 x C x D / D_v)          (each of the C cross-attention blocks keeps the
                                              video's keys and values, [H, W x L, hd] each with
                                              H x hd = D the decoder's width, once per video)
  + the prompt's cross-attention scores, H x T x W x L per video (T prompt tokens; CPU SDPA)
  + the text's KV cache and activations (as for a clip).

The frames never add up: ``tests/test_long_video_memory.py`` checks the encoding step's peak
against the first formula with torch's allocator trace.

``single_frame`` is the ablation of ``eval --frames 1``: ONE frame for the whole video (the one
on screen at half its duration) fills every frame of every window; the windows keep their
times, so the model gets its usual input with no motion anywhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions: the eval command line reads this module's default
# before it loads a model, and `videollama eval --help` need not start torch.
DEFAULT_WINDOWS_PER_CHUNK = 8


@dataclass
class EncodedVideo:
    """One whole video as the decoder reads it.

    latents: [W * L, D_v], its W windows' stamped latents end to end in time order (L per window);
    frame_times: [W, F] float64, seconds from the video's start, the moment each frame the model
    saw shows (under ``single_frame`` every entry is the one frame's time); duration: seconds.
    """

    latents: torch.Tensor
    frame_times: torch.Tensor
    duration: float

    @property
    def num_windows(self) -> int:
        return self.frame_times.shape[0]

    def frame_times_list(self, decimals: int = 4) -> list[list[float]]:
        """``frame_times`` as nested lists (one per window), rounded: what predictions.jsonl and
        ``generate --show-frames`` report."""
        return [[round(float(t), decimals) for t in window] for window in self.frame_times]


def encode_whole_video(model: Any, source: Any, *, single_frame: bool = False,
                       windows_per_chunk: int = DEFAULT_WINDOWS_PER_CHUNK, name: str | None = None,
                       time_budget_s: float | None = None) -> EncodedVideo:
    """Decode ``source`` (a path or the file's bytes) under ``model.config.preprocess``'s policy and
    encode it ``windows_per_chunk`` windows at a time (module docstring).

    Raises ``BadSample`` (with its reason) for any video that cannot be decoded, or
    ``FileNotFoundError``; what the model raises propagates unchanged (it is not the video's
    fault). time_budget_s: None for ``open_windows``' default.
    """
    import torch

    from videollama.data.windows import open_windows

    if windows_per_chunk < 1:
        raise ValueError(f"windows_per_chunk must be >= 1, got {windows_per_chunk}")
    pre = model.config.preprocess
    param = next(model.vision.parameters())  # int8 weights leave the vision side in floating point
    if name is None:
        name = f"<{len(source)} bytes>" if isinstance(source, bytes | bytearray | memoryview) else str(source)
    kwargs = {} if time_budget_s is None else {"time_budget_s": time_budget_s}
    with _as_bad_sample(name, lambda: open_windows(source, pre, name=name, **kwargs)) as whole:
        w_total, f = whole.num_windows, pre.num_frames
        chunks = _decoding(name, _one_frame_chunks(source, whole, windows_per_chunk, name) if single_frame
                           else _decoded_chunks(whole, windows_per_chunk))
        latents = None  # [W, L, D_v], allocated once the first chunk says L
        frame_times = torch.empty(w_total, f, dtype=torch.float64)
        for first, frames, stamp_times, shown_times in chunks:
            with torch.no_grad():  # not inference_mode: the latents may feed a forward with autograd on
                chunk_latents = model.encode_video(frames.to(device=param.device, dtype=param.dtype),
                                                   stamp_times.to(param.device))  # [w, L, D_v]
                if latents is None:
                    latents = chunk_latents.new_empty((w_total, *chunk_latents.shape[1:]))
                latents[first:first + chunk_latents.shape[0]] = chunk_latents
            frame_times[first:first + shown_times.shape[0]] = shown_times
            del frames, chunk_latents  # the chunk's frames go before the next chunk is decoded
        duration = whole.duration
    return EncodedVideo(latents=latents.flatten(0, 1), frame_times=frame_times, duration=duration)


def _as_bad_sample(name: str, open_video):
    """``open_video()``, with any error but a missing file turned into ``BadSample``."""
    from videollama.data.errors import DECODE_ERROR, BadSample

    try:
        return open_video()
    except (BadSample, FileNotFoundError):
        raise
    except Exception as e:  # noqa: BLE001 - PyAV and the container checks raise many kinds
        raise BadSample(DECODE_ERROR, name, f"{type(e).__name__}: {e}") from e


def _decoding(name: str, chunks: Iterator) -> Iterator:
    """The chunks, with a decoding failure of any kind turned into ``BadSample``. Only decoding runs
    inside: the caller encodes between two chunks, outside this generator."""
    from videollama.data.errors import DECODE_ERROR, BadSample

    try:
        yield from chunks
    except BadSample:
        raise
    except Exception as e:  # noqa: BLE001 - a broken file of any kind is the video's fault, one reason
        raise BadSample(DECODE_ERROR, name, f"{type(e).__name__}: {e}") from e


# (first window, frames [w, F, 3, S, S], stamp times [w, F], shown times [w, F])
ChunkParts = tuple[int, "torch.Tensor", "torch.Tensor", "torch.Tensor"]


def _decoded_chunks(whole: Any, windows_per_chunk: int) -> Iterator[ChunkParts]:
    for chunk in whole.chunks(windows_per_chunk):
        first, frames, times = chunk.first, chunk.frames, chunk.times
        del chunk
        yield first, frames, times, times
        del frames  # before the next chunk is decoded: the caller holds the only reference now


def _one_frame_chunks(source: Any, whole: Any, windows_per_chunk: int, name: str | None) -> Iterator[ChunkParts]:
    """The frame at half the duration, repeated into every frame of every window (no other decode)."""
    import torch

    from videollama.data.video import load_clip

    pre = whole.pre
    frame, shown = load_clip(source, num_frames=1, fps=pre.fps, size=pre.size, mean=pre.mean, std=pre.std,
                             start=whole.duration / 2, name=name)  # [1, 3, S, S], [1]
    times = torch.from_numpy(whole.times)  # [W, F] the windows' sample times: their stamps
    for first in range(0, whole.num_windows, windows_per_chunk):
        last = min(first + windows_per_chunk, whole.num_windows)
        frames = frame.expand(last - first, pre.num_frames, *frame.shape[1:]).contiguous()  # [w, F, 3, S, S]
        yield first, frames, times[first:last], shown.expand(last - first, pre.num_frames)
        del frames


def pad_videos(videos: list[EncodedVideo]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """U encoded videos -> ``(latents [U, L_max, D_v], key mask [U, L_max] bool or None)``, each
    video's latents at the front of its row (the mask True there); None when all are as long.
    One video is a view of its latents (no copy: a long video's latents are not duplicated)."""
    import torch

    if not videos:
        raise ValueError("pad_videos needs at least one video")
    lengths = [v.latents.shape[0] for v in videos]
    if len(videos) == 1:
        return videos[0].latents[None], None
    if len(set(lengths)) == 1:
        return torch.stack([v.latents for v in videos]), None
    first = videos[0].latents
    out = first.new_zeros((len(videos), max(lengths), first.shape[1]))
    mask = torch.zeros(len(videos), max(lengths), dtype=torch.bool, device=first.device)
    for row, (video, length) in enumerate(zip(videos, lengths)):
        out[row, :length] = video.latents
        mask[row, :length] = True
    return out, mask
