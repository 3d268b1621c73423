"""Single-device VideoLlama model code, one file per component.

layers.py (RMSNorm, SwiGLU, rotary), parts.py (which part a parameter belongs to, the blocks of
each kind, Hugging Face prefixes), vision.py (ViT per frame + temporal aggregation), resampler.py
(Perceiver resampler and gated cross-attention), decoder.py (Llama blocks), videollama.py (the
composed model, init_weights, loss and model directory format), generate.py (KV-cache generation
and the ``generate`` command).

Attributes are imported lazily: ``videollama.model.parts`` is read by torch-free code (recipes).
"""

from __future__ import annotations

_EXPORTS = {"VideoLlama", "VideoLlamaOutput", "lm_loss"}


def __getattr__(name: str):
    if name in _EXPORTS:
        from videollama.model import videollama

        return getattr(videollama, name)
    raise AttributeError(f"module 'videollama.model' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
