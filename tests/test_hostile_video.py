"""load_clip against hostile input: small files that declare enormous work, and paths that are no files.

Each test builds its input itself (tests/badvideos.py writes raw H.264 bit by bit).
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import av
import pytest

from badvideos import encode_video, skip_frame_flood
from videollama.data import container, errors
from videollama.data.errors import BadSample
from videollama.data.video import DEFAULT_MAX_DECODED_FRAMES, load_clip

pytestmark = pytest.mark.usefixtures("no_hang")  # a FIFO opened for reading would block forever


# ---- hostile files through load_clip ---------------------------------------------------------------

def test_skip_frame_flood_stops_at_the_deadline(tmp_path):
    # 48 KB: an SPS for 8192x4880 (just inside the size limits), 4000 skip frames, no keyframe.
    # Nothing ever decodes, and each frame costs a full-size decode: the search for the first
    # frame ran 80 s with no cap or deadline before.
    path = tmp_path / "flood.h264"
    path.write_bytes(skip_frame_flood())
    budget = 2.0
    start = time.monotonic()
    with pytest.raises(BadSample) as raised:
        load_clip(path, time_budget_s=budget, max_decoded_frames=10**6)
    elapsed = time.monotonic() - start
    assert raised.value.reason == errors.TIMEOUT and "wall-clock" in str(raised.value)
    assert elapsed < budget + 3.0  # the deadline, plus one frame's decode and a loaded machine's slack
    with pytest.raises(BadSample) as raised:
        load_clip(path, max_decoded_frames=20)
    assert raised.value.reason == errors.TIMEOUT and "more than 20" in str(raised.value)


class CountingContainer:
    """An InputContainer that counts the packets its demux() hands out."""

    def __init__(self, inner, counter: list[int]):
        self._inner, self._counter = inner, counter

    def demux(self, *args, **kwargs):
        for packet in self._inner.demux(*args, **kwargs):
            self._counter[0] += 1
            yield packet

    def decode(self, *args, **kwargs):
        for packet in self.demux(*args, **kwargs):
            yield from packet.decode()

    def __getattr__(self, name):
        return getattr(self._inner, name)


def test_skip_frame_flood_reads_at_most_the_cap_with_default_arguments(monkeypatch):
    # A small-frame flood decodes fast, so that the frame cap, not the deadline, stops it.
    data = skip_frame_flood(64, 48, frames=DEFAULT_MAX_DECODED_FRAMES + 1000)
    counter = [0]
    real_open = av.open
    monkeypatch.setattr(container.av, "open", lambda *a, **k: CountingContainer(real_open(*a, **k), counter))
    with pytest.raises(BadSample) as raised:
        load_clip(data)
    assert raised.value.reason == errors.TIMEOUT and f"more than {DEFAULT_MAX_DECODED_FRAMES}" in str(raised.value)
    assert counter[0] == DEFAULT_MAX_DECODED_FRAMES + 1  # the packet past the cap, and no further


# ---- paths that are no regular files ---------------------------------------------------------------

def test_paths_that_are_not_regular_files(tmp_path):
    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)  # opening it for reading would block until a writer came
    directory = tmp_path / "folder.mp4"
    directory.mkdir()
    loop = tmp_path / "loop.mp4"
    loop.symlink_to(tmp_path / "loop2.mp4")
    (tmp_path / "loop2.mp4").symlink_to(loop)
    sock_path = tmp_path / "s.mp4"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock_path))
    cases = {fifo: "FIFO", Path("/dev/zero"): "character device", Path("/dev/null"): "character device",
             directory: "directory", loop: "symlink loop", sock_path: "socket"}
    try:
        for path, what in cases.items():
            start = time.monotonic()
            with pytest.raises(BadSample) as raised:
                load_clip(path)
            assert raised.value.reason == errors.NOT_A_FILE and what in str(raised.value), path
            assert time.monotonic() - start < 5.0
    finally:
        server.close()
    # A symlink to a video is a video; a dangling one is a missing file, as before.
    (tmp_path / "real.mp4").write_bytes(encode_video(num_frames=10))
    (tmp_path / "link.mp4").symlink_to(tmp_path / "real.mp4")
    assert load_clip(tmp_path / "link.mp4", size=16, num_frames=2)[0].shape == (2, 3, 16, 16)
    (tmp_path / "dangling.mp4").symlink_to(tmp_path / "gone.mp4")
    with pytest.raises(FileNotFoundError):
        load_clip(tmp_path / "dangling.mp4")
