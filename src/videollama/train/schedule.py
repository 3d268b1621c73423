"""Learning-rate schedule: linear warmup, then cosine decay to a floor.

``lr_at`` is a pure function of the optimizer step, so tests (and plots) can compute the
schedule without building an optimizer; ``build_scheduler`` wires the same function into
``torch.optim.lr_scheduler.LambdaLR``.

Convention: step ``s`` is the index (from 0) of the optimizer update about to be taken.
Warmup ends at ``s = warmup_steps`` with the peak LR, and the cosine reaches ``min_lr``
at ``s = max_steps`` (the first step that is never taken), so the last update uses a value
just above ``min_lr``.
"""

from __future__ import annotations

import math


def lr_at(step: int, *, peak_lr: float, warmup_steps: int, max_steps: int, min_lr: float) -> float:
    """The learning rate of optimizer step ``step`` (0-based)."""
    if step < warmup_steps:
        # (s + 1) / warmup: step 0 already learns (a zero LR would waste a step of data).
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer, *, peak_lr: float, warmup_steps: int, max_steps: int, min_lr: float):
    """A LambdaLR whose LR at scheduler step ``s`` is ``lr_at(s)``.

    Every param group's ``lr`` must be ``peak_lr``: LambdaLR multiplies the group's initial
    LR by the lambda, which is therefore ``lr_at(s) / peak_lr``.
    """
    from torch.optim.lr_scheduler import LambdaLR

    for group in optimizer.param_groups:
        if group["lr"] != peak_lr:
            raise ValueError(f"param group lr {group['lr']} != peak_lr {peak_lr}")

    def factor(step: int) -> float:
        return lr_at(step, peak_lr=peak_lr, warmup_steps=warmup_steps, max_steps=max_steps,
                     min_lr=min_lr) / peak_lr

    return LambdaLR(optimizer, factor)
