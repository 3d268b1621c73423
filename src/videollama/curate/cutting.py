"""The per-video stage: probe -> one decoding pass (scene clips, each clip re-encoded to MP4, its
frames for every spec; onepass.py) -> motion.

:func:`process_video` is the unit of work that the local pool and Ray ``map`` both run, one
source video at a time. It writes each clip's MP4 and its sampled frames under the work folder
and returns the clip rows (plain dicts) and what it cost. A source that cannot be used returns
no rows and the ``BadSample`` reason, counted in stats.json.

Clip times are seconds from the source's first frame (as everywhere in the project); a clip
``[start, end)`` holds the decoded frames whose presentation time falls in it, re-encoded at
the source's nominal rate (libx264, yuv420p, one thread, so the bytes never depend on the
machine). The source is decoded once, in one bounded pass (``container.open_and_time`` and a
``WorkBound``), whatever the number of clips and specs (``onepass.py``; ``cut_clips`` and
``sample_frames`` are the same steps as separate passes, kept as the reference the tests and the
benchmark compare with).
"""

from __future__ import annotations

import io
import os
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from videollama.data.errors import DECODE_ERROR, BadSample

Spec = tuple[int, float, int]  # (num_frames, fps, size)


def spec_name(spec: Spec) -> str:
    num_frames, fps, size = spec
    return f"f{num_frames}_r{fps:g}_s{size}".replace(".", "p")


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader (or a resumed run) sees all of it or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def frames_path(work: Path, spec: Spec, clip_id: str) -> Path:
    return work / "frames" / spec_name(spec) / f"{clip_id}.npy"


def clip_path(work: Path, clip_id: str) -> Path:
    return work / "clips" / f"{clip_id}.mp4"


def load_frames(work: Path, spec: Spec, clip_id: str) -> np.ndarray:
    """The uint8 frames [F, S, S, 3] that :func:`process_video` sampled for ``spec``."""
    return np.load(frames_path(work, spec, clip_id), allow_pickle=False)


class _ClipEncoder:
    """One clip's MP4, fed frame by frame (H.264, yuv420p, constant rate, one thread)."""

    def __init__(self, width: int, height: int, rate: Fraction, crf: int):
        import av

        self.buffer = io.BytesIO()
        self.container = av.open(self.buffer, mode="w", format="mp4")
        self.stream = self.container.add_stream("libx264", rate=rate)
        self.stream.width, self.stream.height = width, height
        self.stream.pix_fmt = "yuv420p"
        self.stream.codec_context.thread_count = 1
        self.stream.options = {"preset": "ultrafast", "crf": str(crf), "threads": "1"}
        self.frames = 0
        self.width, self.height = width, height
        self.time_base = Fraction(1) / rate

    def add(self, frame) -> None:
        """One decoded frame (``av.VideoFrame``). A 4:2:0 frame of the encoder's size goes in as it
        is (no RGB round trip); any other is converted (cropped to even sides)."""
        import av

        if frame.format.name == "yuv420p" and (frame.width, frame.height) == (self.width, self.height):
            frame.pts, frame.time_base = self.frames, self.time_base  # constant rate from the clip's start
            frame.pict_type = av.video.frame.PictureType.NONE  # let the encoder choose, not the source
        else:
            rgb = frame.to_ndarray(format="rgb24")[: self.height, : self.width]
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts, frame.time_base = self.frames, self.time_base
        for packet in self.stream.encode(frame):
            self.container.mux(packet)
        self.frames += 1

    def finish(self) -> bytes:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()
        return self.buffer.getvalue()


