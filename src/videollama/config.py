"""Typed configuration for VideoLlama models, with named presets.

This module imports no torch on purpose: configs are read by the CLI, by recipes and by
tools that must not pay for (or even have) a torch import.

A model is fully described by :class:`VideoLlamaConfig`, saved as ``config.json`` next to
every model directory and checkpoint. The preprocessing spec (:class:`PreprocessConfig`)
is part of it, so training, evaluation and serving decode video identically.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from videollama.dataclass_io import build, set_dotted


def _positive(section: str, cfg: Any, *names: str, zero_ok: bool = False) -> None:
    for name in names:
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < (0 if zero_ok else 1e-12):
            raise ValueError(f"{section}.{name} must be {'>= 0' if zero_ok else '> 0'}, got {value!r}")


def _divides(section: str, a: str, av: int, b: str, bv: int) -> None:
    if av % bv:
        raise ValueError(f"{section}.{a} ({av}) is not divisible by {section}.{b} ({bv})")


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class PreprocessConfig:
    """How a video becomes the model's input tensor ``[F, 3, size, size]``.

    The reference recipe: 16 frames at 4 FPS (a 4 s window), 224x224, ImageNet mean/std.

    A whole video is a sequence of such windows (``videollama.data.windows``): they tile the video
    while it needs at most ``max_windows`` of them, and are spread evenly over it when it needs
    more. Every stage reads this one policy (curation, training, evaluation, serving).
    """

    num_frames: int = 16
    fps: float = 4.0
    size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    max_windows: int = 64

    @property
    def window_s(self) -> float:
        """Seconds one window spans: ``num_frames`` frames ``1 / fps`` apart."""
        return self.num_frames / self.fps

    def __post_init__(self) -> None:
        _positive("preprocess", self, "num_frames", "fps", "size", "max_windows")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"preprocess.mean and .std need 3 values each (std > 0), got {self.mean}, {self.std}")


@dataclass
class VisionConfig:
    """A CLIP-style ViT applied per frame, plus gated temporal aggregation.

    Parameter names follow Hugging Face CLIP so that import is a rename table.
    ``temporal_every``: a gated temporal-attention block after every k-th ViT block
    (0 disables temporal attention). ``frame_diff``: add a gated projection of the
    difference between consecutive frames' patch embeddings (a cheap motion signal).
    """

    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    max_frames: int = 16
    temporal_every: int = 1
    frame_diff: bool = False
    # Start value of the temporal and frame-difference gates. 0 (the default) makes a loaded
    # image ViT exact; a model trained from scratch learns faster with them open (tanh(1) = 0.76).
    gate_init: float = 0.0

    def __post_init__(self) -> None:
        _positive("vision", self, "image_size", "patch_size", "num_channels", "hidden_size", "num_layers",
                  "num_heads", "intermediate_size", "max_frames", "layer_norm_eps")
        _positive("vision", self, "temporal_every", zero_ok=True)
        _divides("vision", "image_size", self.image_size, "patch_size", self.patch_size)
        _divides("vision", "hidden_size", self.hidden_size, "num_heads", self.num_heads)
        if self.hidden_act not in ("quick_gelu", "gelu"):
            raise ValueError(f"vision.hidden_act must be quick_gelu or gelu, got {self.hidden_act!r}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class ResamplerConfig:
    """Perceiver resampler: frames x patches -> ``num_latents`` visual latents.

    ``num_latents: 0``: no resampling; the decoder cross-attends to every frame token (with a
    time embedding). Only for small inputs, where it makes a model trained from scratch learn
    which object is which far faster (the Shapes preset).
    """

    num_latents: int = 64
    depth: int = 2
    num_heads: int = 16
    head_dim: int = 64
    ff_mult: int = 4

    def __post_init__(self) -> None:
        _positive("resampler", self, "num_latents", "depth", zero_ok=True)
        _positive("resampler", self, "num_heads", "head_dim", "ff_mult")


@dataclass
class DecoderConfig:
    """Llama-style decoder with gated cross-attention to the visual latents.

    Parameter names follow Hugging Face Llama. A gated cross-attention block is inserted
    before every ``cross_attn_every``-th decoder layer (0 disables them).
    """

    vocab_size: int = 65536
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int | None = None
    intermediate_size: int = 11008
    max_seq_len: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # RoPE scaling, as Hugging Face's rope_parameters: "default" (none), "linear" (positions divided
    # by rope_factor) or "llama3" (Llama-3.1 and later: long wavelengths divided by rope_factor, short
    # ones kept, smooth in between; the band edges are rope_original_max_position_embeddings divided
    # by rope_low_freq_factor and rope_high_freq_factor). The other fields are unused by "default".
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    cross_attn_every: int = 4
    cross_attn_heads: int | None = None
    cross_attn_ff_mult: int = 4
    # Start value of the cross-attention tanh gates: 0 keeps a loaded language model exact; a
    # decoder trained from scratch with its encoder needs them open to pass the encoder any gradient.
    cross_attn_gate_init: float = 0.0
    # Periods (s) of the sines and cosines that stamp every visual latent with its absolute time
    # (model/resampler.py: MediaTime). Powers of ten: each decimal digit of a time is a phase, so
    # times never seen in training are still told apart; 10,000 s also orders times within 40 min.
    media_time_periods: tuple[float, ...] = (1.0, 10.0, 100.0, 1000.0, 10000.0)
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        _positive("decoder", self, "vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                  "max_seq_len", "rms_norm_eps", "rope_theta", "cross_attn_ff_mult")
        _positive("decoder", self, "cross_attn_every", zero_ok=True)
        _divides("decoder", "hidden_size", self.hidden_size, "num_heads", self.num_heads)
        if self.num_kv_heads is not None:
            _positive("decoder", self, "num_kv_heads")
            _divides("decoder", "num_heads", self.num_heads, "num_kv_heads", self.num_kv_heads)
        if self.cross_attn_heads is not None:
            _positive("decoder", self, "cross_attn_heads")
            _divides("decoder", "hidden_size", self.hidden_size, "cross_attn_heads", self.cross_attn_heads)
        if self.rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"decoder.rope_type must be default, linear or llama3, got {self.rope_type!r}")
        _positive("decoder", self, "rope_factor", "rope_original_max_position_embeddings")
        if self.rope_type == "llama3" and not self.rope_high_freq_factor > self.rope_low_freq_factor > 0:
            raise ValueError(f"decoder.rope_high_freq_factor ({self.rope_high_freq_factor}) must exceed "
                             f"rope_low_freq_factor ({self.rope_low_freq_factor}) > 0")
        if not self.media_time_periods or min(self.media_time_periods) <= 0:
            raise ValueError(f"decoder.media_time_periods must be positive seconds, got {self.media_time_periods}")
        if self.head_dim % 2:
            raise ValueError(f"decoder head_dim (hidden_size / num_heads = {self.head_dim}) must be even for rotary")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if not 0 <= value < self.vocab_size:
                raise ValueError(f"decoder.{name} {value} is outside the vocabulary [0, {self.vocab_size})")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads


@dataclass
class VideoLlamaConfig:
    name: str = "custom"
    vision: VisionConfig = field(default_factory=VisionConfig)
    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    initializer_range: float = 0.02

    # ---- serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VideoLlamaConfig:
        """Build from a dict (``config.json``); values are coerced to the field types, unknown keys refused."""
        return build(cls, d)

    def with_overrides(self, overrides: dict[str, Any]) -> VideoLlamaConfig:
        """A copy with dotted overrides applied, e.g. ``{"decoder.num_layers": 2}``."""
        d = self.to_dict()
        for key, value in overrides.items():
            set_dotted(d, key, value)
        return type(self).from_dict(d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> VideoLlamaConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        from videollama.data.errors import BadSample
        from videollama.data.safe_io import read_json_object

        try:  # bounded: a regular file of at most 1 MiB (never a FIFO or /dev/zero)
            return cls.from_dict(read_json_object(path, "model config"))
        except BadSample as e:  # its message names the file and says what it is
            raise ValueError(str(e)) from e
        except (OSError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: not a valid VideoLlama config: {e}") from e

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> VideoLlamaConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        cfg = cls.from_dict(PRESETS[name])
        return cfg.with_overrides(overrides) if overrides else cfg


def _preset(name: str, vision: VisionConfig, resampler: ResamplerConfig, decoder: DecoderConfig,
            preprocess: PreprocessConfig | None = None, initializer_range: float = 0.02) -> dict[str, Any]:
    cfg = VideoLlamaConfig(name=name, vision=vision, resampler=resampler, decoder=decoder,
                           preprocess=preprocess or PreprocessConfig(), initializer_range=initializer_range)
    return cfg.to_dict()


# Per-channel mean/std of Shapes training frames (0..1 RGB, 64x64, measured on 32 clips' frames).
SHAPES_MEAN = (0.189, 0.189, 0.183)
SHAPES_STD = (0.110, 0.106, 0.093)

# The tiny and small presets see the Shapes corpus (SHAPES.md) at 64x64 and 96x96.
_SHAPES_PRE = PreprocessConfig(num_frames=16, fps=4.0, size=64, max_windows=8)

PRESETS: dict[str, dict[str, Any]] = {
    # Tests and the CPU demo: under 1M parameters.
    "tiny": _preset(
        "tiny",
        VisionConfig(image_size=64, patch_size=8, hidden_size=64, num_layers=2, num_heads=4,
                     intermediate_size=128, max_frames=16, temporal_every=1, frame_diff=True),
        ResamplerConfig(num_latents=16, depth=1, num_heads=4, head_dim=16, ff_mult=2),
        DecoderConfig(vocab_size=1024, hidden_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=256, max_seq_len=128, cross_attn_every=1, cross_attn_ff_mult=2),
        _SHAPES_PRE,
    ),
    # The `make demo` model, trained from scratch on Shapes on a 2-core CPU; each choice below was
    # measured on the held-out split (bench/results/demo.md):
    # - 4 frames at 1 FPS span 3 s: half the encoder work of 8 at 2 FPS, and each step between
    #   frames moves an object 3-6 px, which the frame-difference branch sees plainly;
    # - pixels normalised with the Shapes corpus's own mean/std: with ImageNet's the dark uniform
    #   background is a large constant in every patch that the first Adam steps amplify until
    #   layer norm leaves no trace of the objects;
    # - gates start open: nothing pre-trained needs protecting, and a closed cross-attention gate
    #   passes no gradient to the encoder;
    # - no resampler (num_latents 0): the decoder reads all 4 x 65 frame tokens, so "the red
    #   square" is found by what it looks like; 16 learned latents mixed the objects up;
    # - initializer_range 0.1 (about 1/sqrt(width)): 0.02 is a 4096-wide model's scale; at width
    #   64 it leaves every attention map flat for hundreds of steps.
    "shapes": _preset(
        "shapes",
        VisionConfig(image_size=64, patch_size=8, hidden_size=64, num_layers=2, num_heads=4,
                     intermediate_size=128, max_frames=4, temporal_every=1, frame_diff=True, gate_init=1.0),
        ResamplerConfig(num_latents=0, depth=0, num_heads=4, head_dim=16, ff_mult=2),
        DecoderConfig(vocab_size=1024, hidden_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=256, max_seq_len=128, cross_attn_every=1, cross_attn_ff_mult=2,
                      cross_attn_gate_init=1.0),
        # 4 s windows: 160 of them tile a video of up to 10 min 40 s (Shapes-Long's longest is 10 min).
        PreprocessConfig(num_frames=4, fps=1.0, size=64, mean=SHAPES_MEAN, std=SHAPES_STD, max_windows=160),
        initializer_range=0.1,
    ),
    # CPU benchmarks: 20M-50M parameters.
    "small": _preset(
        "small",
        VisionConfig(image_size=96, patch_size=16, hidden_size=256, num_layers=6, num_heads=8,
                     intermediate_size=1024, max_frames=16, temporal_every=2),
        ResamplerConfig(num_latents=32, depth=2, num_heads=8, head_dim=32, ff_mult=4),
        DecoderConfig(vocab_size=8192, hidden_size=384, num_layers=8, num_heads=6, num_kv_heads=6,
                      intermediate_size=1024, max_seq_len=512, cross_attn_every=4),
        PreprocessConfig(num_frames=16, fps=4.0, size=96, max_windows=64),
    ),
    # One-GPU scale: about 1B parameters.
    "1b": _preset(
        "1b",
        VisionConfig(image_size=224, patch_size=14, hidden_size=768, num_layers=12, num_heads=12,
                     intermediate_size=3072, temporal_every=4),
        ResamplerConfig(num_latents=64, depth=2, num_heads=12, head_dim=64),
        DecoderConfig(vocab_size=65536, hidden_size=2048, num_layers=16, num_heads=16, num_kv_heads=8,
                      intermediate_size=5632, max_seq_len=2048, cross_attn_every=4),
        PreprocessConfig(max_windows=256),  # 17 minutes tiled
    ),
    # The reference model: 3.5B vision side + 9.5B decoder side = 13B.
    "videollama-13b": _preset(
        "videollama-13b",
        VisionConfig(image_size=224, patch_size=14, hidden_size=2560, num_layers=32, num_heads=32,
                     intermediate_size=10240, temporal_every=1),
        ResamplerConfig(num_latents=64, depth=2, num_heads=20, head_dim=128),
        DecoderConfig(vocab_size=65536, hidden_size=5120, num_layers=24, num_heads=40, num_kv_heads=40,
                      intermediate_size=14336, max_seq_len=2048, cross_attn_every=4, cross_attn_ff_mult=1),
        PreprocessConfig(max_windows=900),  # an hour tiled: 900 x 64 = 57,600 latents
    ),
}


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DecoderConfig",
    "PRESETS",
    "PreprocessConfig",
    "ResamplerConfig",
    "VideoLlamaConfig",
    "VisionConfig",
]
