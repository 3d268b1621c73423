"""What an mp4/mov declares, read without trusting it: the box tree (fragments and QuickTime's
compressed movie header included), box headers and the entry counts of the sample tables only.

FFmpeg's mp4 demuxer allocates an index entry for every sample a table claims, inside
``av.open``; this reads the claims first, as a pure function over the file's bytes (``bytes`` or
a memory map) bounded by them, raising nothing but ``ValueError`` for a malformed box. What to
refuse, and with which reason, is ``container.check_declared``'s policy.
"""

from __future__ import annotations

import array
import math
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
