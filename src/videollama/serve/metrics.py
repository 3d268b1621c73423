"""Server metrics in the Prometheus text format (``GET /metrics``), written by hand: a few
counters, gauges and histograms need no client library.

Exposed: ``videollama_requests_total{status}``, ``videollama_request_seconds`` and
``videollama_time_to_first_token_seconds`` (histograms), ``videollama_generated_tokens_total``,
``videollama_tokens_per_second`` (decode throughput over the last few seconds),
``videollama_queue_depth``, ``videollama_running_requests``, ``videollama_video_cache_hits_total``,
``..._misses_total``, ``..._evictions_total``, ``..._bytes`` and ``..._entries``.
"""

from __future__ import annotations

import threading
import time
from collections import deque

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Histogram:
    def __init__(self, buckets=LATENCY_BUCKETS) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        for i, edge in enumerate(self.buckets):
            if value <= edge:
                self.counts[i] += 1
        self.total += value
        self.n += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{edge}"}} {count}' for edge, count in zip(self.buckets, self.counts)]
        return [*out, f'{name}_bucket{{le="+Inf"}} {self.n}', f"{name}_sum {self.total:.6f}", f"{name}_count {self.n}"]


class Metrics:
    """Thread-safe counters of one server; :meth:`render` gives the exposition text."""

    WINDOW_S = 10.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[int, int] = {}
        self.latency = Histogram()
        self.first_token = Histogram()
        self.tokens = 0
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent decode steps
        self.queue_depth = self.running = 0

    def request_done(self, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[status] = self.requests.get(status, 0) + 1
            self.latency.observe(seconds)

    def first_token_after(self, seconds: float) -> None:
        with self._lock:
            self.first_token.observe(seconds)

    def tokens_generated(self, n: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.tokens += n
            self._recent.append((now, n))
            while self._recent and self._recent[0][0] < now - self.WINDOW_S:
                self._recent.popleft()

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            recent = [(t, n) for t, n in self._recent if t >= now - self.WINDOW_S]
        if len(recent) < 2:
            return 0.0
        span = recent[-1][0] - recent[0][0]
        return sum(n for _, n in recent[1:]) / span if span > 0 else 0.0

    def render(self, cache=None) -> str:
        tps = self.tokens_per_second()
        with self._lock:
            lines = ["# HELP videollama_requests_total Chat completion requests by HTTP status.",
                     "# TYPE videollama_requests_total counter"]
            lines += [f'videollama_requests_total{{status="{s}"}} {n}' for s, n in sorted(self.requests.items())]
            lines += ["# HELP videollama_request_seconds Request latency, arrival to last byte.",
                      "# TYPE videollama_request_seconds histogram", *self.latency.lines("videollama_request_seconds"),
                      "# HELP videollama_time_to_first_token_seconds Arrival to first generated token.",
                      "# TYPE videollama_time_to_first_token_seconds histogram",
                      *self.first_token.lines("videollama_time_to_first_token_seconds"),
                      "# TYPE videollama_generated_tokens_total counter", f"videollama_generated_tokens_total {self.tokens}",
                      "# HELP videollama_tokens_per_second Generated tokens per second over the last 10 s.",
                      "# TYPE videollama_tokens_per_second gauge", f"videollama_tokens_per_second {tps:.3f}",
                      "# TYPE videollama_queue_depth gauge", f"videollama_queue_depth {self.queue_depth}",
                      "# TYPE videollama_running_requests gauge", f"videollama_running_requests {self.running}"]
        if cache is not None:
            lines += ["# TYPE videollama_video_cache_hits_total counter", f"videollama_video_cache_hits_total {cache.hits}",
                      "# TYPE videollama_video_cache_misses_total counter",
                      f"videollama_video_cache_misses_total {cache.misses}",
                      "# TYPE videollama_video_cache_evictions_total counter",
                      f"videollama_video_cache_evictions_total {cache.evictions}",
                      "# TYPE videollama_video_cache_bytes gauge", f"videollama_video_cache_bytes {cache.nbytes}",
                      "# TYPE videollama_video_cache_entries gauge", f"videollama_video_cache_entries {len(cache)}"]
        return "\n".join(lines) + "\n"
