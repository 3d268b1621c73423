"""What the chat page shows of a video: the windows the model sees on a timeline, and a few of
their frames (the gallery), from the engine's own sandboxed decoder (serve/frames.py).

A long video is hundreds of windows; the page shows every window on the timeline (a strip, one
mark per window, as wide as the window) and at most ``PREVIEW_FRAMES`` frames in the gallery:
every frame when they are that few, else the first frame of ``PREVIEW_FRAMES`` windows spread
evenly over the video. Only those frames are kept while the video is decoded.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

from videollama.serve.frames import stream_windows
from videollama.serve.limits import ServeLimits

PREVIEW_FRAMES = 32


@dataclass
class Preview:
    """``pixels`` uint8 ``[K, S, S, 3]`` (the gallery's frames) shown at ``times`` (K seconds);
    ``frame_times`` every frame the model sees, per window (s); ``window_s``; ``duration`` (s)."""

    pixels: object
    times: list[float]
    frame_times: list[list[float]]
    window_s: float
    duration: float

    @property
    def starts(self) -> list[float]:
        return [window[0] for window in self.frame_times]


def shown_frames(windows: int, frames: int, cap: int = PREVIEW_FRAMES) -> list[tuple[int, int]]:
    """(window, frame) of each gallery frame: every one when ``windows * frames <= cap``, else the
    first frame of ``cap`` windows spread evenly (each window at most once)."""
    if windows * frames <= cap:
        return [(w, f) for w in range(windows) for f in range(frames)]
    if windows <= cap:
        return [(w, 0) for w in range(windows)]
    return [(round(k * (windows - 1) / (cap - 1)), 0) for k in range(cap)]


def preview_video(data: bytes, preprocess, limits: ServeLimits, deadline: float | None = None) -> Preview:
    """Decode ``data`` as the engine does and keep only the gallery's frames (blocking)."""
    import torch

    kept: dict[tuple[int, int], object] = {}
    wanted: set[tuple[int, int]] = set()

    def on_chunk(first: int, windows: int, pixels, times) -> None:
        if not wanted:
            wanted.update(shown_frames(windows, preprocess.num_frames))
        for w in range(pixels.shape[0]):
            for f in range(pixels.shape[1]):
                if (first + w, f) in wanted:
                    kept[(first + w, f)] = pixels[w, f].permute(1, 2, 0).clone()  # [S, S, 3]

    video = stream_windows(data, preprocess, limits, on_chunk, deadline=deadline)
    order = sorted(kept)
    frame_times = video.frame_times_list()
    return Preview(pixels=torch.stack([kept[k] for k in order]).numpy(), times=[frame_times[w][f] for w, f in order],
                   frame_times=frame_times, window_s=preprocess.window_s, duration=video.duration)


def frame_caption(index: int, seconds: float) -> str:
    """The caption under frame ``index`` (0-based) of the gallery, e.g. ``frame 1 · 0.25 s``."""
    return f"frame {index + 1} · {seconds:.2f} s"


async def preview_frames(engine, video: bytes) -> tuple[list[tuple[object, str]], Preview]:
    """The gallery items for a video, ``(uint8 [H, W, 3] frame, caption)`` per frame shown, and
    the :class:`Preview`; from the engine's own decoding (``engine.apreview``), off the event loop."""
    preview = await engine.apreview(video)
    return [(preview.pixels[i], frame_caption(i, t)) for i, t in enumerate(preview.times)], preview


def preview_status(preview: Preview) -> str:
    """The page's status for a previewed video: what the model sees, then its timeline."""
    windows = len(preview.frame_times)
    frames = sum(len(w) for w in preview.frame_times)
    shown = "" if len(preview.times) == frames else f" (the gallery shows {len(preview.times)} of them)"
    return (f"The model sees {frames} frames in {windows} window{'s' * (windows != 1)}{shown}.\n\n"
            + timeline_html(preview.starts, preview.window_s, preview.duration))


def answer_status(timestamps: list[list[float]], window_s: float, segment: tuple[float, float]) -> str:
    """The page's status after an answer that names a time range: the range on the timeline of
    the windows the model saw (``timestamps``: the chat result's, per window)."""
    starts = [w[0] for w in timestamps]
    end = max(max(w) for w in timestamps)
    return (f"The answer points at {clock(segment[0])}–{clock(segment[1])}.\n\n"
            + timeline_html(starts, window_s, end, segment))


def clock(seconds: float) -> str:
    """``75.5`` -> ``1:15.5``; under a minute ``12.0 s``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}:{rest:04.1f}"


def windows_text(starts: list[float], window_s: float, limit: int = 12) -> str:
    """The windows as text: ``0.0-4.0 s, 4.0-8.0 s, ...`` (the first and last few of many)."""
    spans = [f"{clock(s)}–{clock(s + window_s)}" for s in starts]
    if len(spans) > limit:
        spans = [*spans[: limit // 2], "…", *spans[-(limit // 2):]]
    return ", ".join(spans)


def timeline_html(starts: list[float], window_s: float, duration: float,
                  segment: tuple[float, float] | None = None) -> str:
    """A strip as wide as the video: one mark per window the model sees, and ``segment`` (an
    answer's time range) highlighted; below it the windows' times as text."""
    span = max(duration, (starts[-1] + window_s) if starts else 0.0, 1e-6)

    def bar(start: float, end: float, css: str, title: str) -> str:
        left, width = 100 * start / span, max(100 * (min(end, span) - start) / span, 0.3)
        return (f'<div class="{css}" title="{html.escape(title)}" style="position:absolute;top:0;bottom:0;'
                f'left:{left:.3f}%;width:{width:.3f}%"></div>')

    marks = [bar(s, s + window_s, "window", f"window {i + 1}: {clock(s)}–{clock(s + window_s)}")
             for i, s in enumerate(starts)]
    if segment is not None:
        marks.append(bar(segment[0], segment[1], "answer", f"the answer: {clock(segment[0])}–{clock(segment[1])}"))
    answer = f" The answer points at {clock(segment[0])}–{clock(segment[1])}." if segment else ""
    return (f'<div id="timeline-strip" style="position:relative;height:18px">{"".join(marks)}</div>'
            f'<p id="timeline-text">{len(starts)} windows of {window_s:g} s over {clock(duration)}: '
            f'{html.escape(windows_text(starts, window_s))}.{html.escape(answer)}</p>')


def answer_segment(text: str) -> tuple[float, float] | None:
    """The time range an answer names ("from 12 to 20 seconds"), or None."""
    from videollama.eval.grounding import parse_time_range

    return parse_time_range(text)


TIMELINE_CSS = """
#timeline-strip { background: #eee; border-radius: 3px; }
#timeline-strip .window { background: rgba(40, 110, 220, 0.55); border-right: 1px solid #fff; }
#timeline-strip .answer { background: rgba(230, 120, 20, 0.75); top: 4px !important; bottom: 4px !important; }
"""
