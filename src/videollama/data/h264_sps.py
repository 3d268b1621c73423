"""What a raw H.264 (Annex B) stream declares, read without trusting it: the frame size (and the
reference-frame memory) of every sequence parameter set, parsed bit by bit (exp-Golomb codes,
emulation-prevention bytes, high-profile chroma fields, frame cropping).

FFmpeg's H.264 decoder allocates frames of whatever size an SPS declares, inside ``av.open``;
these are pure functions over the stream's bytes, raising nothing but ``ValueError`` for a
malformed unit. What to refuse is ``container.check_declared``'s policy.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

# ---- raw H.264 (Annex B): sequence parameter sets ---------------------------------------------

_START_CODE = re.compile(rb"\x00\x00\x01")
_SPS_START = re.compile(rb"\x00\x00\x01[\x07\x27\x47\x67]")  # any nal_ref_idc, nal_unit_type 7
_NAL_END = re.compile(rb"\x00\x00[\x00-\x02]")
_EMULATION_PREVENTION = re.compile(rb"\x00\x00\x03")
# Profiles whose SPS carries chroma format, bit depths and scaling matrices (H.264 7.3.2.1.1).
_HIGH_PROFILES = frozenset({100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135})


def looks_like_annexb_h264(data, window: int = 2 << 20) -> bool:
    """Whether ``data`` is a raw H.264 (Annex B) stream as encoders write one: it starts with a
    start code (after optional zero bytes), and a well-formed SPS NAL unit header comes in the
    first ``window`` bytes before any start code followed by a byte with the forbidden bit set
    (the start codes of MPEG-PS/-ES, which rule out H.264).

    A file that starts otherwise is left to FFmpeg (whose decoder still refuses frames above
    ``max_pixels``): inside other formats, the 4-byte length prefixes of H.264 NAL units in
    Matroska or mp4 can look like start codes, and parsing what follows them as an SPS would
    refuse valid files.
    """
    head = bytes(data[:window])
    body = head.lstrip(b"\x00")
    if len(head) - len(body) < 2 or not body.startswith(b"\x01"):
        return False
    for match in _START_CODE.finditer(head):
        at = match.end()
        if at + 2 > len(head):
            break
        header = head[at]
        if header & 0x80:
            return False
        if header & 0x1F == 7 and head[at + 2] & 0x03 == 0:  # reserved_zero_2bits
            return True
    return False


def annexb_sps_nals(data, *, limit: int | None = None, progress: Callable[[], None] | None = None) -> list[bytes]:
    """The distinct SPS NAL units (header byte included, emulation prevention not removed) of an
    Annex B stream, in order; at most ``limit`` + 1 of them (the scan stops there). ``progress``
    is called every 1024 SPS found (a deadline check may raise from it)."""
    found: dict[bytes, None] = {}
    for index, match in enumerate(_SPS_START.finditer(data), start=1):
        at = match.end() - 1
        stop = _NAL_END.search(data, at + 1, min(len(data), at + 4096))
        found.setdefault(bytes(data[at:stop.start() if stop else min(len(data), at + 4096)]))
        if limit is not None and len(found) > limit:
            break
        if progress is not None and index % 1024 == 0:
            progress()
    return list(found)


@dataclass(frozen=True)
class H264Sps:
    """The frame size an H.264 sequence parameter set declares.

    ``coded_width`` x ``coded_height`` is what the decoder allocates (whole macroblocks, both
    fields of an interlaced frame); ``width`` x ``height`` is after the SPS's frame cropping, what
    FFmpeg reports as the stream's size.
    """

    profile_idc: int
    chroma_format_idc: int
    bit_depth_luma: int
    bit_depth_chroma: int
    max_num_ref_frames: int
    scaling_matrix: bool
    pic_order_cnt_type: int
    frame_mbs_only: bool
    coded_width: int
    coded_height: int
    width: int
    height: int

    @property
    def frame_bytes(self) -> int:
        """Bytes of one decoded frame: luma plus chroma planes, 2 bytes a sample above 8 bits."""
        chroma = {0: 0.0, 1: 0.5, 2: 1.0, 3: 2.0}[self.chroma_format_idc]
        per_sample = 1 if max(self.bit_depth_luma, self.bit_depth_chroma) <= 8 else 2
        return int(self.coded_width * self.coded_height * (1 + chroma) * per_sample)

    @property
    def reference_bytes(self) -> int:
        """What the decoder holds at least: every reference frame the SPS allows, and the frame
        being decoded (FFmpeg keeps a few more, for output delay and threads)."""
        return (self.max_num_ref_frames + 1) * self.frame_bytes


class _Bits:
    """MSB-first bit reader with Exp-Golomb codes, over an RBSP (emulation prevention removed)."""

    def __init__(self, data: bytes):
        self.value, self.left = int.from_bytes(data, "big"), 8 * len(data)

    def u(self, n: int) -> int:
        if n > self.left:
            raise ValueError("SPS ends early")
        self.left -= n
        return (self.value >> self.left) & ((1 << n) - 1)

    def ue(self) -> int:
        rest = self.value & ((1 << self.left) - 1)
        if rest == 0:
            raise ValueError("SPS ends early")
        zeros = self.left - rest.bit_length()
        if zeros > 31:
            raise ValueError("Exp-Golomb code longer than 32 bits")
        return self.u(2 * zeros + 1) - 1

    def se(self) -> int:
        k = self.ue()
        return (k + 1) // 2 if k % 2 else -(k // 2)


def parse_h264_sps(nal: bytes) -> H264Sps:
    """Parse the frame size out of an H.264 SPS NAL unit (header byte first; emulation
    prevention bytes still in). Raises ``ValueError`` when it is not a well-formed SPS."""
    if len(nal) < 4 or nal[0] & 0x80 or nal[0] & 0x1F != 7:
        raise ValueError("not an SPS NAL unit")
    bits = _Bits(_EMULATION_PREVENTION.sub(b"\x00\x00", nal[1:]))
    profile_idc = bits.u(8)
    bits.u(16)  # constraint_set flags, reserved_zero_2bits, level_idc
    if bits.ue() > 31:
        raise ValueError("seq_parameter_set_id above 31")
    chroma_format_idc, separate_colour_planes, bit_depth, chroma_depth, scaling_matrix = 1, False, 8, 8, False
    if profile_idc in _HIGH_PROFILES:
        chroma_format_idc = bits.ue()
        if chroma_format_idc > 3:
            raise ValueError(f"chroma_format_idc {chroma_format_idc}")
        if chroma_format_idc == 3:
            separate_colour_planes = bool(bits.u(1))
        bit_depth = 8 + bits.ue()
        chroma_depth = 8 + bits.ue()
        bits.u(1)  # qpprime_y_zero_transform_bypass_flag
        scaling_matrix = bool(bits.u(1))
        if scaling_matrix:
            for index in range(8 if chroma_format_idc != 3 else 12):
                if bits.u(1):
                    _skip_scaling_list(bits, 16 if index < 6 else 64)
    bits.ue()  # log2_max_frame_num_minus4
    poc_type = bits.ue()
    if poc_type == 0:
        bits.ue()  # log2_max_pic_order_cnt_lsb_minus4
    elif poc_type == 1:
        bits.u(1)  # delta_pic_order_always_zero_flag
        bits.se()  # offset_for_non_ref_pic
        bits.se()  # offset_for_top_to_bottom_field
        cycle = bits.ue()
        if cycle > 255:
            raise ValueError("num_ref_frames_in_pic_order_cnt_cycle above 255")
        for _ in range(cycle):
            bits.se()
    elif poc_type > 2:
        raise ValueError(f"pic_order_cnt_type {poc_type}")
    max_num_ref_frames = bits.ue()
    bits.u(1)  # gaps_in_frame_num_value_allowed_flag
    width_mbs = bits.ue() + 1
    height_map_units = bits.ue() + 1
    frame_mbs_only = bool(bits.u(1))
    if not frame_mbs_only:
        bits.u(1)  # mb_adaptive_frame_field_flag
    bits.u(1)  # direct_8x8_inference_flag
    coded_width = 16 * width_mbs
    coded_height = 16 * height_map_units * (1 if frame_mbs_only else 2)
    width, height = coded_width, coded_height
    if bits.u(1):  # frame_cropping_flag
        left, right, top, bottom = bits.ue(), bits.ue(), bits.ue(), bits.ue()
        chroma_array_type = 0 if separate_colour_planes else chroma_format_idc
        unit_x = 1 if chroma_array_type in (0, 3) else 2
        unit_y = (1 if chroma_array_type in (0, 2, 3) else 2) * (1 if frame_mbs_only else 2)
        if unit_x * (left + right) < coded_width and unit_y * (top + bottom) < coded_height:
            width -= unit_x * (left + right)
            height -= unit_y * (top + bottom)  # else FFmpeg ignores the cropping, and so do we
    return H264Sps(profile_idc, chroma_format_idc, bit_depth, chroma_depth, max_num_ref_frames, scaling_matrix,
                   poc_type, frame_mbs_only, coded_width, coded_height, width, height)


def _skip_scaling_list(bits: _Bits, size: int) -> None:
    last, next_scale = 8, 8
    for _ in range(size):
        if next_scale:
            next_scale = (last + bits.se() + 256) % 256
        last = next_scale or last
