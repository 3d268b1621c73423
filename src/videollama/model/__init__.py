"""Single-device VideoLlama model code, one file per component.

vision.py (ViT per frame + temporal aggregation), resampler.py (Perceiver resampler and gated
cross-attention), decoder.py (Llama blocks), videollama.py (the composed model, loss and model
directory format), generate.py (KV-cache generation and the ``generate`` command).
"""

from videollama.model.videollama import VideoLlama, VideoLlamaOutput, lm_loss

__all__ = ["VideoLlama", "VideoLlamaOutput", "lm_loss"]
