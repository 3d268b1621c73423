"""load_clip against hostile input: small files that declare enormous work, and paths that are no files.

Each test builds its input itself (tests/badvideos.py writes raw H.264 bit by bit and patches
the boxes of mp4 files that PyAV wrote). The pre-checks that refuse such files before FFmpeg
sees them (untrusted.py: ``parse_h264_sps``, ``iso_bmff_summary``) are checked first against
an independent reference, PyAV/FFmpeg's own reading of valid files: the frame sizes it reports,
the frame counts of its streams, the packets it demuxes.

Memory is measured in a child process (its peak RSS, ``ru_maxrss``), one per input, so that
no test's memory hides another's; the child runs under a 3 GiB address-space limit, so that a
regression fails the test instead of exhausting the machine.
"""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import av
import numpy as np
import pytest
import torch

import videollama
from badvideos import (
    STBL,
    encode_video,
    find_box,
    fragmented_mp4_claiming_frames,
    h264_pps,
    h264_skip_slice,
    h264_sps,
    huge_sps_stream,
    mp4_claiming_frames,
    mp4_with_overlong_table,
    pattern_frame,
    reference_flood,
    skip_frame_flood,
)
from videollama.data import container, errors
from videollama.data.container import MAX_SAMPLES, check_declared
from videollama.data.errors import BadSample
from videollama.data.h264_sps import annexb_sps_nals, looks_like_annexb_h264, parse_h264_sps
from videollama.data.mp4_boxes import iso_bmff_summary
from videollama.data.untrusted import load_clip_isolated
from videollama.data.video import DEFAULT_MAX_DECODED_FRAMES, load_clip

pytestmark = pytest.mark.usefixtures("no_hang")  # a FIFO opened for reading would block forever


# ---- the H.264 SPS parser against FFmpeg's --------------------------------------------------------

