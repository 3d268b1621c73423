"""What an untrusted video file declares, read without trusting it; and decoding in a sandbox.

FFmpeg acts on what a file declares before any check of ours could run: its mp4 demuxer
allocates an index entry for every sample a sample table claims, and its H.264 decoder
allocates frames of whatever size a sequence parameter set declares, both inside ``av.open``.
The functions here read those declarations themselves, as pure functions over the file's bytes
(``bytes`` or a memory map), bounded by the bytes they are given, and raise nothing but
``ValueError`` for a malformed unit: the policy (what to refuse, with which ``BadSample``
reason) is ``container.check_declared``'s.

* ``iso_bmff_summary``: the box tree of an mp4/mov (fragments and QuickTime's compressed movie
  header included), box headers and the entry counts of the sample tables only;
* ``looks_like_annexb_h264``, ``annexb_sps_nals``, ``parse_h264_sps``: the frame size of every
  sequence parameter set of a raw H.264 stream (and of those in an mp4's ``avcC``);
* ``load_clip_isolated``: ``load_clip`` in a child process with a memory limit and a wall-clock
  timeout, for what no pre-check covers (serving untrusted uploads).
"""

from __future__ import annotations

import array
import math
import re
import struct
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

# Bounds on our own walk of an mp4's boxes and on an mp4's zlib-compressed movie header ('cmov').
MAX_BOXES = 4_000_000
MAX_MOVIE_HEADER_BYTES = 64 << 20


# ---- ISO BMFF: the box tree, headers and entry counts only ------------------------------------

# Boxes whose payload is a sequence of boxes, which FFmpeg's mov demuxer reads the same way
# wherever they appear (a table box inside any of them counts for the track being read).
_CONTAINER_BOXES = frozenset({b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts", b"dinf", b"mvex",
                              b"moof", b"traf", b"tref", b"udta", b"sinf", b"schi"})
# Top-level box types that mark a file as ISO BMFF / QuickTime (as FFmpeg's mov probe does).
_BMFF_TOP_LEVEL = frozenset({b"ftyp", b"moov", b"mdat", b"moof", b"styp", b"sidx", b"pnot", b"wide",
                             b"free", b"skip", b"junk", b"pict", b"uuid", b"udta", b"hoov", b"meta"})
# Bytes per entry of the tables with an entry count at offset 4 of their payload (after
# version and flags), and the bytes of fixed fields before the entries. A table may claim no more
# entries than the rest of the file holds.
_TABLES = {b"stts": (8, 8), b"ctts": (8, 8), b"stss": (4, 8), b"stps": (4, 8), b"stsc": (12, 8),
           b"stco": (4, 8), b"co64": (8, 8)}
_MAX_DEPTH = 12


