"""``videollama plan``'s answer for one model and settings: :func:`settings_for` fills in and checks
the settings, :func:`plan` estimates the peak (:mod:`videollama.plan.estimate`), says whether it
fits, finds the largest micro-batch that does and, when it does not fit, what would help."""

from __future__ import annotations

from dataclasses import dataclass, field

from videollama.config import VideoLlamaConfig
from videollama.model.parts import BLOCK_TYPES, check_names
from videollama.plan.advice import notes_for, suggestions_for
from videollama.plan.estimate import Estimate, estimate, max_micro_batch
from videollama.plan.params import lora_table, param_table
from videollama.plan.settings import (
    LORA_R,
    MODES,
    PRECISIONS,
    TRAINING,
    WINDOWS_PER_CHUNK,
    GiB,
    Settings,
    usable_bytes,
    with_settings,
)


@dataclass
class Plan:
    model: str
    settings: Settings
    params: int
    estimate: Estimate
    fits: bool
    usable: int
    max_micro_batch: int
    suggestions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        s = self.settings
        return {"model": self.model, "mode": s.mode, "settings": {**s.__dict__, "checkpointing": list(s.checkpointing),
                                                                 "freeze": list(s.freeze), "fsdp": s.fsdp,
                                                                 "lora_targets": list(s.lora_targets),
                                                                 "lora_parts": list(s.lora_parts)},
                "params": self.params, "trainable_params": self.estimate.totals.get("trainable_params", 0), "peak_bytes": self.estimate.peak, "peak_gib": self.estimate.peak / GiB,
                "peak_phase": self.estimate.phase, "breakdown": self.estimate.at_peak, "totals": self.estimate.totals,
                "gpu_memory_gib": s.gpu_memory_gib, "usable_bytes": self.usable, "fits": self.fits,
                "max_micro_batch": self.max_micro_batch, "suggestions": self.suggestions, "notes": self.notes}


def plan(config: VideoLlamaConfig, s: Settings, *, model_name: str | None = None) -> Plan:
    """Estimate, fit, the largest micro-batch, and what to change when it does not fit."""
    est = estimate(config, s)
    usable = usable_bytes(s)
    fits = est.peak <= usable
    p = Plan(model=model_name or config.name, settings=s, params=sum(k for _, _, k in param_table(config)),
             estimate=est, fits=fits, usable=usable, max_micro_batch=max_micro_batch(config, s))
    p.notes = notes_for(config, s)
    if not fits:
        p.suggestions = suggestions_for(config, s, est)
    return p