def x264_stream(width: int, height: int, pix_fmt: str = "yuv420p", params: str | None = None,
                fmt: str = "h264") -> bytes:
    """Three frames encoded by libx264 (raw Annex B for ``fmt="h264"``)."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=fmt) as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.codec_context.thread_count = 1
        if params:
            stream.codec_context.options = {"x264-params": params}
        for index in range(3):
            rgb = av.VideoFrame.from_ndarray(pattern_frame(index, width, height), format="rgb24")
            frame = rgb.reformat(format=pix_fmt)
            frame.pts = index
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return buffer.getvalue()


def ffmpeg_size(data: bytes) -> tuple[int, int]:
    with av.open(io.BytesIO(data)) as opened:
        context = opened.streams.video[0].codec_context
        return context.width, context.height


@pytest.mark.parametrize(("width", "height", "pix_fmt", "params"), [
    (64, 48, "yuv420p", None),
    (98, 30, "yuv420p", None),             # cropped: coded 112x32
    (1920, 1080, "yuv420p", None),         # coded 1920x1088
    (4094, 16, "yuv420p", None),
    (64, 48, "yuv422p", None),             # High 4:2:2: chroma_format_idc 2
    (64, 48, "yuv444p", None),             # High 4:4:4: chroma_format_idc 3
    (66, 50, "yuv420p10le", None),         # High 10, cropped
    (62, 44, "yuv420p", "interlaced=1"),   # frame_mbs_only 0: coded 64x64
    (64, 48, "yuv420p", "bframes=0"),      # picture order count type 2
    (64, 48, "yuv420p", "ref=16"),         # 16 reference frames
])
def test_sps_parser_gives_ffmpegs_size_for_x264_streams(width, height, pix_fmt, params):
    data = x264_stream(width, height, pix_fmt, params)
    assert looks_like_annexb_h264(data)
    (nal,) = annexb_sps_nals(data)
    sps = parse_h264_sps(nal)
    assert (sps.width, sps.height) == ffmpeg_size(data) == (width, height)
    assert sps.coded_width == -(-width // 16) * 16
    assert sps.coded_height == -(-height // (16 if sps.frame_mbs_only else 32)) * (16 if sps.frame_mbs_only else 32)
    assert sps.frame_mbs_only == (params != "interlaced=1")
    assert sps.chroma_format_idc == {"420": 1, "422": 2, "444": 3}[pix_fmt[3:6]]
    assert sps.bit_depth_luma == sps.bit_depth_chroma == (10 if pix_fmt.endswith("10le") else 8)
    if params == "ref=16":
        assert sps.max_num_ref_frames == 16
    if (sps.coded_width, sps.coded_height) == (width, height):  # uncropped: a decoded frame's planes
        with av.open(io.BytesIO(data)) as opened:
            frame = next(opened.decode(video=0))
            samples = sum(plane.width * plane.height for plane in frame.planes)
        assert sps.frame_bytes == samples * (2 if sps.bit_depth_luma > 8 else 1)


@pytest.mark.parametrize("sps_fields", [
    dict(width=64, height=48, crop=(1, 2, 3, 4)),
    dict(width=64, height=64, frame_mbs_only=False, crop=(0, 1, 0, 2)),
    dict(width=96, height=48, profile_idc=100, scaling_lists={0: [-8], 1: [2, 3, -13], 6: [1] * 64},
         crop=(0, 3, 0, 1)),
    dict(width=96, height=48, profile_idc=244, chroma_format_idc=3, scaling_lists={7: [1] * 64, 11: [-8]},
         crop=(5, 0, 0, 7)),
    dict(width=48, height=32, profile_idc=122, chroma_format_idc=2, bit_depth=10, poc_type=1,
         poc_cycle=[2, -1, 300], crop=(1, 1, 1, 1)),
    dict(width=48, height=32, profile_idc=100, chroma_format_idc=0, poc_type=0, ref_frames=7, crop=(3, 2, 1, 0)),
    dict(width=64, height=48, poc_type=1, poc_cycle=[1 << 19, 1 << 19, 3]),  # 40 zero bits in a row
    dict(width=8192, height=4880),         # the skip-frame flood's SPS
])
def test_sps_parser_gives_ffmpegs_size_for_hand_written_sps(sps_fields):
    # Scaling matrices, picture order count type 1, 4:2:2 / 4:4:4 / monochrome crop units,
    # interlaced crop units: fields that x264 never writes into an SPS.
    sps_nal = h264_sps(**sps_fields)
    slice_fields = {key: sps_fields[key] for key in ("poc_type", "frame_mbs_only") if key in sps_fields}
    macroblocks = sps_fields["width"] // 16 * (sps_fields["height"] // 16)
    data = sps_nal + h264_pps() + h264_skip_slice(macroblocks, **slice_fields) * 5
    sps = parse_h264_sps(annexb_sps_nals(data)[0])
    assert (sps.width, sps.height) == ffmpeg_size(data)
    assert (sps.coded_width, sps.coded_height) == (sps_fields["width"], sps_fields["height"])
    assert sps.scaling_matrix == ("scaling_lists" in sps_fields)
    assert sps.pic_order_cnt_type == sps_fields.get("poc_type", 2)
    assert sps.max_num_ref_frames == sps_fields.get("ref_frames", 1)
    if max(sps_fields.get("poc_cycle", [0])) > 65536:
        assert b"\x00\x00\x03" in sps_nal  # the case really exercises emulation prevention


def test_sps_parser_refuses_what_is_not_an_sps():
    nal = h264_sps(64, 48)[4:]  # without its start code
    parse_h264_sps(nal)
    with pytest.raises(ValueError, match="ends early"):
        parse_h264_sps(nal[:5])  # cut before the frame size
    with pytest.raises(ValueError, match="not an SPS"):
        parse_h264_sps(bytes([0x68]) + nal[1:])  # a PPS header
    with pytest.raises(ValueError, match="chroma_format_idc 4"):
        parse_h264_sps(bytes([0x67, 100, 0, 51, 0b10010100, 0xFF]))  # sps_id ue(0), then ue(4)


def test_other_formats_are_not_taken_for_raw_h264():
    assert not looks_like_annexb_h264(encode_video(num_frames=5, fmt="mpegts"))  # PES start codes
    assert not looks_like_annexb_h264(encode_video(num_frames=5, fmt="matroska"))
    assert not looks_like_annexb_h264(encode_video(num_frames=5, codec="mpeg2video", fmt="mpeg"))
    for fmt in ("mpegts", "matroska", "h264"):
        assert iso_bmff_summary(encode_video(num_frames=5, fmt=fmt)) is None


# ---- the mp4 box walk against FFmpeg's reading -----------------------------------------------------

def mux(fmt: str, *, audio: str | None = None, seconds: float = 1.0, movflags: str | None = None) -> bytes:
    """64x48 H.264 at 25 FPS, and optionally stereo ``audio`` at 48 kHz, muxed by PyAV."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"video.{'mov' if fmt == 'mov' else 'mp4'}"
        with av.open(str(path), "w", format=fmt, options={"movflags": movflags} if movflags else {}) as out:
            video = out.add_stream("libx264", rate=25)
            video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
            video.codec_context.thread_count = 1
            sound = None
            if audio:
                sound = out.add_stream(audio, rate=48000)
                sound.layout = "stereo"
            for index in range(round(25 * seconds)):
                frame = av.VideoFrame.from_ndarray(pattern_frame(index, 64, 48), format="rgb24")
                frame.pts = index
                out.mux(video.encode(frame))
            out.mux(video.encode())
            if sound is not None:
                size, pts = sound.codec_context.frame_size or 1024, 0
                while pts < 48000 * seconds:
                    samples = np.zeros((2, size) if sound.format.is_planar else (1, 2 * size),
                                       np.float32 if sound.format.name.startswith("flt") else np.int16)
                    frame = av.AudioFrame.from_ndarray(samples, format=sound.format.name, layout="stereo")
                    frame.sample_rate, frame.pts = 48000, pts
                    out.mux(sound.encode(frame))
                    pts += size
                out.mux(sound.encode())
        return path.read_bytes()


