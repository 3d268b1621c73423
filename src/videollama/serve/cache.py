"""The video cache: what the model computed for a video, kept by the SHA-256 of the video's bytes.

Our decoder reads a video only through cross-attention, so a video's encoder pass and every
cross-attention block's keys/values can be computed once and reused by every question and every
turn about it. An entry holds the whole video's window latents ``[1, W * L, D_v]`` (W windows
under the model's policy, stamped with their times), the K/V list (one ``(k, v)`` pair, each
``[1, H, W * L, hd]``, per cross-attention block) and every frame's timestamp, per window (s).
The cache is a least-recently-used map bounded both in bytes (tensor storage) and in entries.
Thread-safe: the HTTP side looks entries up, the scheduler thread inserts them.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class VideoEntry:
    """One encoded video. ``nbytes``: the storage of its tensors."""

    key: str
    latents: object                  # torch.Tensor [1, W * L, D_v]
    media_kv: list                   # [(k, v)] per cross-attention block, each [1, H, W * L, hd]
    timestamps: list                 # per window, seconds from the video's start of each frame seen
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        tensors = [self.latents, *(t for kv in self.media_kv for t in kv)]
        self.nbytes = sum(t.numel() * t.element_size() for t in tensors)


class VideoCache:
    """LRU of :class:`VideoEntry` by content hash, at most ``max_bytes`` and ``max_entries``.

    An entry larger than ``max_bytes`` on its own is not kept. ``hits``/``misses`` count
    :meth:`get` calls; ``evictions`` the entries dropped to make room.
    """

    def __init__(self, max_bytes: int, max_entries: int) -> None:
        if max_bytes < 1 or max_entries < 1:
            raise ValueError(f"video cache needs max_bytes >= 1 and max_entries >= 1, got {max_bytes}, {max_entries}")
        self.max_bytes, self.max_entries = max_bytes, max_entries
        self._entries: OrderedDict[str, VideoEntry] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0
        self.hits = self.misses = self.evictions = 0

    def get(self, key: str) -> VideoEntry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def peek(self, key: str) -> VideoEntry | None:
        """The entry, without counting a hit or a miss or refreshing its place."""
        with self._lock:
            return self._entries.get(key)

    def put(self, entry: VideoEntry) -> None:
        with self._lock:
            if entry.key in self._entries:
                self.nbytes -= self._entries.pop(entry.key).nbytes
            if entry.nbytes > self.max_bytes:
                return
            self._entries[entry.key] = entry
            self.nbytes += entry.nbytes
            while self.nbytes > self.max_bytes or len(self._entries) > self.max_entries:
                _, old = self._entries.popitem(last=False)
                self.nbytes -= old.nbytes
                self.evictions += 1

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries
