"""Training recipes: a typed :class:`TrainConfig` read from YAML, with command-line overrides.

This module imports no torch, so recipes can be read, validated and printed anywhere.

A recipe is one YAML file under ``configs/``; any field can be overridden from the command
line as ``key.sub=value``, the value parsed as YAML (``optimizer.lr=1e-4``,
``freeze=[vision]``). Pre-training and fine-tuning are the same loop and differ by recipe
only: a fine-tuning recipe sets ``model.init_from`` to a model directory, a lower LR, and a
data task whose labels cover the answer or caption tokens only.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from videollama.data.read_policy import (
    DEFAULT_MAX_DECODED_FRAMES,
    DEFAULT_TIME_BUDGET_S,
    DEFAULT_WHOLE_VIDEO_BUDGET_S,
    ReadPolicy,
)
from videollama.data.tokenizer import TASKS
from videollama.dataclass_io import build, parse_override, set_dotted
from videollama.model.parts import BLOCK_TYPES, PARTS, VISION_SIDE, check_names


@dataclass
class ModelSection:
    """Which model to train: a preset built from scratch, or a model directory to start from."""

    preset: str | None = "tiny"
    init_from: str | None = None  # a model directory (config.json + model.safetensors)
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted VideoLlamaConfig keys


WINDOW_MODES = ("clip", "whole")  # data.windows


@dataclass
class DataSection:
    """Where batches come from.

    ``kind: webdataset``: ``sources`` are shard folders/globs or an evaluation-set JSONL
    file, read by ``videollama.data.loader.VideoTextLoader``. ``kind: synthetic``:
    random clips and token ids generated from (seed, sample index), for smoke tests and
    throughput benchmarks; no files are read.
    """

    kind: str = "webdataset"
    sources: list[str] = field(default_factory=list)
    task: str = "caption"  # caption | videoqa | caption+videoqa
    # Texts of a clip trained on per step, all through one pass of the video encoder: 1 (one
    # random text), k, or 0 (every one: the caption and all questions).
    texts_per_clip: int = 1
    num_workers: int = 0
    skip_budget: float = 0.01
    max_len: int | None = None  # default: the decoder's max_seq_len
    allow_outside_root: bool = False  # JSONL video paths may leave the JSONL's folder (off: refused)
    cache_dir: str | None = None  # decode each video once, keep uint8 frames here (data.clip_cache.cached_clip)
    synthetic_seq_len: int = 32  # kind: synthetic only
    # What a sample's video becomes. clip: one window (a random start in training), as the model
    # was first trained; whole: every window of the video under the model's sampling policy
    # (preprocess.max_windows; videollama.data.windows), with its times.
    windows: str = "clip"
    # whole: at most this many windows per micro-batch (and at most micro_batch videos), so long
    # and short videos mix; a video with more windows than this is skipped and counted
    # (reason over_window_budget). 0: the model's max_windows (no video is ever over it).
    window_budget: int = 0
    # With the whole vision side frozen (freeze: [vision, temporal, resampler]): compute each
    # distinct window's latents once (train/latents.py) and train what comes after them.
    latent_cache: bool = False
    latent_cache_bytes: int = 2**30  # in memory, least recently used evicted first
    latent_cache_dir: str | None = None  # also keep them on disk here (later runs of the same encoder)
    # What one sample may cost to decode (data.read_policy.ReadPolicy): wall clock and frames per
    # clip, wall clock per whole video; a sample over them is skipped as a timeout and counted.
    clip_time_budget_s: float = DEFAULT_TIME_BUDGET_S
    max_decoded_frames: int = DEFAULT_MAX_DECODED_FRAMES
    video_time_budget_s: float = DEFAULT_WHOLE_VIDEO_BUDGET_S

    def read_policy(self) -> ReadPolicy:
        """The one object every reader of this run gets: roots and decode bounds."""
        return ReadPolicy(allow_outside_root=self.allow_outside_root, clip_time_budget_s=self.clip_time_budget_s,
                          max_decoded_frames=self.max_decoded_frames, video_time_budget_s=self.video_time_budget_s)


@dataclass
class OptimizerSection:
    """AdamW. Weight decay applies to matrices only: never to norms, biases, tanh gates or
    embedding tables (the usual Llama/GPT recipe; decaying a gate towards 0 would fight
    the gradient that opens it)."""

    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1


@dataclass
class ScheduleSection:
    warmup_steps: int = 1000
    min_lr: float = 1e-6
    # Set: the warmup is this share of max_steps (at least 1 step) and warmup_steps is ignored, so a
    # short first try (--max-steps 20) reaches the peak LR as a long run does.
    warmup_fraction: float | None = None

    def warmup_for(self, max_steps: int) -> int:
        """The warmup steps of a run of ``max_steps`` steps."""
        if self.warmup_fraction is None:
            return self.warmup_steps
        return max(1, round(self.warmup_fraction * max_steps))


@dataclass
class ParallelSection:
    """Applied to the finished model in this order: activation checkpointing, compile, FSDP2."""

    activation_checkpointing: list[str] = field(default_factory=list)  # block kinds (model.parts.BLOCK_TYPES)
    compile: bool = False
    reshard_after_forward: bool = True
    # Build on the meta device, shard, then allocate only this rank's shards and initialise
    # them (a 13B model never exists whole in any process). null: on for GPU runs from a preset.
    meta_init: bool | None = None
    # FSDP2 on a single rank only copies tensors around (3-13% of a CPU step, small preset): null shards
    # when there is more than one rank; true forces it (the same code path at every scale).
    fsdp: bool | None = None


# Every projection of the Llama blocks and the cross-attention blocks (Hugging Face's names).
LORA_DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_QUANTIZE = ("none", "nf4")


@dataclass
class LoraSection:
    """LoRA through peft (``videollama.train.lora``): every base weight frozen, a low-rank update
    ``W + (alpha / r) B A`` trained on the chosen linear layers. ``r: 0`` turns it off.

    ``target_modules``: a bare name (``q_proj``) picks every linear layer of that name in the
    ``parts`` listed; a name with a dot or a wildcard is a pattern over the full module name
    (``decoder.cross_attn_layers.*.attn.q_proj``, ``vision.encoder.layers.*``), fnmatch-style.
    ``quantize: nf4`` is QLoRA: the frozen base weights in 4-bit NF4 through bitsandbytes
    (a CUDA GPU, one process)."""

    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(LORA_DEFAULT_TARGETS))
    parts: list[str] = field(default_factory=lambda: ["decoder", "cross_attn"])  # model.parts.PARTS
    quantize: str = "none"  # none | nf4 (QLoRA)


@dataclass
class CheckpointSection:
    every: int = 0  # steps between checkpoints; 0: only at the end and on SIGTERM
    keep: int = 3  # keep the last K checkpoints
    at_end: bool = True


@dataclass
class GuardSection:
    """Protection against bad steps and hung ranks."""

    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    spike_factor: float = 3.0  # a loss above factor x the recent mean is logged as a spike
    spike_window: int = 20
    timeout_s: float = 1800.0  # collective timeout; a monitored barrier names the late rank
    barrier_every: int = 100  # a monitored barrier every k steps, after data loading (0: only at checkpoints)
    # Test hooks, on rank `inject_rank` only: a NaN loss at these steps (a poisoned batch), and
    # a sleep of `inject_hang_s` before these steps' first collective (a stuck data loader).
    inject_rank: int = 0
    inject_nan_steps: list[int] = field(default_factory=list)
    inject_hang_steps: list[int] = field(default_factory=list)
    inject_hang_s: float = 0.0


@dataclass
class LogSection:
    every: int = 1  # metrics.jsonl gets every step; the progress bar/TensorBoard every k
    tensorboard: bool = True
    progress: bool = True
    peak_flops: float = 0.0  # per device, for MFU; 0: MFU not reported


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    tokenizer: str | None = None  # tokenizer.json; default: the init_from model dir's
    data: DataSection = field(default_factory=DataSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    global_batch: int = 8  # clips per optimizer step, over all ranks
    micro_batch: int = 8  # clips per forward pass on one rank
    max_steps: int = 100
    clip_grad: float = 1.0
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    freeze: list[str] = field(default_factory=list)  # parts (videollama.model.parts.PARTS)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    lora: LoraSection = field(default_factory=LoraSection)  # r 0: off (full fine-tuning)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    guards: GuardSection = field(default_factory=GuardSection)
    log: LogSection = field(default_factory=LogSection)
    seed: int = 0
    deterministic: bool = False

    # ---- derived ------------------------------------------------------------------------
    def accumulation(self, world_size: int) -> int:
        """Micro-batches per optimizer step: global = micro * world * accumulation."""
        per_pass = self.micro_batch * world_size
        if self.global_batch % per_pass:
            raise ValueError(
                f"global_batch {self.global_batch} is not divisible by micro_batch {self.micro_batch} "
                f"x world size {world_size} = {per_pass}")
        return self.global_batch // per_pass

    def validate(self) -> None:
        if self.model.preset is None and self.model.init_from is None:
            raise ValueError("model: set preset or init_from")
        check_names(self.freeze, PARTS, "freeze", "parts")
        check_names(self.parallel.activation_checkpointing, BLOCK_TYPES, "parallel.activation_checkpointing")
        self._validate_lora()
        if self.data.kind not in ("webdataset", "synthetic"):
            raise ValueError(f"data.kind must be webdataset or synthetic, not {self.data.kind!r}")
        if self.data.kind == "webdataset" and not self.data.sources:
            raise ValueError("data.sources is empty (give shard folders/globs or a JSONL file, or --data)")
        if self.data.task not in TASKS:
            raise ValueError(f"data.task must be one of {', '.join(TASKS)}, not {self.data.task!r}")
        if self.data.texts_per_clip < 0:
            raise ValueError(f"data.texts_per_clip must be >= 0 (0: every text of a clip), not {self.data.texts_per_clip}")
        try:
            self.data.read_policy()
        except ValueError as e:
            raise ValueError(str(e).replace("read policy: ", "data.")) from None
        self._validate_windows()
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, not {self.precision!r}")
        if self.micro_batch < 1 or self.global_batch < 1 or self.max_steps < 0:
            raise ValueError("micro_batch and global_batch must be >= 1, max_steps >= 0")
        if self.schedule.warmup_steps < 0 or self.checkpoint.keep < 1:
            raise ValueError("schedule.warmup_steps must be >= 0 and checkpoint.keep >= 1")
        fraction = self.schedule.warmup_fraction
        if fraction is not None and not 0.0 <= fraction < 1.0:
            raise ValueError(f"schedule.warmup_fraction must be in [0, 1) (null: warmup_steps), not {fraction}")

    def _validate_windows(self) -> None:
        data = self.data
        if data.windows not in WINDOW_MODES:
            raise ValueError(f"data.windows must be one of {', '.join(WINDOW_MODES)}, not {data.windows!r}")
        if data.window_budget < 0:
            raise ValueError(f"data.window_budget must be >= 0 (0: the model's max_windows), not {data.window_budget}")
        if data.latent_cache_dir is not None and not data.latent_cache:
            raise ValueError("data.latent_cache_dir is set but data.latent_cache is false")
        if not data.latent_cache:
            return
        if data.latent_cache_bytes < 0:
            raise ValueError(f"data.latent_cache_bytes must be >= 0, not {data.latent_cache_bytes}")
        trained = [part for part in VISION_SIDE if part not in self.freeze]
        if trained or self.lora.r:
            # Cached latents are only right while the encoder that made them stays as it was.
            why = f"{trained} would train" if trained else "LoRA may adapt the vision side"
            raise ValueError(f"data.latent_cache needs the whole vision side frozen (freeze: {list(VISION_SIDE)}, "
                             f"lora.r 0): {why}")

    def _validate_lora(self) -> None:
        lora = self.lora
        if lora.r < 0 or lora.alpha <= 0 or not 0.0 <= lora.dropout < 1.0:
            raise ValueError(f"lora: need r >= 0 (0: off), alpha > 0 and 0 <= dropout < 1, "
                             f"not r={lora.r}, alpha={lora.alpha}, dropout={lora.dropout}")
        check_names(lora.parts, PARTS, "lora.parts", "parts")
        if lora.quantize not in LORA_QUANTIZE:
            raise ValueError(f"lora.quantize must be one of {', '.join(LORA_QUANTIZE)}, not {lora.quantize!r}")
        if lora.r and not lora.target_modules:
            raise ValueError("lora.target_modules is empty: name the linear layers to adapt (e.g. [q_proj, v_proj])")
        if lora.quantize != "none" and not lora.r:
            raise ValueError(f"lora.quantize {lora.quantize} (QLoRA) needs lora.r > 0")

    # ---- (de)serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, where: str = "config") -> TrainConfig:
        cfg = build(cls, d, where)
        cfg.validate()
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
        """Read a recipe and apply ``key.sub=value`` overrides (values parsed as YAML)."""
        from videollama.data.errors import BadSample
        from videollama.data.safe_io import read_yaml_object

        path = Path(path)
        try:  # bounded: a regular file of at most 1 MiB (never a FIFO or /dev/zero)
            d = read_yaml_object(path, "recipe")
        except (OSError, BadSample, ValueError) as e:
            why = str(e).removeprefix(f"{path}: ")  # named once, below
            raise ValueError(f"{path}: cannot read recipe: {why}") from e
        for item in overrides or []:
            apply_override(d, item)
        try:
            return cls.from_dict(d, where="")
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from e

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        from videollama.data.safe_io import read_json_object

        return cls.from_dict(read_json_object(path, "training config"), where=str(path))


def apply_override(d: dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=value`` to a recipe dict, in place. Inside ``model.overrides`` (a
    free-form dict of VideoLlamaConfig keys) the rest of the path stays one dotted key:
    ``model.overrides.decoder.num_layers=2``."""
    key, value = parse_override(item)
    set_dotted(d, key, value, opaque=("model.overrides",))