def ffmpeg_counts(data: bytes) -> tuple[list[int], dict[int, int]]:
    """Each stream's frame count as FFmpeg reads it from the header, and the packets it demuxes."""
    with av.open(io.BytesIO(data)) as opened:
        frames = [stream.frames for stream in opened.streams]
        packets: dict[int, int] = {}
        for packet in opened.demux():
            if packet.size:
                packets[packet.stream.index] = packets.get(packet.stream.index, 0) + 1
    return frames, packets


@pytest.mark.parametrize("kind", ["mp4", "faststart", "aac", "mov_gop"])
def test_sample_counts_are_ffmpegs(kind):
    data = {
        "mp4": lambda: encode_video(num_frames=25),
        "faststart": lambda: encode_video(num_frames=40, movflags="faststart"),
        "aac": lambda: mux("mp4", audio="aac"),
        "mov_gop": lambda: encode_video(num_frames=60, fmt="mov", gop=7),
    }[kind]()
    summary = iso_bmff_summary(data)
    frames, packets = ffmpeg_counts(data)
    assert [track.sample_count for track in summary.tracks] == frames
    assert [track.index_entries for track in summary.tracks] == [packets[i] for i in range(len(frames))]
    assert summary.tracks[0].handler == b"vide" and summary.fragment_samples == 0 and not summary.overclaims
    # The SPS in avcC gives the size FFmpeg reports.
    (nal,) = summary.sps
    sps = parse_h264_sps(nal)
    assert (sps.width, sps.height) == ffmpeg_size(data) == (64, 48)
    check_declared(data, "valid")