def settings_for(config: VideoLlamaConfig, **kw) -> Settings:
    """Settings with the defaults of ``config`` filled in and every value checked (ValueError)."""
    d, v = config.decoder, config.vision
    mode = kw.get("mode") or "train"
    if mode not in MODES:
        raise ValueError(f"--mode must be one of {', '.join(MODES)}, not {mode!r}")
    new = kw.get("new_tokens")
    new = 32 if new is None else new
    frames = _value(kw, "frames", config.preprocess.num_frames)
    default_tokens = d.max_seq_len if mode in TRAINING else max(1, d.max_seq_len - new)
    lora = mode in ("lora", "qlora")
    from videollama.train.recipe import LoraSection

    defaults = LoraSection()
    s = Settings(mode=mode, gpus=_value(kw, "gpus", 1), gpu_memory_gib=_value(kw, "gpu_memory_gib", 80.0),
                 frames=frames, tokens=_value(kw, "tokens", default_tokens), new_tokens=new,
                 micro_batch=_value(kw, "micro_batch", 1), precision=kw.get("precision") or "bf16",
                 checkpointing=tuple(kw.get("checkpointing") or ()), freeze=tuple(kw.get("freeze") or ()),
                 texts_per_clip=_value(kw, "texts_per_clip", 1),
                 lora_r=_value(kw, "lora_r", LORA_R) if lora else 0,
                 lora_dropout=float(_value(kw, "lora_dropout", defaults.dropout)) if lora else 0.0,
                 lora_targets=tuple(_value(kw, "lora_targets", defaults.target_modules)) if lora else (),
                 lora_parts=tuple(_value(kw, "lora_parts", defaults.parts)) if lora else (),
                 windows_per_chunk=_value(kw, "windows_per_chunk", WINDOWS_PER_CHUNK),
                 gpus_per_node=kw.get("gpus_per_node"), accumulation=_accumulation(kw))
    for name, value in (("--gpus", s.gpus), ("--micro-batch", s.micro_batch), ("--frames", s.frames),
                        ("--seq", s.tokens), ("--new-tokens", s.new_tokens), ("texts_per_clip", s.texts_per_clip),
                        ("--windows-per-chunk", s.windows_per_chunk)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    per_node = s.gpus_per_node
    if per_node is not None and (isinstance(per_node, bool) or not isinstance(per_node, int) or per_node < 1
                                 or (s.gpus > per_node and s.gpus % per_node)):
        raise ValueError(f"--gpus-per-node must be an integer >= 1 that divides --gpus {s.gpus}, got {per_node!r}")
    if not s.gpu_memory_gib > 0:
        raise ValueError(f"--gpu-memory must be > 0 GiB, got {s.gpu_memory_gib!r}")
    if s.precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, not {s.precision!r}")
    check_names(list(s.checkpointing), BLOCK_TYPES, "--activation-checkpointing", "block kinds")
    if s.frames > v.max_frames:
        raise ValueError(f"--frames {s.frames}: the model takes 1 to {v.max_frames} frames (vision.max_frames)")
    if lora:
        if isinstance(s.lora_r, bool) or not isinstance(s.lora_r, int) or s.lora_r < 1:
            raise ValueError(f"--lora-r must be an integer >= 1, got {s.lora_r!r}")
        if not 0.0 <= s.lora_dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {s.lora_dropout!r}")
        if s.freeze:
            raise ValueError("freeze does not apply to --mode lora/qlora: every base weight is frozen")
        lora_table(config, s)   # train.lora.target_modules' own errors: no match, a tied embedding/lm_head
    if mode == "qlora" and s.gpus != 1:
        raise ValueError(f"--mode qlora runs on one GPU in one process without FSDP (train/loop.py), not --gpus {s.gpus}")
    if mode in TRAINING and s.tokens < 2:
        raise ValueError("--seq must be >= 2 for training (the loss predicts token t+1 from token t)")
    if s.tokens + (s.new_tokens if mode == "infer" else 0) > d.max_seq_len:
        extra = f" + {s.new_tokens} new tokens" if mode == "infer" else ""
        raise ValueError(f"--seq {s.tokens}{extra} is longer than the model's max_seq_len {d.max_seq_len}")
    return _whole_video(config, s, kw.get("video_seconds"))


def _whole_video(config: VideoLlamaConfig, s: Settings, seconds) -> Settings:
    """``s`` with the windows the model's policy (``data.windows.window_starts``) takes from a video of
    ``seconds`` (None: none; a clip per prompt), each window ``s.frames`` frames at the model's fps."""
    if seconds is None:
        return s
    from videollama.data.container import MAX_DURATION_S

    if s.mode != "infer":
        raise ValueError(f"--video-seconds plans generation with a whole video: it needs --mode infer, not {s.mode}")
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds <= MAX_DURATION_S:
        raise ValueError(f"--video-seconds must be > 0 and at most {MAX_DURATION_S:.0f} (24 hours), got {seconds!r}")
    from videollama.data.windows import window_starts

    pre = config.preprocess
    windows = len(window_starts(float(seconds), s.frames / pre.fps, pre.max_windows))
    return with_settings(s, windows=windows, video_seconds=float(seconds))


def _accumulation(kw: dict) -> int:
    """Micro-batches per optimizer step: a global batch's (recipe.TrainConfig.accumulation), else 1."""
    batch = kw.get("global_batch")
    per_pass = _value(kw, "micro_batch", 1) * _value(kw, "gpus", 1)
    if batch is None or not isinstance(per_pass, int) or per_pass < 1:
        return 1
    return max(1, -(-batch // per_pass))


def _value(kw: dict, key: str, default):
    return default if kw.get(key) is None else kw[key]
