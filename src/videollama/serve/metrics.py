"""Server metrics in the Prometheus text format (``GET /metrics``), through ``prometheus_client``
with a registry of each server's own (never the process-global one, so two servers in one process,
the tests' for one, count apart).

Exposed: ``videollama_requests_total{status}`` (chat completion requests that passed the API key,
by the status they ended with, unhandled 500s included), ``videollama_http_responses_total{route,
status}`` (every HTTP response of the server, refusals before any route included: 401 key, 403
Origin, 421 Host, 408/413/503 bodies; ``route`` is one of :data:`ROUTES` or ``other``),
``videollama_request_seconds`` and ``videollama_time_to_first_token_seconds`` (histograms),
``videollama_generated_tokens_total``, ``videollama_tokens_per_second`` (decode throughput over the
last few seconds), ``videollama_queue_depth``, ``videollama_running_requests``,
``videollama_video_cache_hits_total``, ``..._misses_total``, ``..._evictions_total``,
``..._bytes`` and ``..._entries``.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# The route label's values: a fixed set, so that no client can grow the label space.
ROUTES = ("/v1/chat/completions", "/v1/models", "/health", "/metrics")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def route_label(path: str) -> str:
    return path if path in ROUTES else "other"


class Metrics:
    """Thread-safe counters of one server; :meth:`render` gives the exposition text.

    ``queue_depth`` and ``running`` are plain attributes the scheduler sets; they, the decode
    throughput and the video cache's counts are read when the metrics are scraped."""

    WINDOW_S = 10.0

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._requests = Counter("videollama_requests", "Chat completion requests by HTTP status.", ["status"],
                                 registry=self.registry)
        self._responses = Counter("videollama_http_responses", "HTTP responses by route and status, refusals "
                                  "before any route included.", ["route", "status"], registry=self.registry)
        self._latency = Histogram("videollama_request_seconds", "Request latency, arrival to last byte.",
                                  buckets=LATENCY_BUCKETS, registry=self.registry)
        self._first_token = Histogram("videollama_time_to_first_token_seconds", "Arrival to first generated token.",
                                      buckets=LATENCY_BUCKETS, registry=self.registry)
        self._tokens = Counter("videollama_generated_tokens", "Generated tokens.", registry=self.registry)
        self._lock = threading.Lock()
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent decode steps
        self.queue_depth = self.running = 0
        self.cache = None
        self.registry.register(_LiveCollector(self))

    def request_done(self, status: int, seconds: float) -> None:
        self._requests.labels(status=str(status)).inc()
        self._latency.observe(seconds)

    def http_response(self, path: str, status: int) -> None:
        self._responses.labels(route=route_label(path), status=str(status)).inc()

    def first_token_after(self, seconds: float) -> None:
        self._first_token.observe(seconds)

    def tokens_generated(self, n: int) -> None:
        now = time.monotonic()
        self._tokens.inc(n)
        with self._lock:
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
        if cache is not None:
            self.cache = cache
        return generate_latest(self.registry).decode()


class _LiveCollector:
    """The values read at scrape time: queue, running rows, throughput, the video cache."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self):
        return []

    def collect(self):
        m = self.metrics
        yield GaugeMetricFamily("videollama_tokens_per_second", "Generated tokens per second over the last 10 s.",
                                value=m.tokens_per_second())
        yield GaugeMetricFamily("videollama_queue_depth", "Requests waiting for a batch row.", value=m.queue_depth)
        yield GaugeMetricFamily("videollama_running_requests", "Requests in the batch.", value=m.running)
        cache = m.cache
        if cache is None:
            return
        for name, value in (("hits", cache.hits), ("misses", cache.misses), ("evictions", cache.evictions)):
            yield CounterMetricFamily(f"videollama_video_cache_{name}", f"Video cache {name}.", value=value)
        yield GaugeMetricFamily("videollama_video_cache_bytes", "Video cache size in bytes.", value=cache.nbytes)
        yield GaugeMetricFamily("videollama_video_cache_entries", "Videos in the video cache.", value=len(cache))