def cut_clips(path: str, spans: list[tuple[float, float]], *, crf: int = 18, max_frames: int = 200_000,
              time_budget_s: float | None = 600.0) -> list[bytes | None]:
    """Decode ``path`` once and re-encode the frames of each span ``[start, end)`` (seconds from the
    first frame) into an MP4. Spans must be sorted and disjoint. Returns one MP4 (bytes) per span,
    or None for a span that no frame falls in. Raises BadSample for a file that fails to decode."""
    import av

    from videollama.data.container import WorkBound, nominal_rate, open_and_time

    deadline = None if time_budget_s is None else time.monotonic() + time_budget_s
    container, stream, origin, _duration, _timeless = open_and_time(path, path, 1, max_frames, deadline)
    bound = WorkBound(path, max_frames, deadline)
    rate = nominal_rate(stream).limit_denominator(1001)
    out: list[bytes | None] = [None] * len(spans)
    encoder: _ClipEncoder | None = None
    current = 0
    decoded = 0
    step = 1 / float(rate)
    previous_time = None
    try:
        try:
            for frame in container.decode(stream):
                decoded += 1
                bound.check(decoded, "cutting clips")
                if frame.pts is not None:
                    t = float((frame.pts - origin) * stream.time_base)
                else:  # no timestamp: one nominal frame after the previous one
                    t = 0.0 if previous_time is None else previous_time + step
                previous_time = t
                while current < len(spans) and t >= spans[current][1] - 1e-6:
                    if encoder is not None:
                        out[current] = encoder.finish()
                        encoder = None
                    current += 1
                if current == len(spans):
                    break
                if t < spans[current][0] - 1e-6:
                    continue
                if encoder is None:
                    # Even sides: 4:2:0 chroma needs them (an odd last row/column is dropped).
                    encoder = _ClipEncoder(frame.width // 2 * 2, frame.height // 2 * 2, rate, crf)
                encoder.add(frame)
        except av.error.FFmpegError as error:
            bound.check_deadline("cutting clips")
            raise BadSample(DECODE_ERROR, path, f"decoding failed after {decoded} frames: {error}") from error
        if encoder is not None and current < len(spans):
            out[current] = encoder.finish()
    finally:
        container.close()
    return out


def sample_frames(mp4: bytes, spec: Spec, name: str) -> np.ndarray:
    """uint8 [F, S, S, 3] frames of a clip with ``spec`` = (num_frames, fps, size): the window
    centred in the clip, short side to ``size``, centre crop: ``load_clip`` in evaluation mode,
    so a model scores exactly the pixels it would see in evaluation."""
    from videollama.data.video import load_clip

    num_frames, fps, size = spec
    frames, _ = load_clip(mp4, num_frames=num_frames, fps=fps, size=size, normalize=False, name=name)
    # load_clip returns uint8 / 255 as float32; rounding recovers the uint8 values exactly.
    pixels = np.rint(frames.numpy() * 255.0).astype(np.uint8)  # [F, 3, S, S]
    return np.ascontiguousarray(pixels.transpose(0, 2, 3, 1))  # [F, S, S, 3]


def process_video(source: dict[str, Any], settings: dict[str, Any], work: str) -> dict[str, Any]:
    """Probe one source video, then decode it once (``onepass.one_pass``): scene cuts, each clip
    encoded, each clip's frames for every spec; then the motion score of each clip.

    ``settings``: ``min_clip_s``, ``max_clip_s``, ``threshold`` (scene cuts), ``crf``,
    ``max_frames``, ``specs`` (list of Spec, the first being the motion spec), optionally
    ``max_buffer_bytes`` (``onepass.MAX_BUFFER_BYTES``).
    Returns ``{"source_id", "rows": [clip rows], "error": None | [reason, message],
    "seconds": {stage: s}, "probe": {...}}``; the stages of the pass are ``decode`` (demuxing and
    decoding), ``scenes`` (thumbnails, scores, cut decisions), ``cut_encode`` (H.264 encoding and
    writing the MP4s), ``sample_frames`` (resizing and cropping the specs' frames, writing them)
    and ``second_pass`` (a source whose scene outgrew the frame buffer, decoded again).
    """
    from videollama.curate.motion import motion_score
    from videollama.curate.onepass import MAX_BUFFER_BYTES, one_pass
    from videollama.curate.probe import MAX_PACKETS, probe_video

    work_dir = Path(work)
    seconds: dict[str, float] = {}
    result: dict[str, Any] = {"source_id": source["source_id"], "rows": [], "error": None, "seconds": seconds}

    def timed(name, fn, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0

    path = Path(source["path"])
    specs = [tuple(s) for s in settings["specs"]]
    try:
        probe = timed("probe", probe_video, path)
        scene_kwargs = {} if settings.get("threshold") is None else {"threshold": settings["threshold"]}
        t0 = time.perf_counter()
        decoded = one_pass(path, probe, min_clip_s=settings["min_clip_s"], max_clip_s=settings["max_clip_s"],
                           specs=specs, crf=settings["crf"], max_frames=min(MAX_PACKETS, settings["max_frames"]),
                           max_buffer_bytes=settings.get("max_buffer_bytes", MAX_BUFFER_BYTES), **scene_kwargs)
        cpu = decoded["cpu"]
        seconds["decode"] = cpu["decode"]
        seconds["cut_encode"] = cpu["encode"]
        seconds["sample_frames"] = cpu["sample"]
        seconds["second_pass"] = cpu["second_pass"]
        seconds["scenes"] = time.perf_counter() - t0 - cpu["decode"] - cpu["encode"] - cpu["sample"] - cpu["second_pass"]
        rows = []
        for index, (start, end, mp4, frames) in enumerate(decoded["clips"]):
            if mp4 is None:
                continue
            clip_id = f"{source['source_id']}-{index:04d}"
            timed("cut_encode", atomic_write, clip_path(work_dir, clip_id), mp4)
            for spec in specs:
                buf = io.BytesIO()
                np.save(buf, frames[spec], allow_pickle=False)
                timed("sample_frames", atomic_write, frames_path(work_dir, spec, clip_id), buf.getvalue())
            motion = float(timed("motion", motion_score, frames[specs[0]]))
            rows.append({
                "clip_id": clip_id, "source_id": source["source_id"],
                "start_s": round(start, 6), "end_s": round(end, 6), "duration_s": round(end - start, 6),
                "width": int(probe["width"]), "height": int(probe["height"]), "fps": float(probe["fps"]),
                "texts": list(source["texts"]), "motion": motion, "mp4_bytes": len(mp4),
            })
        result["rows"] = rows
        result["probe"] = {k: probe[k] for k in probe}
    except BadSample as e:
        result["error"] = [e.reason, str(e)]
    except FileNotFoundError as e:
        result["error"] = ["missing_video", f"{path}: {e}"]
    return result
