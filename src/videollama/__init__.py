"""VideoLlama: an open, end-to-end system for building video-language models."""

__version__ = "0.1.0"