@dataclass
class TrackTables:
    """What one track's sample tables claim (the largest of duplicated tables)."""

    handler: bytes = b""
    sample_count: int = 0        # stsz / stz2 sample_count
    sample_size: int = 0         # stsz constant sample size (0: a table of sizes)
    chunk_count: int = 0         # stco / co64 entries
    max_samples_per_chunk: int = 0
    stts_entries: int = 0
    stts_first_delta: int = 0

    @property
    def index_entries(self) -> int:
        """How many index entries FFmpeg builds for this track: one per sample, except for
        uncompressed audio with a single 1-tick time-to-sample entry, indexed by chunk in pieces
        of at least 160 samples (FFmpeg's ``mov_build_index``; 160 bounds its piece sizes)."""
        if self.handler == b"soun" and self.stts_entries == 1 and self.stts_first_delta == 1:
            return self.chunk_count * -(-self.max_samples_per_chunk // 160)
        return self.sample_count


@dataclass
class IsoBmffSummary:
    """The claims of an ISO BMFF file's boxes that decide how much FFmpeg allocates."""

    boxes: int = 0
    tracks: list[TrackTables] = field(default_factory=list)
    fragment_samples: int = 0    # samples of every 'trun' of every movie fragment
    sps: list[bytes] = field(default_factory=list)  # H.264 SPS NAL units from avcC boxes
    overclaims: list[str] = field(default_factory=list)  # tables claiming more than the file holds
    inflated_bytes: int = 0      # of compressed movie headers ('cmov'), all together

    @property
    def index_entries(self) -> int:
        return sum(track.index_entries for track in self.tracks) + self.fragment_samples


def iso_bmff_summary(data, *, progress: Callable[[], None] | None = None) -> IsoBmffSummary | None:
    """Walk an ISO BMFF file's boxes the way FFmpeg's mov demuxer reads them, looking only at box
    headers and at the entry counts of the sample tables. ``None``: ``data`` is not ISO BMFF.

    Work is bounded by the bytes of the file (each box is visited once, tables are not read
    entry by entry, except stsc's samples-per-chunk, in C) and by ``MAX_BOXES``; ``progress`` is
    called every 4096 boxes (a deadline check may raise from it). A box that runs past its
    parent (a truncated file) is cut at the parent's end, as FFmpeg does; what to make of a
    truncated file is left to FFmpeg.
    """
    top = []
    for kind, start, end in _boxes(data, 0, len(data)):
        top.append((kind, start, end))
        if len(top) > 64:
            break
    if not any(kind in _BMFF_TOP_LEVEL for kind, _, _ in top):
        return None
    walker = _BoxWalker(data, progress)
    try:
        walker.walk(0, len(data), depth=0, parent=b"root")
    except _TooManyBoxes:
        walker.summary.overclaims.append(f"more than {MAX_BOXES} boxes")
    return walker.summary


def _boxes(data, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """``(type, payload start, box end)`` of the boxes in ``data[start:end]``, cut at ``end``."""
    offset = start
    while offset + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, offset)
        header = 8
        if size == 1:
            if offset + 16 > end:
                return
            size = struct.unpack_from(">Q", data, offset + 8)[0]
            header = 16
        elif size == 0:  # to the end of the parent
            size = end - offset
        if size < header:
            return
        yield kind, offset + header, min(offset + size, end)
        offset += size


class _BoxWalker:
    def __init__(self, data, progress: Callable[[], None] | None):
        self.data, self.progress = data, progress
        self.summary = IsoBmffSummary()
        self.in_trak = 0

    def walk(self, start: int, end: int, *, depth: int, parent: bytes) -> None:
        if depth > _MAX_DEPTH:
            return
        for kind, payload, box_end in _boxes(self.data, start, end):
            self._count_box()
            if parent == b"root" and kind in (b"free", b"hoov", b"wide") and self._holds_movie(payload, box_end):
                kind = b"moov"  # FFmpeg reads a moov hidden in a free/hoov box as the moov
            if parent not in (b"root", b"moov") and kind in (b"trak", b"mdat"):
                return  # FFmpeg stops reading a container at a misplaced trak/mdat
            self.box(kind, payload, box_end, depth)

    def _count_box(self) -> None:
        self.summary.boxes += 1
        if self.summary.boxes > MAX_BOXES:
            raise _TooManyBoxes
        if self.progress is not None and self.summary.boxes % 4096 == 0:
            self.progress()

    def _holds_movie(self, payload: int, end: int) -> bool:
        return end - payload >= 8 and bytes(self.data[payload + 4:payload + 8]) in (b"mvhd", b"cmov")

    def box(self, kind: bytes, p: int, end: int, depth: int) -> None:
        data, summary = self.data, self.summary
        n = end - p
        if kind == b"trak":
            summary.tracks.append(TrackTables())
            self.in_trak += 1
            try:
                self.walk(p, end, depth=depth + 1, parent=kind)
            finally:
                self.in_trak -= 1
            return
        if kind in _CONTAINER_BOXES:
            self.walk(p, end, depth=depth + 1, parent=kind)
            return
        if kind == b"meta":  # FFmpeg skips to the first 'hdlr' tag and reads boxes from there
            at = bytes(data[p:min(end, p + 4096)]).find(b"hdlr")
            if at >= 4:
                self.walk(p + at - 4, end, depth=depth + 1, parent=kind)
            return
        if kind == b"cmov":
            self.walk_compressed_movie(p, end, depth)
            return
        if kind == b"trun":
            if n >= 8:
                flags = int.from_bytes(data[p + 1:p + 4], "big")
                count = _u32(data, p + 4)
                fixed = 8 + 4 * (flags & 1) + 4 * ((flags >> 2) & 1)
                per_sample = 4 * bin(flags & 0xF00).count("1")
                self._fits(kind, count, per_sample, p + fixed)
                summary.fragment_samples += count
            return
        track = summary.tracks[-1] if summary.tracks else None
        if track is None:
            return  # FFmpeg ignores tables before the first track
        if kind in _TABLES and n >= 8:
            per_entry, fixed = _TABLES[kind]
            count = _u32(data, p + 4)
            self._fits(kind, count, per_entry, p + fixed)
            if kind in (b"stco", b"co64"):
                track.chunk_count = max(track.chunk_count, count)
            elif kind == b"stts":
                track.stts_entries = count
                track.stts_first_delta = _u32(data, p + 12) if count and n >= 16 else 0
            elif kind == b"stsc" and count and count * 12 <= n - 8:
                entries = array.array("I", bytes(data[p + 8:p + 8 + 12 * count]))
                if sys.byteorder == "little":
                    entries.byteswap()
                track.max_samples_per_chunk = max(track.max_samples_per_chunk, max(entries[1::3]))
        elif kind in (b"stsz", b"stz2") and n >= 12:
            count = _u32(data, p + 8)
            if kind == b"stsz":
                size = _u32(data, p + 4)
                bits = 0 if size else 32
                track.sample_size = size
            else:
                bits = data[p + 7]
            if bits:
                self._fits(kind, count, bits / 8, p + 12)
            track.sample_count = max(track.sample_count, count)
        elif kind == b"sbgp" and n >= 12:
            fixed = 16 if data[p] == 1 else 12
            if n >= fixed:
                self._fits(kind, _u32(data, p + fixed - 4), 8, p + fixed)
        elif kind == b"hdlr" and n >= 12 and self.in_trak and bytes(data[p + 8:p + 12]) in (b"vide", b"soun"):
            track.handler = bytes(data[p + 8:p + 12])  # FFmpeg takes a track's type from these two only
        elif kind == b"stsd" and n >= 8:
            self.sample_entries(p + 8, end, track, depth)
        elif kind == b"avcC":
            summary.sps.extend(_avcc_sps(bytes(data[p:end])))

    def sample_entries(self, start: int, end: int, track: TrackTables, depth: int) -> None:
        """Boxes inside video sample entries (avcC, and any table FFmpeg would read there)."""
        for kind, payload, entry_end in _boxes(self.data, start, end):
            self._count_box()
            if track.handler in (b"vide", b""):  # 78 bytes of VisualSampleEntry fields, then boxes
                self.walk(payload + 78, entry_end, depth=depth + 2, parent=kind)

    def walk_compressed_movie(self, p: int, end: int, depth: int) -> None:
        """A 'cmov' (QuickTime's zlib-compressed movie header): walk what FFmpeg would inflate."""
        data = self.data
        if end - p < 24 or bytes(data[p + 4:p + 12]) != b"dcomzlib" or bytes(data[p + 16:p + 20]) != b"cmvd":
            return  # FFmpeg refuses it
        declared = _u32(data, p + 20)
        if declared > MAX_MOVIE_HEADER_BYTES - self.summary.inflated_bytes:
            self.summary.overclaims.append(f"compressed movie headers claim {declared} bytes (after "
                                           f"{self.summary.inflated_bytes}), more than {MAX_MOVIE_HEADER_BYTES}")
            return
        try:  # FFmpeg inflates into a buffer of the declared size: no more than that comes out
            movie = zlib.decompressobj().decompress(bytes(data[p + 24:end]), declared)
        except zlib.error:
            return  # FFmpeg fails to inflate it too
        self.summary.inflated_bytes += len(movie)
        inner = _BoxWalker(movie, self.progress)
        inner.summary = self.summary
        inner.walk(0, len(movie), depth=depth + 1, parent=b"moov")

    def _fits(self, kind: bytes, count: int, per_entry: float, entries_start: int) -> None:
        """Note a table whose entries would run past the end of the file (FFmpeg allocates for
        the claim, then reads entries from whatever follows the box, up to the end of the file)."""
        need, room = math.ceil(count * per_entry), max(len(self.data) - entries_start, 0)
        if need > room:
            self.summary.overclaims.append(f"'{kind.decode('latin-1')}' claims {count} entries ({need} bytes), "
                                           f"more than the {room} bytes left in the file")


class _TooManyBoxes(Exception):
    pass


def _u32(data, offset: int) -> int:
    return struct.unpack_from(">I", data, offset)[0]


def _avcc_sps(record: bytes) -> list[bytes]:
    """The SPS NAL units of an AVCDecoderConfigurationRecord (avcC payload)."""
    if len(record) < 6:
        return []
    found, offset = [], 6
    for _ in range(record[5] & 0x1F):
        if offset + 2 > len(record):
            break
        length = int.from_bytes(record[offset:offset + 2], "big")
        found.append(record[offset + 2:offset + 2 + length])
        offset += 2 + length
    return found


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


# ---- decoding in a sandbox ----------------------------------------------------------------------

DEFAULT_ISOLATED_MEMORY_BYTES = 2 << 30
DEFAULT_ISOLATED_TIMEOUT_S = 120.0
_context = None


def load_clip_isolated(source, *, memory_bytes: int = DEFAULT_ISOLATED_MEMORY_BYTES,
                       timeout_s: float = DEFAULT_ISOLATED_TIMEOUT_S, **load_clip_kwargs):
    """``load_clip(source, **load_clip_kwargs)`` in a child process, for input nothing vouches for.

    The child may map ``memory_bytes`` of address space beyond what it starts with
    (``RLIMIT_AS``; Linux enforces it) and is killed after ``timeout_s`` seconds of wall-clock
    time, whatever FFmpeg is doing. Children are forked from a server process that has imported
    the loader once (multiprocessing's ``forkserver``), so each clip costs a fork, not an
    interpreter start; the first call starts the server.

    Returns what ``load_clip`` returns. Raises what it raises (``BadSample``,
    ``FileNotFoundError``, ``ValueError``), and ``BadSample`` with reason OUT_OF_MEMORY when the
    child ran out of its memory, TIMEOUT when it was killed at ``timeout_s``, DECODE_ERROR when
    it died otherwise (a crash in FFmpeg).
    """
    import torch

    from videollama.data.errors import DECODE_ERROR, OUT_OF_MEMORY, TIMEOUT, BadSample

    name = load_clip_kwargs.get("name")
    if name is None:
        name = f"<{len(source)} bytes>" if isinstance(source, bytes | bytearray | memoryview) else str(source)
        load_clip_kwargs["name"] = name
    if isinstance(source, bytearray | memoryview):
        source = bytes(source)
    receive, send = _mp_context().Pipe(duplex=False)
    child = _mp_context().Process(target=_isolated_child, args=(send, source, memory_bytes, load_clip_kwargs),
                                  daemon=True)
    child.start()
    send.close()
    try:
        if not receive.poll(timeout_s):
            raise BadSample(TIMEOUT, name, f"isolated decode killed after {timeout_s:g} s")
        try:
            kind, payload = receive.recv()
        except EOFError:  # the child died without a word
            child.join(5)
            code = child.exitcode
            raise BadSample(DECODE_ERROR, name, f"isolated decode died (exit code {code})") from None
    finally:
        if child.is_alive():
            child.kill()
        child.join()
        receive.close()
    if kind == "clip":
        frames, timestamps = payload
        return torch.from_numpy(frames), torch.from_numpy(timestamps)
    if kind == "bad":
        reason, bad_source, message = payload
        error = BadSample(reason, bad_source, "")
        error.args = (message,)
        raise error
    if kind == "oom":
        raise BadSample(OUT_OF_MEMORY, name, f"isolated decode ran out of its {memory_bytes} bytes: {payload}")
    raise payload  # an exception load_clip raises itself (FileNotFoundError, ValueError)


def _mp_context():
    global _context
    if _context is None:
        import multiprocessing

        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(["videollama.data.video"])
    return _context


def _isolated_child(send, source, memory_bytes: int, load_clip_kwargs: dict) -> None:
    import resource

    from videollama.data.errors import BadSample
    from videollama.data.video import load_clip

    try:
        with open("/proc/self/statm") as statm:  # the address space already mapped, in pages
            mapped = int(statm.read().split()[0]) * resource.getpagesize()
    except OSError:
        mapped = 0
    limit = mapped + memory_bytes
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        frames, timestamps = load_clip(source, **load_clip_kwargs)
        message = ("clip", (frames.numpy(), timestamps.numpy()))
    except BadSample as error:
        if isinstance(error.__cause__, MemoryError):  # FFmpeg could not allocate (ENOMEM)
            message = ("oom", str(error))
        else:
            message = ("bad", (error.reason, error.source, str(error)))
    except MemoryError as error:
        message = ("oom", f"{type(error).__name__}: {error}")
    except Exception as error:  # handed to the parent, which raises it
        if isinstance(error, RuntimeError) and "can't allocate memory" in str(error):  # torch's CPU allocator
            message = ("oom", str(error))
        else:
            message = ("error", error)
    try:
        send.send(message)
    except MemoryError:
        send.send(("oom", "sending the result"))
    send.close()
