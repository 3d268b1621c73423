"""The one exception type for a sample that cannot be used, with a reason code.

The loader raises it; the shard pipeline catches it, counts it by ``reason`` and logs it
once with its key. Reasons are short stable strings, used as keys in skip statistics.
"""

from __future__ import annotations

# Stable reason codes (keys of the skip statistics and of `videollama data inspect --json`).
EMPTY_FILE = "empty_file"              # zero bytes
INVALID_CONTAINER = "invalid_container"  # FFmpeg cannot open it (garbage, missing moov atom, ...)
NO_VIDEO_STREAM = "no_video_stream"
ZERO_FRAMES = "zero_frames"            # opens, but no frame decodes
DECODE_ERROR = "decode_error"          # fails part-way through decoding
ABSURD_RESOLUTION = "absurd_resolution"
ABSURD_DURATION = "absurd_duration"
TIMEOUT = "timeout"                    # decoding exceeded its time/work bound
NOT_A_FILE = "not_a_file"              # a path to a directory, FIFO, device, socket, a symlink loop, or with a NUL byte
ABSURD_SAMPLE_COUNT = "absurd_sample_count"  # sample tables claim more samples than the cap or the file's bytes
OUT_OF_MEMORY = "out_of_memory"        # an isolated decode ran past its memory limit (untrusted.py)
MISSING_JSON = "missing_json"
INVALID_JSON = "invalid_json"
MISSING_VIDEO = "missing_video"
TRUNCATED_TAR = "truncated_tar"
TARGET_TOO_LONG = "target_too_long"    # the caption/answer does not fit the max sequence length
OUTSIDE_ROOT = "outside_root"          # a path from a data file that leaves its root folder
TOO_LARGE = "too_large"                # a file or line over its size cap
INVALID_LINE = "invalid_line"          # a JSONL line that is not a usable item (bad JSON, UTF-8, fields)
PROMPT_TOO_LONG = "prompt_too_long"    # a question that does not fit the context
OVER_WINDOW_BUDGET = "over_window_budget"  # whole-video training: more windows than a micro-batch holds


class SkipBudgetExceeded(RuntimeError):
    """Too large a fraction of the data is unusable: something upstream is broken."""


class BadSample(Exception):
    """A sample that must be skipped. ``reason`` is one of the codes above."""

    def __init__(self, reason: str, source: str, message: str):
        self.reason = reason
        self.source = source
        super().__init__(f"{source}: {message} [{reason}]")
