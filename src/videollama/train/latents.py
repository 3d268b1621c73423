"""A frozen encoder's latent cache: each distinct window goes through the vision side once.

With the whole vision side frozen (``freeze: [vision, temporal, resampler]``, ``data.latent_cache``)
a window's latents, ``model.window_latents(frames)``, are a pure function of its pixels and the
encoder's weights. The training step then takes them from here, computed under ``no_grad`` on a
miss, and runs only what comes after them with gradients: ``model.stamp`` (the time code),
``VideoLlama.gather_videos`` and the decoder with its cross-attention. Whole-video samples are
decoded at fixed times, so every epoch shows the same windows, and the still stretches of a
video repeat byte-identical windows: the encoder's cost follows the distinct windows.

* Key: a BLAKE2b digest of the window's float32 pixels (and shape), under a digest of the
  encoder's weights, names, configuration and compute precision (:func:`encoder_digest`), so a
  changed encoder never meets latents another one made.
* Memory: least recently used first out, bounded in bytes (``data.latent_cache_bytes``); the
  latents of the batch in hand are held until its step is done whatever the bound.
* Disk (``data.latent_cache_dir``): ``DIR/<encoder digest>/<key[:2]>/<key>.safetensors``, written
  under a temporary name and renamed; read back only when its size and shape are plausible.
  A resumed run starts with an empty memory tier and encodes again: the same function, though
  the last bits of a float may differ where the encoder sees other batches; with the disk tier it
  reads the very latents it used before, and continues bitwise.
* Ranks: under FSDP2 every encoder call all-gathers the encoder's shards, a collective each rank
  must join, and ranks miss different windows. So the ranks agree first (an all-reduce of the
  most calls any rank needs for this micro-batch) and a rank with fewer runs one-window calls
  whose output it drops. ``parallel.parallelize(encoder_outside_forward=True)`` registers
  ``window_latents`` as an FSDP forward method and shards the time code on its own, which is
  what makes these calls outside ``model.forward`` legal.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from videollama.model.parts import VISION_SIDE, part_of

# A stored latent larger than this is not read (13B: 64 latents x 2560 x 4 bytes = 655 KB per window).
MAX_LATENT_FILE_BYTES = 64 * 2**20
# Windows per encoder call on a miss: activations without gradients, freed after each call.
WINDOWS_PER_CALL = 32


def encoder_digest(model: torch.nn.Module, precision: str) -> str:
    """A digest of everything a window's latents depend on besides its pixels: the vision side's
    parameters and buffers (names, shapes, dtypes, values; full tensors under FSDP, a collective),
    its configuration and the compute precision."""
    h = hashlib.sha256()
    cfg = model.config
    h.update(json.dumps([asdict(cfg.vision), asdict(cfg.resampler), precision], sort_keys=True).encode())
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    for name, t in sorted(tensors, key=lambda item: item[0]):
        name = name.replace("_checkpoint_wrapped_module.", "")  # activation checkpointing's wrapper
        if part_of(name) not in VISION_SIDE:
            continue
        t = t.detach()
        if hasattr(t, "full_tensor"):  # an FSDP2 shard
            t = t.full_tensor()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def window_key(frames: torch.Tensor) -> str:
    """frames: [F, 3, S, S] -> the window's content key."""
    frames = frames.detach().cpu().contiguous()
    h = hashlib.blake2b(f"{tuple(frames.shape)}|{frames.dtype}|".encode(), digest_size=16)
    h.update(frames.numpy().tobytes())
    return h.hexdigest()


