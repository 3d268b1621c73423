"""Evaluation sets: a JSONL file plus a video root (DESIGN.md section 4), read by one set of rules.

    VideoQA line:    {"video": "rel/path.mp4", "question": "...", "answer": "...", "kind": "static"}
                     (optional "options": [...] for multiple choice; the answer must be one of them)
    captioning line: {"video": "rel/path.mp4", "captions": ["...", "..."]}
    grounding line:  {"video": "rel/path.mp4", "question": "when does ...?", "segments": [[s, e], ...]}
                     (seconds, 0 <= s <= e; the model answers "from S to E seconds")

Both readers use :func:`parse_eval_line`, and for both a bad line is a counted skip whose
message names ``FILE:LINE``: the evaluation harness through :func:`read_eval_set`, the training
loader through :func:`iter_eval_lines`. Lines are read with safe_io's bounds (bytes, depth,
UTF-8, text lengths). Other keys of a line are kept as metadata. Imports no torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from videollama.data.safe_io import MAX_TEXT_CHARS, iter_lines, parse_json

TASKS = ("videoqa", "caption", "grounding")
_ITEM_KEYS = ("video", "question", "answer", "kind", "options", "captions", "segments")
# Far more than any video has events: a line with more is a hostile one, not a long video.
MAX_SEGMENTS = 1000


@dataclass
class EvalItem:
    """One line of an evaluation set. ``index`` is its position among the file's items."""

    index: int
    video: str
    question: str | None = None
    answer: str | None = None
    kind: str | None = None
    options: list[str] | None = None
    captions: list[str] | None = None
    segments: list[list[float]] | None = None  # grounding: [[start, end], ...] seconds
    extra: dict[str, Any] = field(default_factory=dict)  # the line's other keys

    @property
    def task(self) -> str:
        if self.segments is not None:
            return "grounding"
        return "videoqa" if self.question is not None else "caption"

    def training_meta(self) -> dict[str, Any]:
        """The sample metadata the training loader makes of this line (the shard JSON's shape)."""
        extra = {"video": self.video, **self.extra}
        if self.options is not None:
            extra["options"] = self.options
        if self.segments is not None:  # the answer the model is taught: the first segment's range
            from videollama.eval.grounding import format_time_range

            qa = {"question": self.question, "answer": format_time_range(*self.segments[0]), "kind": "grounding"}
            return {**extra, "caption": "", "qa": [qa], "segments": self.segments}
        if self.question is not None:
            qa = {"question": self.question, "answer": self.answer, "kind": self.kind}
            return {**extra, "caption": "", "qa": [qa]}
        return {**extra, "caption": self.captions[0], "captions": self.captions}


def _require_str(obj: dict, key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: {key!r} must be a non-empty string, got {_short(value)}")
    _check_length(value, key, where)
    return value


def _check_length(text: str, key: str, where: str) -> None:
    if len(text) > MAX_TEXT_CHARS:  # before any tokenizing: a 100 MB question costs nothing
        raise ValueError(f"{where}: {key!r} is {len(text)} characters, over the {MAX_TEXT_CHARS}-character cap")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def parse_eval_line(obj: Any, where: str, *, task: str | None = None, index: int = 0) -> EvalItem:
    """Validate one parsed line. ``task`` None: grounding if it has segments, VideoQA if it has a
    question, else captioning.

    Raises ValueError starting with ``where`` (``FILE:LINE``) and saying what is wrong.
    """
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if task is None:
        task = "grounding" if "segments" in obj else "videoqa" if "question" in obj else "caption"
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    item = EvalItem(index=index, video=_require_str(obj, "video", where),
                    extra={k: v for k, v in obj.items() if k not in _ITEM_KEYS})
    if task == "videoqa":
        item.question = _require_str(obj, "question", where)
        item.answer = _require_str(obj, "answer", where)
        kind = obj.get("kind", "unspecified")
        if not isinstance(kind, str):
            raise ValueError(f"{where}: 'kind' must be a string, got {kind!r}")
        item.kind = kind
        options = obj.get("options")
        if options is not None:
            if not (isinstance(options, list) and len(options) >= 2
                    and all(isinstance(o, str) and o.strip() for o in options)):
                raise ValueError(f"{where}: 'options' must be a list of at least two non-empty strings")
            _check_length(" | ".join(options), "options", where)
            from videollama.eval.metrics import choose_option

            if choose_option(item.answer, options) is None:
                raise ValueError(f"{where}: answer {item.answer!r} is not one of the options {options}")
            item.options = options
    elif task == "grounding":
        item.question = _require_str(obj, "question", where)
        item.segments = _segments(obj.get("segments"), where)
    else:
        captions = obj.get("captions")
        if not (isinstance(captions, list) and captions and all(isinstance(c, str) for c in captions)):
            raise ValueError(f"{where}: 'captions' must be a non-empty list of strings")
        for caption in captions:
            _check_length(caption, "captions", where)
        item.captions = captions
    return item


def _segments(value: Any, where: str) -> list[list[float]]:
    """A grounding line's ``segments``: a non-empty list of ``[start, end]`` seconds, 0 <= start <= end."""
    def is_time(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0

    if not (isinstance(value, list) and 0 < len(value) <= MAX_SEGMENTS):
        raise ValueError(f"{where}: 'segments' must be a list of 1 to {MAX_SEGMENTS} [start, end] pairs, "
                         f"got {_short(value)}")
    for segment in value:
        if not (isinstance(segment, list) and len(segment) == 2 and all(map(is_time, segment))
                and segment[0] <= segment[1]):
            raise ValueError(f"{where}: each segment must be [start, end] seconds with 0 <= start <= end, "
                             f"got {_short(segment)}")
    return [[float(a), float(b)] for a, b in value]


def _json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed JSON or the ValueError)`` for every non-blank line, each line
    bounded in bytes and JSON depth (safe_io): a hostile file costs a counted bad line."""
    for lineno, text in iter_lines(path):
        if isinstance(text, ValueError):
            yield lineno, text
            continue
        try:
            yield lineno, parse_json(text, f"{path}:{lineno}")
        except ValueError as e:
            yield lineno, e


def iter_eval_lines(path: str | Path, *, task: str | None = None) -> Iterator[tuple[int, EvalItem | ValueError]]:
    """Every line of an evaluation set as ``(line number, EvalItem)``, or ``(line number, the
    ValueError that says what is wrong with it)``: a bad line never stops the iteration."""
    path = Path(path)
    index = 0
    for lineno, obj in _json_lines(path):
        if isinstance(obj, ValueError):
            yield lineno, obj
            continue
        try:
            item = parse_eval_line(obj, f"{path}:{lineno}", task=task, index=index)
        except ValueError as e:
            yield lineno, e
            continue
        index += 1
        yield lineno, item


def read_eval_set(path: str | Path, task: str, *, limit: int | None = None
                  ) -> tuple[list[EvalItem], list[tuple[int, str]]]:
    """The items of a VideoQA, captioning or grounding JSONL file, and ``(line, message)`` for each
    line that is not one (each message starts with ``FILE:LINE``): counted by the caller, never fatal."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: evaluation set not found")
    items: list[EvalItem] = []
    bad: list[tuple[int, str]] = []
    for lineno, item in iter_eval_lines(path, task=task):
        if limit is not None and len(items) >= limit:
            break
        if isinstance(item, ValueError):
            bad.append((lineno, str(item)))
        else:
            items.append(item)
    return items, bad
