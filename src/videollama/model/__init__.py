"""Single-device VideoLlama model code, one file per component: the network and its weight format.

layers.py (RMSNorm, SwiGLU, rotary), parts.py (which part a parameter belongs to, the blocks of
each kind, Hugging Face prefixes), vision.py (ViT per frame + temporal aggregation), resampler.py
(Perceiver resampler and gated cross-attention), decoder.py (Llama blocks, the static KV cache,
the media the cross-attention blocks read), videollama.py (the composed model, init_weights, loss
and model directory format). Generation lives in ``videollama.inference``, the memory planner in
``videollama.plan``.

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
