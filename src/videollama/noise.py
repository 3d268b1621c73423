"""Third-party messages known to be benign, silenced one by one at the command line's entry.

Each entry names the library, the exact message and why a user can do nothing about it; nothing
else is filtered (a new warning still shows). Installed by ``videollama.cli.main`` before any
subcommand imports torch, peft or torchao.
"""

from __future__ import annotations

import logging
import re
import warnings

# (logger name, message pattern matched against the formatted message at the record's start), why
KNOWN_LOG_RECORDS: list[tuple[str, str, str]] = [
    # torchao's wheel ships CUDA-only extension libraries (MX fp8, CUTLASS sm90a), one built for
    # Python 3.10; loading them fails on a CPU or on 3.11 and nothing of ours uses them (int8
    # decoding is our own kernel). peft imports torchao whenever it is installed.
    ("torchao", r"Failed to load .*torchao/_C\w*\.(cpython-\d+-[\w-]+|abi3)\.so", "CUDA-only torchao kernels"),
    ("torchao.kernel.intmm", r"Warning: Detected no triton", "triton is a GPU compiler; CPU runs do not use it"),
    # torchao registers its enums as pytree constants, which torch now deprecates; a torchao matter.
    ("torch.utils._pytree", r"<enum '\w+'> is an Enum subclass and is now natively supported",
     "torchao's enum registration"),
]

# (message pattern, category, module pattern), why
KNOWN_WARNINGS: list[tuple[str, type[Warning], str, str]] = [
    # Exporting a checkpoint reads its DCP shards in one process, which is exactly what we mean.
    ("torch.distributed is disabled, unavailable or uninitialized, assuming the intent is to load in a single process",
     UserWarning, r"torch\.distributed\.checkpoint", "a single-process DCP read"),
]


class _DropKnown(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is not ours to judge: let it through
            return True
        return not self.pattern.match(message)


def quiet_known_noise() -> None:
    """Install the filters (idempotent)."""
    for name, pattern, _why in KNOWN_LOG_RECORDS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnown) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(_DropKnown(pattern))
    for message, category, module, _why in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message), category=category, module=module)
