"""metrics.json's ``provenance``: what a figure needs to be reproduced.

- the model: the sha256 of its config (as loaded) and, given the model directory, of each file of
  it that decides an answer (``config.json``, ``preprocessor.json``, ``tokenizer.json``, the
  safetensors weights) and of the adapter's files, with one ``digest`` over them all;
- the data: the evaluation file's sha256 and size;
- the preprocessing spec and window policy the videos were seen under (``config.preprocess``);
- the code: the videollama, torch and Python versions, and the git commit of the checkout the
  package was imported from (with ``dirty`` when it has uncommitted changes), when there is one;
- the seeds that decide anything (the multiple-choice distractors, the bootstrap).

Files are hashed streaming, 1 MiB at a time (a 13B model's weights are read once, never held).
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Any

# The files of a model or adapter directory that change what it answers.
_MODEL_FILES = ("config.json", "preprocessor.json", "tokenizer.json", "adapter_config.json")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def directory_digest(directory: str | Path) -> dict[str, Any]:
    """``{"files": {name: sha256}, "digest": sha256 over the sorted "name sha256" lines}``."""
    directory = Path(directory)
    names = sorted({*(n for n in _MODEL_FILES if (directory / n).is_file()),
                    *(p.name for p in directory.glob("*.safetensors"))})
    files = {name: file_sha256(directory / name) for name in names}
    listing = "".join(f"{name} {digest}\n" for name, digest in files.items())
    return {"files": files, "digest": hashlib.sha256(listing.encode()).hexdigest()}


def git_commit(source: Path | None = None) -> dict[str, Any] | None:
    """The commit (and whether the tree is dirty) of the checkout holding ``source`` (default: this
    package), or None outside a git checkout or without git."""
    where = (source or Path(__file__)).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}


def provenance(model: Any, data_path: str | Path, *, model_dir: str | Path | None = None,
               adapter_dir: str | Path | None = None, seeds: dict[str, int] | None = None) -> dict[str, Any]:
    """The ``provenance`` entry of metrics.json (see the module's doc)."""
    import torch

    from videollama import __version__

    config = model.config.to_dict()
    out: dict[str, Any] = {
        "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
        "model_dir": None if model_dir is None else {"path": str(model_dir), **directory_digest(model_dir)},
        "adapter": None if adapter_dir is None else {"path": str(adapter_dir), **directory_digest(adapter_dir)},
        "data": {"path": str(data_path), "sha256": file_sha256(data_path), "bytes": Path(data_path).stat().st_size},
        "preprocess": asdict(model.config.preprocess),
        "videollama": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git": git_commit(),
        "seeds": dict(seeds or {}),
    }
    return json.loads(json.dumps(out))  # as metrics.json will hold it (the spec's tuples as lists)


__all__ = ["directory_digest", "file_sha256", "git_commit", "provenance"]