@pytest.mark.parametrize("audio", [None, "aac"])
def test_fragment_sample_counts_are_ffmpegs(audio):
    data = mux("mp4", audio=audio, movflags="frag_keyframe+empty_moov+default_base_moof")
    summary = iso_bmff_summary(data)
    _, packets = ffmpeg_counts(data)
    assert summary.fragment_samples == sum(packets.values()) >= 25
    assert all(track.sample_count == 0 for track in summary.tracks)
    check_declared(data, "valid")


def test_uncompressed_audio_is_counted_by_chunk():
    # QuickTime PCM: one stsz "sample" per audio frame (48000 per second), but FFmpeg indexes it
    # by chunk. The estimate must bound FFmpeg's index from above without counting every frame.
    data = mux("mov", audio="pcm_s16le", seconds=2.0)
    summary = iso_bmff_summary(data)
    frames, packets = ffmpeg_counts(data)
    audio = summary.tracks[1]
    assert audio.handler == b"soun" and audio.sample_count == frames[1] >= 96000
    assert packets[1] <= audio.index_entries < audio.sample_count / 50
    check_declared(data, "valid")


def compressed_movie(data: bytes) -> bytes:
    """``data`` with its moov's boxes zlib-compressed into a QuickTime 'cmov' (dcom + cmvd)."""
    offset, size = find_box(data, (b"moov",))
    boxes = data[offset + 8:offset + size]
    packed = zlib.compress(boxes)
    cmvd = struct.pack(">I4sI", 12 + len(packed), b"cmvd", len(boxes)) + packed
    cmov = struct.pack(">I4s", 8 + 12 + len(cmvd), b"cmov") + struct.pack(">I4s4s", 12, b"dcom", b"zlib") + cmvd
    return data[:offset] + struct.pack(">I4s", 8 + len(cmov), b"moov") + cmov + data[offset + size:]


def test_compressed_movie_header_is_walked_too():
    data = compressed_movie(encode_video(num_frames=12))
    frames, packets = ffmpeg_counts(data)  # FFmpeg inflates and reads it
    assert [track.sample_count for track in iso_bmff_summary(data).tracks] == frames == [12]
    with pytest.raises(BadSample) as raised:
        load_clip(compressed_movie(mp4_claiming_frames()), name="cmov")
    assert raised.value.reason == errors.ABSURD_SAMPLE_COUNT


