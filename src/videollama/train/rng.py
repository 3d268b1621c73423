"""Random-number state of a rank: seeded at the start, saved with every checkpoint (as JSON:
nothing in a checkpoint is ever unpickled), restored on resume."""

from __future__ import annotations

import base64
import random

import numpy as np
import torch


def seed_everything(seed: int, rank: int) -> None:
    # Ranks draw different numbers (dropout, augmentation) but reproducibly.
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def _bytes_of(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _tensor_of(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def rng_state() -> dict:
    """Python, torch (and CUDA) and numpy generator states, JSON-serialisable."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss], "torch": _bytes_of(torch.get_rng_state()),
             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available():
        state["cuda"] = _bytes_of(torch.cuda.get_rng_state().cpu())
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    torch.set_rng_state(_tensor_of(state["torch"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((str(name), np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_tensor_of(state["cuda"]))