class LatentCache:
    """Window latents by content (module docstring). ``stats``: windows asked for, memory and disk
    hits, windows encoded and encoder calls, since the start."""

    def __init__(self, *, digest: str, max_bytes: int, directory: str | Path | None = None,
                 ranks: int = 1, windows_per_call: int = WINDOWS_PER_CALL):
        self.digest, self.max_bytes, self.ranks = digest, max_bytes, ranks
        self.directory = None if directory is None else Path(directory) / digest[:32]
        self.windows_per_call = windows_per_call
        self._memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self.stats = {"windows": 0, "memory_hits": 0, "disk_hits": 0, "encoded": 0, "encoder_calls": 0}

    def latents(self, model: torch.nn.Module, frames: torch.Tensor, device: torch.device) -> torch.Tensor:
        """frames: [N, F, 3, S, S] -> their latents [N, L, D_v] (no gradient), each distinct window
        encoded at most once; a collective under FSDP (every rank calls it once per micro-batch)."""
        keys = [window_key(w) for w in frames]
        found: dict[str, torch.Tensor] = {}
        missing: dict[str, int] = {}  # key -> the first row that shows it
        for i, key in enumerate(keys):
            if key not in found and key not in missing:
                hit = self._lookup(key, device)
                if hit is None:
                    missing[key] = i
                else:
                    found[key] = hit
        rows = list(missing.values())
        with torch.no_grad():
            for c in range(self._calls(len(rows), device)):
                part = rows[c * self.windows_per_call:(c + 1) * self.windows_per_call]
                out = model.window_latents(frames[part or [0]].to(device))  # [w, L, D_v]; a dummy when empty
                self.stats["encoder_calls"] += 1
                for row, latent in zip(part, out.detach()):
                    found[keys[row]] = latent.clone()  # not a view that keeps the whole chunk alive
                    self._store(keys[row], found[keys[row]])
        self.stats["windows"] += len(keys)
        self.stats["encoded"] += len(rows)
        return torch.stack([found[key] for key in keys])

    def _calls(self, misses: int, device: torch.device) -> int:
        """Encoder calls to make for ``misses`` windows: as many as the busiest rank needs."""
        calls = -(-misses // self.windows_per_call)
        if self.ranks == 1:
            return calls
        most = torch.tensor([calls], dtype=torch.int64, device=device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        return int(most)

    @property
    def bytes_held(self) -> int:
        """Bytes of latents kept in memory (at most ``max_bytes``)."""
        return self._bytes

    # ---- the two tiers -------------------------------------------------------------------
    def _lookup(self, key: str, device: torch.device) -> torch.Tensor | None:
        if key in self._memory:
            self._memory.move_to_end(key)
            self.stats["memory_hits"] += 1
            return self._memory[key]
        latent = self._read(key)
        if latent is None:
            return None
        self.stats["disk_hits"] += 1
        latent = latent.to(device)
        self._remember(key, latent)
        return latent

    def _store(self, key: str, latent: torch.Tensor) -> None:
        self._remember(key, latent)
        self._write(key, latent)

    def _remember(self, key: str, latent: torch.Tensor) -> None:
        size = latent.numel() * latent.element_size()
        if size > self.max_bytes:
            return
        self._memory[key] = latent
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, old = self._memory.popitem(last=False)
            self._bytes -= old.numel() * old.element_size()

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.safetensors"

    def _read(self, key: str) -> torch.Tensor | None:
        if self.directory is None:
            return None
        from safetensors.torch import load_file

        path = self._path(key)
        try:
            if path.stat().st_size > MAX_LATENT_FILE_BYTES:
                return None
            latent = load_file(str(path))["latents"]
        except Exception:  # noqa: BLE001 - absent, or damaged: encode it again
            return None
        return latent if latent.dim() == 2 else None

    def _write(self, key: str, latent: torch.Tensor) -> None:
        if self.directory is None:
            return
        from safetensors.torch import save_file

        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        save_file({"latents": latent.detach().cpu().contiguous()}, str(tmp))
        os.replace(tmp, path)

    def record(self) -> dict[str, float | int | None]:
        """Counts since this process started, for a metrics line: windows asked for, windows encoded,
        and the hit rate (windows not encoded / windows asked for)."""
        s = self.stats
        return {"latent_windows": s["windows"], "latent_encoded": s["encoded"],
                "latent_hit_rate": 1.0 - s["encoded"] / s["windows"] if s["windows"] else None}


def visual_inputs(model: torch.nn.Module, batch: dict, device: torch.device, cache: LatentCache) -> dict:
    """The keyword arguments that give ``model(input_ids, ...)`` the batch's videos from cached
    latents: ``visual_latents`` [V, W_max * L, D_v] (stamped with time, so the time code trains),
    ``visual_mask`` [V, W_max * L] or None, and ``video_index`` [R] or None. A batch with
    ``windows`` (whole videos) is gathered per video; a batch of clips is one window per video,
    at time 0, as ``model(video=...)`` takes it."""
    from videollama.model.videollama import VideoLlama

    video, windows, video_index = batch["video"], batch.get("windows"), batch.get("video_index")
    latents = cache.latents(model, video, device)  # [N, L, D_v], no gradient
    if windows is None:
        visual, mask = model.stamp(latents, model.clip_times(video).to(device)), None
    else:
        stamped = model.stamp(latents, windows["times"].to(device))
        visual, mask = VideoLlama.gather_videos(stamped, windows["video"].to(device))
    return {"visual_latents": visual, "visual_mask": mask,
            "video_index": video_index.to(device) if video_index is not None else None}


def build_latent_cache(cfg, model: torch.nn.Module, env, *, precision: str, sharded: bool) -> LatentCache | None:
    """The run's latent cache (None without ``data.latent_cache``), made after the weights are final
    (built, sharded, resumed): the digest reads them. ``sharded``: the model is FSDP-wrapped; then
    one encoder call runs first on every rank, so that FSDP initialises from the root module
    before the time code (sharded apart) is ever called on its own."""
    if not cfg.data.latent_cache:
        return None
    trained = [name for name, p in model.named_parameters()
               if p.requires_grad and part_of(name.replace("_checkpoint_wrapped_module.", "")) in VISION_SIDE]
    if trained:
        raise ValueError(f"data.latent_cache needs a frozen vision side, but {trained[:3]} would train")
    cache = LatentCache(digest=encoder_digest(model, precision), max_bytes=cfg.data.latent_cache_bytes,
                        directory=cfg.data.latent_cache_dir, ranks=env.world_size)
    if sharded:
        pre, size = model.config.preprocess, model.config.vision.image_size
        with torch.no_grad():
            model.window_latents(torch.zeros(1, pre.num_frames, 3, size, size, device=env.device))
    return cache
