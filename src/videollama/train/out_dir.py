"""Where ``videollama merge`` and ``videollama export`` write: never over anything but their own kind.

The rule of ``videollama data shards`` (data/ingest.py): ``--out`` must be absent or empty, or,
with ``--overwrite``, hold what the same command writes (:func:`is_model_dir`; for ``export``
also :func:`is_adapter_dir`), which is then replaced whole. An input's folder, a folder inside
one, or one that holds an input is never written to. The new directory is written beside
``--out`` and swapped in only when complete (``data.safe_io.written_beside``): a failure or Ctrl-C
leaves the old one as it was and no half-written model.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

# What VideoLlama.save_pretrained writes (model/videollama.py), and what save_adapter writes (lora.py).
MODEL_FILES = {"config.json", "preprocessor.json", "tokenizer.json", "model.safetensors",
               "model.safetensors.index.json"}
MODEL_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}


def _entries(path: Path) -> list[Path] | None:
    """The entries of a real folder whose entries are all plain files (no links, no folders)."""
    if path.is_symlink() or not path.is_dir():
        return None
    entries = list(path.iterdir())
    return entries if all(p.is_file() and not p.is_symlink() for p in entries) else None


def is_model_dir(path: Path) -> bool:
    """A folder holding a model directory and nothing else: config.json, the weights, tokenizer.json,
    preprocessor.json."""
    entries = _entries(path)
    names = {p.name for p in entries or ()}
    return (entries is not None and "config.json" in names
            and all(n in MODEL_FILES or MODEL_SHARD.fullmatch(n) for n in names))


def is_adapter_dir(path: Path) -> bool:
    """A folder holding a peft adapter and nothing else."""
    entries = _entries(path)
    names = {p.name for p in entries or ()}
    return entries is not None and "adapter_config.json" in names and names <= ADAPTER_FILES


def check_out(out: Path, *, overwrite: bool, inputs: dict[str, Path], command: str,
              replaceable: dict[str, Callable[[Path], bool]], inside_allowed: tuple[str, ...] = ()) -> None:
    """Refuse (ValueError, one line) an ``out`` that is, is inside or holds one of ``inputs``
    (label -> folder; inside the ones labelled in ``inside_allowed`` is allowed), or that is not
    empty, unless ``overwrite`` and it is one of the kinds ``replaceable`` (description -> test)."""
    where = out.resolve()
    for label, folder in inputs.items():
        folder = folder.resolve()
        if where == folder or (where.is_relative_to(folder) and label not in inside_allowed):
            raise ValueError(f"--out {out} is, or is inside, the {label} input {folder}; write elsewhere")
        if folder.is_relative_to(where):
            raise ValueError(f"--out {out} holds the {label} input {folder}; write elsewhere")
    if not out.exists() and not out.is_symlink():
        return
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return
    kinds = " or ".join(replaceable)
    if not overwrite:
        raise ValueError(f"{out} is not empty: `videollama {command}` writes a new folder; give an empty or new "
                         f"--out, or --overwrite to replace {kinds} there whole")
    if not any(test(out) for test in replaceable.values()):
        raise ValueError(f"--overwrite: {out} is not {kinds} (it holds other files or folders); refusing to "
                         "replace it")