def test_sample_count_caps():
    # One byte per claimed sample at least, and never more than a day at 120 FPS.
    data = encode_video(num_frames=10)
    for count, what in [(len(data) + 1, "bytes can hold"), (MAX_SAMPLES + 1, "a day of video")]:
        with pytest.raises(BadSample) as raised:
            check_declared(mp4_claiming_frames(count), "claims")
        assert raised.value.reason == errors.ABSURD_SAMPLE_COUNT and what in str(raised.value)
    check_declared(mp4_claiming_frames(len(data) // 2), "plausible")  # FFmpeg's business from here


# ---- hostile files through load_clip ---------------------------------------------------------------

CHILD = r"""
import json, resource, sys, time
limit = 3 << 30  # a regression fails (FFmpeg cannot allocate) instead of eating the machine
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from videollama.data.errors import BadSample
from videollama.data.video import load_clip
def peak_kb():
    # VmHWM: this process's own peak RSS. ru_maxrss would carry the forking parent's RSS (pytest's,
    # a gigabyte late in the suite) across exec on Linux.
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
before = peak_kb()
start = time.monotonic()
try:
    load_clip(sys.argv[1], **json.loads(sys.argv[2]))
    reason = message = None
except BadSample as error:
    reason, message = error.reason, str(error)
print(json.dumps({"reason": reason, "message": message, "seconds": time.monotonic() - start,
                  "before_mb": before / 1024,
                  "peak_mb": peak_kb() / 1024}))
"""


def load_in_child(path: Path, **kwargs) -> dict:
    """load_clip in a fresh interpreter (this checkout's code): reason, seconds, peak RSS."""
    source = str(Path(videollama.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([source, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", CHILD, str(path), json.dumps(kwargs)], env=env,
                          capture_output=True, text=True, timeout=120, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(("make", "reason", "fragment"), [
    (mp4_claiming_frames, errors.ABSURD_SAMPLE_COUNT, "60000000 samples"),
    (fragmented_mp4_claiming_frames, errors.ABSURD_SAMPLE_COUNT, "60000000 samples"),
    (mp4_with_overlong_table, errors.INVALID_CONTAINER, "'stco' claims 50000000 entries"),
    (huge_sps_stream, errors.ABSURD_RESOLUTION, "16000x16000"),
    (reference_flood, errors.ABSURD_RESOLUTION, "16 reference frames of 239861760 bytes"),
])
def test_declared_work_is_refused_before_ffmpeg_allocates(make, reason, fragment, tmp_path):
    # Before these checks: 4.3 GB, 2.3 GB, (accepted), 1.8 GB, 4.5 GB of peak RSS.
    data = make()
    assert len(data) < 8000
    path = tmp_path / "hostile.bin"
    path.write_bytes(data)
    result = load_in_child(path)
    assert result["reason"] == reason and fragment in result["message"], result
    assert result["peak_mb"] - result["before_mb"] < 100, result  # nothing near the claim
    assert result["peak_mb"] < 1024, result


def test_reference_frame_memory_cap_lets_8k_through():
    # 8192x4320 4:2:0 8-bit with H.264's most reference frames (16): 17 x 53 MB, under 1 GiB.
    sps = h264_sps(8192, 4320, profile_idc=100, ref_frames=16)
    check_declared(sps + h264_pps() + h264_skip_slice(512 * 270), "8k")
    assert parse_h264_sps(sps[4:]).reference_bytes == 17 * 8192 * 4320 * 3 // 2
    with pytest.raises(BadSample) as raised:  # the same in 4:4:4 10-bit: 17 x 212 MB
        check_declared(h264_sps(8192, 4320, profile_idc=244, chroma_format_idc=3, bit_depth=10, ref_frames=16)
                       + h264_pps() + h264_skip_slice(512 * 270), "8k444")
    assert raised.value.reason == errors.ABSURD_RESOLUTION


def test_pure_checks_see_the_claims():
    assert iso_bmff_summary(mp4_claiming_frames()).index_entries == 60_000_000
    assert iso_bmff_summary(fragmented_mp4_claiming_frames()).fragment_samples == 60_000_000
    sps = parse_h264_sps(annexb_sps_nals(huge_sps_stream())[0])
    assert (sps.coded_width, sps.coded_height) == (sps.width, sps.height) == (16000, 16000)
    assert ffmpeg_size(huge_sps_stream(2048, 1024)) == (2048, 1024)  # the same writer, a sane size


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
        load_clip(path, max_decoded_frames=10)  # under the dry-decoding cap (16 such frames): the packet cap stops it
    assert raised.value.reason == errors.TIMEOUT and "more than 10" in str(raised.value)


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


def test_skip_frame_flood_is_stopped_by_its_pixel_work_with_default_arguments(monkeypatch):
    # 48 KB of 8192x4880 skip frames and no keyframe: each packet costs a full-size decode and shows
    # nothing. The frame cap (3000) and the 60 s budget let it decode for 45-60 s; the pixel budget
    # for decoding that shows no frame stops it after a few dozen packets.
    data = skip_frame_flood()
    counter = [0]
    real_open = av.open
    monkeypatch.setattr(container.av, "open", lambda *a, **k: CountingContainer(real_open(*a, **k), counter))
    with pytest.raises(BadSample) as raised:
        load_clip(data)
    assert raised.value.reason == errors.TIMEOUT and "without a frame coming out" in str(raised.value)
    bound = container.WorkBound("x", DEFAULT_MAX_DECODED_FRAMES, None)
    assert counter[0] <= bound.max_dry_pixels // (8192 * 4880) + 1 < 100
    # FFmpeg's own probe of the file, which decodes frames too, is shortened in proportion.
    check_declared(data, "flood", bound)
    assert bound.declared_pixels == 8192 * 4880
    assert int(bound.probe_options()["analyzeduration"]) < int(container.PROBE_OPTIONS["analyzeduration"]) / 10
    small = container.WorkBound("y", DEFAULT_MAX_DECODED_FRAMES, None)
    check_declared(skip_frame_flood(1920, 1080, frames=3), "full-hd", small)
    assert small.probe_options() == container.PROBE_OPTIONS  # up to full HD: as before


def test_pixel_budgets_leave_full_hd_to_the_frame_cap():
    bound = container.WorkBound("x", 3000, None)
    assert bound.max_pixels == 3000 * 1920 * 1080 and bound.max_dry_pixels == bound.max_pixels // 8
    bound.check_pixels(bound.max_pixels, bound.max_dry_pixels, "decoding")  # at the budgets: fine
    for pixels, dry, says in [(bound.max_pixels + 1, 0, "decoded more than 6221 megapixels"),
                              (1, bound.max_dry_pixels + 1, "without a frame coming out")]:
        with pytest.raises(BadSample, match=says) as raised:
            bound.check_pixels(pixels, dry, "decoding")
        assert raised.value.reason == errors.TIMEOUT
    # A small frame cap still lets 32 frames of the largest allowed size decode (its own cap first).
    assert container.WorkBound("x", 20, None).max_dry_pixels == 16 * container.MAX_PIXELS


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


def test_overlong_table_stays_refused_from_bytes_and_path(tmp_path):
    data = mp4_with_overlong_table()
    path = tmp_path / "x.mp4"
    path.write_bytes(data)
    for source in (data, path):
        with pytest.raises(BadSample) as raised:
            load_clip(source)
        assert raised.value.reason == errors.INVALID_CONTAINER
    # Only the count was patched: the original file plays.
    offset, _ = find_box(data, STBL + (b"stco",))
    repaired = data[:offset + 12] + struct.pack(">I", 1) + data[offset + 16:]
    assert load_clip(repaired, size=16, num_frames=2)[0].shape == (2, 3, 16, 16)


# ---- load_clip_isolated: a child process with a memory limit and a timeout -------------------------

def test_isolated_load_gives_load_clips_result():
    data = encode_video(num_frames=50)
    frames, timestamps = load_clip_isolated(data, size=32)
    expected_frames, expected_timestamps = load_clip(data, size=32)
    assert torch.equal(frames, expected_frames) and torch.equal(timestamps, expected_timestamps)
    with pytest.raises(BadSample) as raised:
        load_clip_isolated(mp4_claiming_frames(), name="shard-3/x.mp4")
    assert raised.value.reason == errors.ABSURD_SAMPLE_COUNT and raised.value.source == "shard-3/x.mp4"
    assert "60000000 samples" in str(raised.value)
    with pytest.raises(FileNotFoundError):
        load_clip_isolated("/nonexistent/clip.mp4")


def test_isolated_load_enforces_its_memory_limit():
    # 64 frames of 2048x2048 RGB need 805 MB of uint8 before the float conversion: not in 256 MB.
    with pytest.raises(BadSample) as raised:
        load_clip_isolated(encode_video(num_frames=10), num_frames=64, size=2048, memory_bytes=256 << 20)
    assert raised.value.reason == errors.OUT_OF_MEMORY


def test_isolated_load_is_killed_at_its_timeout(tmp_path):
    path = tmp_path / "flood.h264"
    path.write_bytes(skip_frame_flood())
    load_clip_isolated(encode_video(num_frames=5), size=16)  # the fork server is up: time the kill alone
    start = time.monotonic()
    with pytest.raises(BadSample) as raised:
        load_clip_isolated(path, time_budget_s=None, max_decoded_frames=10**6, timeout_s=1.0)
    assert raised.value.reason == errors.TIMEOUT and "killed after 1 s" in str(raised.value)
    assert time.monotonic() - start < 1.0 + 3.0
