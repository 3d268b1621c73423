"""Which parameters train, and how: freezing by model part, AdamW parameter groups, the optimizer."""

from __future__ import annotations

import torch

from videollama.model.parts import part_of


def freeze(model: torch.nn.Module, parts: list[str]) -> int:
    """Turn off gradients of the named parts (videollama.model.parts.PARTS); returns the number frozen."""
    n = 0
    for name, p in model.named_parameters():
        if part_of(name) in parts:
            p.requires_grad_(False)
            n += p.numel()
    return n


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into decayed (matrices) and not decayed groups.

    No decay on: vectors and scalars (norm weights, biases, tanh gates, class/temporal
    embeddings) and embedding tables (token and position embeddings). Call it after FSDP:
    the optimizer must hold the sharded parameters that fully_shard put in place.
    """
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or id(p) in embedding_params else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, section) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` (``section``: the recipe's OptimizerSection)."""
    # fused: one kernel per parameter instead of a dozen elementwise ops, each of which costs a
    # DTensor dispatch on sharded parameters (supported on CPU and CUDA).
    return torch.optim.AdamW(param_groups(model, section.weight_decay), lr=section.lr, betas=section.betas,
                             eps=section.eps, fused=True)
