"""What a curate run reports in stats.json, gathered in one object the pipeline owns.

Stages time themselves with :meth:`RunStats.timed` (wall seconds of the stage in this process)
or add the CPU seconds their completion records hold (:meth:`RunStats.add_seconds`, summed over
videos and batches), count what they passed with :meth:`RunStats.count`, and note the settings
they decided (the threshold, the reference clips) with :meth:`RunStats.note`. :meth:`RunStats.report`
is the dict written to stats.json, with the same keys whatever stages ran.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class RunStats:
    def __init__(self, engine: str):
        self.started = time.perf_counter()
        self.engine = engine
        self.seconds: dict[str, float] = {}  # stage -> seconds (``*_wall``: wall time here; others: CPU of records)
        self.counts: dict[str, int] = {}  # clips (or sources) left after each stage
        self.resumed_videos = 0
        self.resumed_batches: dict[str, int] = {}  # model stage -> batches whose record was already there
        self.corrupt: dict[str, int] = {}  # data.errors reason -> sources skipped for it
        self.skipped_sources: dict[str, list[str]] = {}  # source id (or path) -> [reason, message]
        self.notes: dict[str, Any] = {}  # what the run decided: metric, threshold, reference clips, ...

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Add the wall time of the ``with`` block to ``seconds[stage]``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add_seconds(stage, time.perf_counter() - t0)

    def add_seconds(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def count(self, name: str, value: int) -> None:
        self.counts[name] = value

    def skip_source(self, where: str, reason: str, message: str) -> None:
        """A source that could not be used (a ``videollama.data.errors`` reason)."""
        self.corrupt[reason] = self.corrupt.get(reason, 0) + 1
        self.skipped_sources[where] = [reason, message]

    def note(self, **facts: Any) -> None:
        self.notes.update(facts)

    def report(self, *, dropped: dict[str, int], shards: int) -> dict[str, Any]:
        """The stats.json dict, ``total_wall`` measured now; ``dropped``: clips per drop reason."""
        self.seconds["total_wall"] = time.perf_counter() - self.started
        return {"engine": self.engine, "resumed_videos": self.resumed_videos, "resumed_batches": self.resumed_batches,
                "seconds": self.seconds, **self.notes, "counts": self.counts, "dropped": dict(sorted(dropped.items())),
                "corrupt": dict(sorted(self.corrupt.items())),
                "skipped_sources": dict(sorted(self.skipped_sources.items())), "shards": shards}
