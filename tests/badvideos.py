"""Small synthetic videos for tests: well-formed ones with chosen quirks, and broken ones.

Every generator returns the bytes of a file, so that tests can use them as paths (write
them under ``tmp_path``) or as tar-shard members. ``BAD_VIDEOS`` maps a name to the
generator and the ``BadSample`` reason that ``load_clip`` must raise for it; the shard
pipeline's fuzz test reuses the same table.
"""

from __future__ import annotations

import io
import struct
import tempfile
from collections.abc import Callable, Sequence
from fractions import Fraction
from functools import cache
from pathlib import Path

import av
import numpy as np

from videollama.data import errors


def pattern_frame(index: int, width: int, height: int) -> np.ndarray:
    """A frame that differs from its neighbours and is asymmetric (to see rotations).

    uint8 ``(height, width, 3)``: a horizontal/vertical gradient that shifts with ``index``,
    plus a bright block in the top-left corner.
    """
    ys, xs = np.mgrid[0:height, 0:width]
    rgb = np.stack([(xs * 255 // max(width - 1, 1) + 7 * index) % 256,
                    (ys * 255 // max(height - 1, 1) + 3 * index) % 256,
                    np.full_like(xs, (40 * index) % 256)], axis=-1).astype(np.uint8)
    rgb[: max(height // 4, 1), : max(width // 4, 1)] = 255
    return rgb


def encode_video(
    *,
    width: int = 64,
    height: int = 48,
    num_frames: int = 25,
    rate: int = 25,
    pts: Sequence[int] | None = None,
    time_base: tuple[int, int] | None = None,
    fmt: str = "mp4",
    codec: str = "libx264",
    rotation: int | None = None,
    gop: int | None = None,
    movflags: str | None = None,
    frame_fn: Callable[[int, int, int], np.ndarray] = pattern_frame,
) -> bytes:
    """Encode ``num_frames`` pattern frames and return the file's bytes.

    ``pts`` (in units of ``time_base``, default ``1/rate``) gives each frame's presentation
    time, for variable frame rate or a non-zero start; ``rotation`` writes a display matrix
    (degrees counter-clockwise); ``gop`` sets the keyframe interval.
    """
    pts = list(range(num_frames)) if pts is None else list(pts)
    with tempfile.TemporaryDirectory() as tmp:
        # A real file, not BytesIO: the mp4 muxer needs to seek back (faststart, moov).
        path = Path(tmp) / f"video.{'mkv' if fmt == 'matroska' else fmt}"
        with av.open(str(path), "w", format=fmt, options={"movflags": movflags} if movflags else {}) as out:
            stream = out.add_stream(codec, rate=rate)
            stream.width, stream.height = width, height
            stream.pix_fmt = "rgb24" if codec == "png" else "yuv420p"
            stream.codec_context.thread_count = 1  # threaded x264 output differs from run to run
            if time_base is not None:
                stream.time_base = stream.codec_context.time_base = Fraction(*time_base)
            if gop is not None:
                stream.codec_context.gop_size = gop
                if codec == "libx264":
                    stream.codec_context.options = {"keyint_min": str(gop), "sc_threshold": "0"}
            if rotation is not None:
                stream.set_display_rotation(rotation)
            for index, frame_pts in enumerate(pts):
                frame = av.VideoFrame.from_ndarray(frame_fn(index, width, height), format="rgb24")
                frame.pts = frame_pts
                out.mux(stream.encode(frame))
            out.mux(stream.encode())
        return path.read_bytes()


def top_level_boxes(data: bytes) -> list[tuple[bytes, int, int]]:
    """The top-level ISO-BMFF boxes of an mp4 as ``(type, offset, size)``."""
    boxes, offset = [], 0
    while offset + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[offset:offset + 8])
        if size < 8:
            break
        boxes.append((kind, offset, size))
        offset += size
    return boxes


def _box(data: bytes, kind: bytes) -> tuple[int, int]:
    for found, offset, size in top_level_boxes(data):
        if found == kind:
            return offset, size
    raise ValueError(f"no {kind!r} box")


# ---- broken files, one per BadSample reason ------------------------------------------------

def empty_file() -> bytes:
    return b""


def garbage() -> bytes:
    return b"this is not a video, just text pretending to be one. " * 40


def mp4_without_moov() -> bytes:
    """An mp4 whose moov atom (written last by default) was lost with the file's tail."""
    data = encode_video(num_frames=20)
    moov_offset, _ = _box(data, b"moov")
    return data[:moov_offset]


def audio_only() -> bytes:
    """A valid mp4 holding one AAC audio stream and no video."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=16000)
        samples = (np.sin(np.arange(16000) * 2 * np.pi * 440 / 16000) * 0.3).astype(np.float32)
        frame = av.AudioFrame.from_ndarray(samples[None, :], format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 16000, 0
        out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return buffer.getvalue()


def zero_frames() -> bytes:
    """An mp4 with a valid header and index, whose every sample is zeros: nothing decodes."""
    data = bytearray(encode_video(num_frames=10))
    offset, size = _box(bytes(data), b"mdat")
    data[offset + 8:offset + size] = bytes(size - 8)
    return bytes(data)


def absurd_resolution() -> bytes:
    """A YUV4MPEG2 header declaring 9000x100 frames (the y4m demuxer trusts its header)."""
    return b"YUV4MPEG2 W9000 H100 F25:1 Ip A1:1 C420jpeg\nFRAME\n" + bytes(9000 * 100 * 3 // 2)


def absurd_duration() -> bytes:
    """Two frames 25 hours apart: a valid mp4 whose video lasts longer than a day."""
    return encode_video(num_frames=2, pts=[0, 25 * 3600 * 25])


def truncated_mp4() -> bytes:
    """A faststart mp4 (moov first) cut in the middle of its media data."""
    data = encode_video(num_frames=100, movflags="faststart")
    return data[: len(data) // 2]


def corrupt_mid_stream() -> bytes:
    """A PNG-in-mp4 video whose middle frames are overwritten: decoding fails part-way."""
    data = bytearray(encode_video(num_frames=10, codec="png"))
    offset, size = _box(bytes(data), b"mdat")
    middle, span = offset + size // 2, size // 8  # stay well inside mdat
    data[middle:middle + span] = bytes(span)
    return bytes(data)


@cache
def too_many_frames() -> bytes:
    """3100 frames at 800 FPS with a single keyframe: any window needs > 3000 decoded frames."""
    return encode_video(width=16, height=16, num_frames=3100, rate=800, gop=100000,
                        frame_fn=lambda i, w, h: np.full((h, w, 3), i % 256, np.uint8))


BAD_VIDEOS: dict[str, tuple[Callable[[], bytes], str]] = {
    "empty_file": (empty_file, errors.EMPTY_FILE),
    "garbage": (garbage, errors.INVALID_CONTAINER),
    "mp4_without_moov": (mp4_without_moov, errors.INVALID_CONTAINER),
    "audio_only": (audio_only, errors.NO_VIDEO_STREAM),
    "zero_frames": (zero_frames, errors.ZERO_FRAMES),
    "absurd_resolution": (absurd_resolution, errors.ABSURD_RESOLUTION),
    "absurd_duration": (absurd_duration, errors.ABSURD_DURATION),
    "truncated_mp4": (truncated_mp4, errors.DECODE_ERROR),
    "corrupt_mid_stream": (corrupt_mid_stream, errors.DECODE_ERROR),
    "too_many_frames": (too_many_frames, errors.TIMEOUT),
}


# ---- hostile files: small inputs that declare enormous work ---------------------------------------
#
# Each is built here, bit by bit or by patching a real file that PyAV wrote, so that the tests do
# not depend on the loader's own parsers.

class BitWriter:
    """MSB-first bits with H.264's Exp-Golomb codes (ue, se), ending in rbsp_trailing_bits."""

    def __init__(self):
        self.bits: list[int] = []

    def u(self, n: int, value: int) -> BitWriter:
        self.bits.extend((value >> i) & 1 for i in range(n - 1, -1, -1))
        return self

    def ue(self, value: int) -> BitWriter:
        n = (value + 1).bit_length()
        return self.u(n - 1, 0).u(n, value + 1)

    def se(self, value: int) -> BitWriter:
        return self.ue(2 * value - 1 if value > 0 else -2 * value)

    def rbsp(self) -> bytes:
        bits = self.bits + [1] + [0] * (-(len(self.bits) + 1) % 8)
        return bytes(int("".join(map(str, bits[i:i + 8])), 2) for i in range(0, len(bits), 8))


def nal_unit(ref_idc: int, kind: int, rbsp: bytes) -> bytes:
    """An Annex B NAL unit: start code, header byte, payload with emulation prevention bytes."""
    out, zeros = bytearray(), 0
    for byte in rbsp:
        if zeros >= 2 and byte <= 3:
            out.append(3)
            zeros = 0
        out.append(byte)
        zeros = zeros + 1 if byte == 0 else 0
    return b"\x00\x00\x00\x01" + bytes([(ref_idc << 5) | kind]) + bytes(out)


def h264_sps(width: int, height: int, *, profile_idc: int = 66, chroma_format_idc: int = 1,
             bit_depth: int = 8, scaling_lists: dict[int, Sequence[int]] | None = None, poc_type: int = 2,
             poc_cycle: Sequence[int] = (), ref_frames: int = 1, frame_mbs_only: bool = True,
             crop: tuple[int, int, int, int] = (0, 0, 0, 0)) -> bytes:
    """An SPS (H.264 7.3.2.1.1) for coded frames of ``width`` x ``height`` (multiples of 16, of 32
    for interlaced), written field by field: High-profile fields (``profile_idc`` 100 and up) with
    ``scaling_lists`` (list index -> the delta_scale values written), picture order count
    ``poc_type`` 0 (4-bit lsb), 1 (``poc_cycle`` offsets; always-zero deltas) or 2, frame_num in 4
    bits, ``ref_frames`` reference frames, frame cropping ``crop`` (left, right, top, bottom, in crop units),
    no VUI. Slices that go with it: ``h264_skip_slice`` with the same ``poc_type`` and
    ``frame_mbs_only``."""
    bits = BitWriter().u(8, profile_idc).u(8, 0).u(8, 51).ue(0)  # constraints, level, sps_id
    if profile_idc >= 100:
        bits.ue(chroma_format_idc)
        if chroma_format_idc == 3:
            bits.u(1, 0)  # no separate colour planes
        bits.ue(bit_depth - 8).ue(bit_depth - 8).u(1, 0)  # luma, chroma depth; no transform bypass
        bits.u(1, int(scaling_lists is not None))
        if scaling_lists is not None:
            for index in range(8 if chroma_format_idc != 3 else 12):
                bits.u(1, int(index in scaling_lists))
                for delta in scaling_lists.get(index, ()):
                    bits.se(delta)
    bits.ue(0).ue(poc_type)  # log2_max_frame_num - 4
    if poc_type == 0:
        bits.ue(0)  # log2_max_pic_order_cnt_lsb - 4
    elif poc_type == 1:
        bits.u(1, 1).se(0).se(0).ue(len(poc_cycle))  # always-zero deltas, offsets, the cycle
        for offset in poc_cycle:
            bits.se(offset)
    rows = height // 16 if frame_mbs_only else height // 32
    bits.ue(ref_frames).u(1, 0).ue(width // 16 - 1).ue(rows - 1).u(1, int(frame_mbs_only))  # no gaps
    if not frame_mbs_only:
        bits.u(1, 0)  # mb_adaptive_frame_field_flag
    bits.u(1, 1).u(1, int(any(crop)))  # direct_8x8_inference, frame_cropping
    if any(crop):
        for offset in crop:
            bits.ue(offset)
    bits.u(1, 0)  # no VUI
    return nal_unit(3, 7, bits.rbsp())


def h264_pps() -> bytes:
    """PPS 0 of SPS 0: CAVLC, one slice group, one reference, QP 26, deblocking control present."""
    bits = BitWriter().ue(0).ue(0).u(1, 0).u(1, 0).ue(0).ue(0).ue(0).u(1, 0).u(2, 0)
    bits.se(0).se(0).se(0).u(1, 1).u(1, 0).u(1, 0)
    return nal_unit(3, 8, bits.rbsp())


def h264_skip_slice(macroblocks: int, *, poc_type: int = 2, frame_mbs_only: bool = True,
                    reference: bool = False, frame_num: int = 1) -> bytes:
    """A P slice (of the SPS/PPS above) that skips every macroblock of the frame: a few bytes
    that make the decoder produce a whole frame (and keep it, for a ``reference`` slice)."""
    bits = BitWriter().ue(0).ue(5).ue(0).u(4, frame_num % 16)  # first_mb, slice_type P (all), pps_id
    if not frame_mbs_only:
        bits.u(1, 0)  # field_pic_flag: a frame
    if poc_type == 0:
        bits.u(4, 2)  # pic_order_cnt_lsb
    bits.u(1, 0).u(1, 0)  # no num_ref_idx override, no ref_pic_list_modification
    if reference:
        bits.u(1, 0)  # dec_ref_pic_marking: sliding window
    bits.se(0).ue(1)  # slice_qp_delta, deblocking disabled
    bits.ue(macroblocks)  # mb_skip_run: the whole picture
    return nal_unit(2 if reference else 0, 1, bits.rbsp())


def skip_frame_flood(width: int = 8192, height: int = 4880, frames: int = 4000) -> bytes:
    """A raw H.264 stream: an SPS for a frame just inside the loader's size limits, then
    ``frames`` skip-everything P frames and no keyframe, so no frame is ever output while every
    one costs a full-size decode (4000 at 8192x4880: 48 KB)."""
    slice_ = h264_skip_slice(width // 16 * (height // 16))
    return h264_sps(width, height) + h264_pps() + slice_ * frames


def reference_flood(width: int = 8192, height: int = 4880, frames: int = 300) -> bytes:
    """A raw H.264 stream whose SPS (High 4:4:4, 10 bits, 8192x4880: inside the size limits)
    allows 16 reference frames of 240 MB each, then ``frames`` skip-everything reference P
    frames: the decoder keeps every one it may (3.6 KB; 4.5 GB of frames in FFmpeg)."""
    sps = h264_sps(width, height, profile_idc=244, chroma_format_idc=3, bit_depth=10, ref_frames=16)
    macroblocks = width // 16 * (height // 16)
    return sps + h264_pps() + b"".join(h264_skip_slice(macroblocks, reference=True, frame_num=i + 1)
                                       for i in range(frames))


def huge_sps_stream(width: int = 16000, height: int = 16000, frames: int = 5) -> bytes:
    """A raw H.264 stream whose SPS declares ``width`` x ``height``, with a few skip frames."""
    return h264_sps(width, height) + h264_pps() + h264_skip_slice(width // 16 * (height // 16)) * frames


def find_box(data: bytes, path: Sequence[bytes]) -> tuple[int, int]:
    """``(offset, size)`` of the first box along ``path`` (e.g. moov, trak, ..., stsz) of an mp4."""
    start, end, found = 0, len(data), None
    for kind in path:
        offset = start
        while offset + 8 <= end:
            size, found_kind = struct.unpack(">I4s", data[offset:offset + 8])
            if found_kind == kind:
                break
            offset += size
        else:
            raise ValueError(f"no {kind!r} box")
        found = (offset, size)
        start, end = offset + 8, offset + size
    return found


def patch_u32(data: bytes, path: Sequence[bytes], field_offset: int, value: int) -> bytes:
    """``data`` with the 32-bit field at ``field_offset`` of a box's payload set to ``value``."""
    offset, _ = find_box(data, path)
    out = bytearray(data)
    out[offset + 8 + field_offset:offset + 12 + field_offset] = struct.pack(">I", value)
    return bytes(out)


STBL = (b"moov", b"trak", b"mdia", b"minf", b"stbl")


def mp4_claiming_frames(count: int = 60_000_000) -> bytes:
    """A 10-frame mp4 (2.9 KB) whose sample tables claim ``count`` frames: stsz says ``count``
    samples of one constant size, stsc puts ``count`` samples in its one chunk, stts has
    ``count`` of them. FFmpeg's mp4 demuxer indexes every one inside av.open (4 GB for 60M)."""
    data = encode_video(num_frames=10)
    data = patch_u32(data, STBL + (b"stsz",), 4, 785)  # constant sample size: no table needed
    data = patch_u32(data, STBL + (b"stsz",), 8, count)
    data = patch_u32(data, STBL + (b"stsc",), 12, count)  # samples_per_chunk of entry 1
    return patch_u32(data, STBL + (b"stts",), 8, count)  # sample_count of entry 1


def mp4_with_overlong_table() -> bytes:
    """A 10-frame mp4 whose stco claims 50 million chunk offsets in a 20-byte box (FFmpeg
    allocates for the claim, then reads offsets from whatever follows)."""
    return patch_u32(encode_video(num_frames=10), STBL + (b"stco",), 4, 50_000_000)


def fragmented_mp4_claiming_frames(count: int = 60_000_000) -> bytes:
    """A fragmented mp4 whose first 'trun' claims ``count`` samples with no per-sample fields
    (so the claim needs no bytes): FFmpeg allocates and fills an index entry for each."""
    data = encode_video(num_frames=10, movflags="frag_keyframe+empty_moov+default_base_moof")
    offset, _ = find_box(data, (b"moof", b"traf", b"trun"))
    out = bytearray(data)
    out[offset + 9:offset + 12] = (1).to_bytes(3, "big")  # flags: data offset only
    out[offset + 12:offset + 16] = struct.pack(">I", count)
    return bytes(out)

