"""VideoLlama: an open, end-to-end system for building video-language models.

The public API, imported lazily so that ``import videollama`` stays cheap (no torch, no PyAV)::

    from videollama import VideoLlama, VideoLlamaConfig, encode_whole_video, generate, load_clip, load_tokenizer
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "VideoLlama": "videollama.model.videollama",
    "VideoLlamaConfig": "videollama.config",
    "PreprocessConfig": "videollama.config",
    "generate": "videollama.inference.generate",
    "encode_whole_video": "videollama.inference.whole_video",
    "load_clip": "videollama.data.video",
    "load_tokenizer": "videollama.data.tokenizer",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'videollama' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = sorted(_EXPORTS)
