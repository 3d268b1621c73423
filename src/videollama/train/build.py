"""What a training run is built from: the model (from a preset, on the meta device, or from a
model directory), its allocation after sharding, the tokenizer and the data loader."""

from __future__ import annotations

from pathlib import Path

import torch

from videollama.config import VideoLlamaConfig
from videollama.train import checkpoint as ckpt
from videollama.train.distributed import DistEnv
from videollama.train.recipe import TrainConfig


def build_model(cfg: TrainConfig, *, meta: bool = False) -> tuple[torch.nn.Module, VideoLlamaConfig]:
    """The single-device model, identical on every rank (same seed or same weights).

    ``meta``: parameters on the meta device (no memory, no values); :func:`materialize`
    allocates and initialises them after sharding.
    """
    from videollama.model.videollama import VideoLlama

    if cfg.model.init_from:
        if cfg.model.overrides:
            raise ValueError("model.overrides cannot change a model loaded from model.init_from")
        model = VideoLlama.from_pretrained(cfg.model.init_from)
        return model, model.config
    model_cfg = VideoLlamaConfig.from_name(cfg.model.preset)
    if cfg.model.overrides:
        model_cfg = model_cfg.with_overrides(cfg.model.overrides)
    if meta:
        with torch.device("meta"):
            return VideoLlama(model_cfg), model_cfg
    torch.manual_seed(cfg.seed)
    return VideoLlama(model_cfg), model_cfg


def materialize(model: torch.nn.Module, device: torch.device, seed: int) -> None:
    """Allocate a meta-built (and possibly sharded) model on ``device`` and initialise it as the
    constructor would under ``torch.manual_seed(seed)``: the model's own ``init_weights``."""
    model.to_empty(device=device)
    model.tie_weights()
    torch.manual_seed(seed)
    model.init_weights()


def check_same_model(run_dir: Path, model_cfg: VideoLlamaConfig) -> None:
    """A run directory with checkpoints resumes only the model it was started with."""
    saved = run_dir / "model_config.json"
    if not ckpt.intact_checkpoints(run_dir) or not saved.exists():
        return
    before = VideoLlamaConfig.load(saved).to_dict()
    now = model_cfg.to_dict()
    if before != now:
        diff = sorted(k for k in before if before[k] != now.get(k))
        raise ValueError(f"{run_dir} holds checkpoints of another model (differs in {diff}); "
                         "use a new --run-dir, or the recipe that started this run")


def resolve_tokenizer(cfg: TrainConfig) -> str | None:
    if cfg.tokenizer:
        return cfg.tokenizer
    if cfg.model.init_from and (Path(cfg.model.init_from) / "tokenizer.json").exists():
        return str(Path(cfg.model.init_from) / "tokenizer.json")
    return None


def build_loader(cfg: TrainConfig, model_cfg: VideoLlamaConfig, env: DistEnv, tokenizer_path: str | None):
    if cfg.data.kind == "synthetic":
        from videollama.train.synthetic import SyntheticClips, SyntheticVideos

        common = dict(model_cfg=model_cfg, batch_size=cfg.micro_batch, seq_len=cfg.data.synthetic_seq_len,
                      seed=cfg.seed, rank=env.rank, world_size=env.world_size)
        if cfg.data.windows == "whole":
            return SyntheticVideos(window_budget=cfg.data.window_budget, **common)
        return SyntheticClips(**common)
    from videollama.data.loader import VideoTextLoader
    from videollama.data.tokenizer import load_tokenizer

    if tokenizer_path is None:
        raise ValueError("no tokenizer: set `tokenizer:` in the recipe or use model.init_from a model dir")
    return VideoTextLoader.from_section(cfg.data, tokenizer=load_tokenizer(tokenizer_path),
                                        preprocess=model_cfg.preprocess, batch_size=cfg.micro_batch,
                                        max_len=cfg.data.max_len or model_cfg.decoder.max_seq_len, seed=cfg.seed,
                                        rank=env.rank, world_size=env.world_size)
