"""The clip row that flows through curation, its per-text scores, and why a clip is dropped.

A :class:`ClipRow` is built from a per-video completion record (``cutting.process_video``'s
``rows``: where the clip is in its source and what the cheap filters read), and every later
stage fills in its own columns: ``scores`` (one :class:`ScoreEntry` per candidate text),
``drop_reason``, ``caption``, ``caption_source``, ``duplicate_of``, ``kept``. At the edges it
becomes plain data again: :meth:`ClipRow.table_row` is one row of ``clips.parquet`` (and the
shards' ``texts``), :meth:`ClipRow.from_table` reads one back, so a finished run's table can be
re-filtered (``quality.threshold_sweep``) with the same filter functions the pipeline uses.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from videollama.curate.config import PMI_EXTRA_COLUMNS


class DropReason(str, Enum):
    """Why a clip is not kept: the ``drop_reason`` column of clips.parquet and the keys of
    stats.json's ``dropped``, so the values are stable strings.

    These are decisions about clips that decoded fine, made by curation's filters; a source that
    cannot be used at all is a ``videollama.data.errors`` reason instead (stats.json's ``corrupt``).
    """

    TOO_SHORT = "too_short"
    LOW_RESOLUTION = "low_resolution"
    STATIC = "static"                # no motion: a slideshow
    MISALIGNED = "misaligned"        # candidate texts, none passing, and no captioner
    NO_TEXT = "no_text"              # no candidate text and no captioner
    EMPTY_CAPTION = "empty_caption"  # the captioner gave nothing
    DUPLICATE = "duplicate"          # a near-duplicate of an earlier clip (``duplicate_of``)

    def __str__(self) -> str:
        return self.value


# Dropped before any model scores a text: the clips that quality figures of alignment leave out.
CHEAP_DROPS = (DropReason.STATIC, DropReason.TOO_SHORT, DropReason.LOW_RESOLUTION)

# Every per-text score column of a ScoreEntry, in the order of clips.parquet's struct.
SCORE_COLUMNS = ("clip", "pmi", *PMI_EXTRA_COLUMNS)


@dataclass
class ScoreEntry:
    """One candidate text of a clip with its scores (None: that stage did not run)."""

    text: str
    clip: float | None = None               # CLIP similarity (--clip)
    pmi: float | None = None                # PMI, text-only prior, mean over tokens (--scorer)
    pmi_sum: float | None = None
    pmi_span: float | None = None
    pmi_marginal: float | None = None       # the marginal prior (scorer.reference_clips > 0)
    pmi_marginal_sum: float | None = None
    pmi_marginal_span: float | None = None

    def value(self, column: str) -> float | None:
        """The score in ``column`` (one of SCORE_COLUMNS, chosen by the run's config)."""
        if column not in SCORE_COLUMNS:
            raise KeyError(f"no score column {column!r}; one of {SCORE_COLUMNS}")
        return getattr(self, column)

    def set(self, column: str, value: float | None) -> None:
        """Store a model stage's score in ``column`` (one of SCORE_COLUMNS)."""
        self.value(column)  # refuses an unknown column
        setattr(self, column, value)


@dataclass
class ClipRow:
    """One clip of a source video and every decision about it (one row of clips.parquet)."""

    clip_id: str                  # SOURCE_ID-NNNN, in the source's order
    source_id: str
    start_s: float                # seconds from the source's first frame
    end_s: float
    duration_s: float
    width: int                    # the source's frame size
    height: int
    motion: float                 # motion.motion_score of the clip's frames
    texts: list[str]              # the source's candidate texts
    fps: float | None = None      # the source's nominal rate (records only; not in clips.parquet)
    mp4_bytes: int | None = None  # the clip file's size (records only; not in clips.parquet)
    scores: list[ScoreEntry] = field(default_factory=list)
    kept: bool = False
    drop_reason: DropReason | None = None
    caption: str | None = None
    caption_source: str | None = None  # "input" (a candidate text) or "generated" (the captioner)
    duplicate_of: str | None = None

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> ClipRow:
        """A row of a per-video completion record (``process_video``), each text not yet scored."""
        return cls(clip_id=record["clip_id"], source_id=record["source_id"], start_s=record["start_s"],
                   end_s=record["end_s"], duration_s=record["duration_s"], width=record["width"],
                   height=record["height"], motion=record["motion"], texts=list(record["texts"]),
                   fps=record["fps"], mp4_bytes=record["mp4_bytes"],
                   scores=[ScoreEntry(text) for text in record["texts"]])

    @classmethod
    def from_table(cls, row: dict[str, Any]) -> ClipRow:
        """A row read back from clips.parquet (``output.read_table``)."""
        reason = row["drop_reason"]
        return cls(clip_id=row["clip_id"], source_id=row["source_id"], start_s=row["start_s"],
                   end_s=row["end_s"], duration_s=row["duration_s"], width=row["width"], height=row["height"],
                   motion=row["motion"], texts=list(row["texts"]),
                   scores=[ScoreEntry(**{k: s.get(k) for k in ("text", *SCORE_COLUMNS)}) for s in row["scores"] or []],
                   kept=row["kept"], drop_reason=None if reason is None else DropReason(reason),
                   caption=row["caption"], caption_source=row["caption_source"], duplicate_of=row["duplicate_of"])

    def scores_table(self) -> list[dict[str, Any]]:
        """The per-text scores as plain dicts (clips.parquet's ``scores``, the shards' ``texts``)."""
        return [asdict(s) for s in self.scores]

    def table_row(self) -> dict[str, Any]:
        """The row as clips.parquet's columns (``output.COLUMNS``), plain JSON-able values."""
        return {"clip_id": self.clip_id, "source_id": self.source_id, "start_s": self.start_s, "end_s": self.end_s,
                "duration_s": self.duration_s, "width": self.width, "height": self.height, "motion": self.motion,
                "texts": list(self.texts), "scores": self.scores_table(), "kept": self.kept,
                "drop_reason": None if self.drop_reason is None else self.drop_reason.value,
                "caption": self.caption, "caption_source": self.caption_source, "duplicate_of": self.duplicate_of}
