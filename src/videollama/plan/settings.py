"""What a plan is asked about: :class:`Settings` (mode, devices, sizes, precision, checkpointing,
LoRA) and the constants every planner module shares. Imports nothing of the planner's own."""

from __future__ import annotations

from dataclasses import dataclass

GiB = 2**30
MODES = ("train", "lora", "qlora", "infer")
TRAINING = ("train", "lora", "qlora")
LORA_R = 16       # --mode lora without a recipe: configs/lora-videoqa.yaml's rank
PRECISIONS = ("bf16", "fp32")
USABLE = 0.9   # of a device's memory: the rest for the CUDA context and the caching allocator's fragmentation
WINDOWS_PER_CHUNK = 8   # windows decoded and encoded at a time: data.windows.WholeVideo.chunks' default


@dataclass(frozen=True)
class Settings:
    mode: str = "train"
    gpus: int = 1
    gpu_memory_gib: float = 80.0
    frames: int = 16
    tokens: int = 2048          # train: tokens per row; infer: prompt tokens
    new_tokens: int = 32        # infer only
    micro_batch: int = 1        # train: clips per micro-batch; infer: prompts
    precision: str = "bf16"
    checkpointing: tuple[str, ...] = ()
    freeze: tuple[str, ...] = ()
    texts_per_clip: int = 1     # train: text rows per clip
    lora_r: int = 0             # lora/qlora: the adapters' rank
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ()   # recipe.LoraSection.target_modules
    lora_parts: tuple[str, ...] = ()     # recipe.LoraSection.parts
    gpus_per_node: int | None = None     # None: every GPU in one node
    accumulation: int = 1       # train: micro-batches per optimizer step
    # infer, a whole video per prompt (--video-seconds): its windows under the model's policy, decoded
    # and encoded windows_per_chunk at a time; windows 0: one clip per prompt, given as frames
    windows: int = 0
    windows_per_chunk: int = WINDOWS_PER_CHUNK
    video_seconds: float = 0.0

    @property
    def fsdp(self) -> bool:
        return self.mode in ("train", "lora") and (self.gpus > 1 or self.precision == "bf16")

    @property
    def shard(self) -> int:
        """Ranks a parameter is sharded over: train/parallel.py shards inside a node, replicates across nodes."""
        if not self.fsdp:
            return 1
        return min(self.gpus, self.gpus_per_node or self.gpus)

    @property
    def whole_video(self) -> bool:
        return self.mode == "infer" and self.windows > 0

    @property
    def lora(self) -> bool:
        return self.mode in ("lora", "qlora")


def with_settings(s: Settings, **changes) -> Settings:
    """``s`` with ``changes`` (field=value) applied, unchecked."""
    return Settings(**{**s.__dict__, **changes})


def usable_bytes(s: Settings) -> int:
    """The bytes of one device a plan may use: USABLE of its memory."""
    return int(s.gpu_memory_gib * GiB * USABLE)
