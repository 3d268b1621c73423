"""A clip's files under the work folder, and the encoder that makes its MP4.

The per-video stage (``cutting.process_video``, decoding with ``onepass.one_pass``) writes, per
clip, ``clips/<clip_id>.mp4`` and for every frame spec ``frames/<spec name>/<clip_id>.npy``; the
later stages (scoring, records, output) read them back. This module depends on no other module
of the project, so that every stage can use it.
"""

from __future__ import annotations

import io
import os
from fractions import Fraction
from pathlib import Path

import numpy as np

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
    """The uint8 frames [F, S, S, 3] that ``cutting.process_video`` sampled for ``spec``."""
    return np.load(frames_path(work, spec, clip_id), allow_pickle=False)


class ClipEncoder:
    """One clip's MP4, fed frame by frame (H.264, yuv420p, constant rate, one thread, so the bytes
    never depend on the machine)."""

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
