"""What a run records: RUN_DIR/metrics.jsonl, TensorBoard scalars, and the loss-spike detector."""

from __future__ import annotations

import json
import os
from collections import deque
from pathlib import Path


class MetricsLog:
    """RUN_DIR/metrics.jsonl (every step) and TensorBoard scalars, on rank 0 only."""

    TB_KEYS = ("loss", "lr", "grad_norm", "tokens_per_s", "clips_per_s", "mfu", "skipped", "bad_steps")

    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool, resume_step: int):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if self.path.exists():
            # Steps after the checkpoint were lost with the crash and will be logged again; so was a
            # line the crash cut short (and a run that never checkpointed starts its log over).
            # Rewritten through a temporary file: a second crash keeps one.
            kept = [ln for ln in self.path.read_text(errors="replace").splitlines() if _step(ln) < resume_step]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(ln + "\n" for ln in kept))
            os.replace(tmp, self.path)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key in self.TB_KEYS:
                if record.get(key) is not None:
                    self.tb.add_scalar(f"train/{key}", record[key], record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _step(line: str) -> float:
    """The step of a metrics line; infinity for a line that is not one (cut short by a crash)."""
    try:
        record = json.loads(line)
        return float(record["step"])
    except (ValueError, KeyError, TypeError):
        return float("inf")


class SpikeDetector:
    """Flags a loss far above the mean of the recent good steps (logged, not acted on)."""

    def __init__(self, factor: float, window: int):
        self.factor = factor
        self.recent: deque[float] = deque(maxlen=window)

    def check(self, loss: float) -> bool:
        full = len(self.recent) == self.recent.maxlen
        spike = full and loss > self.factor * (sum(self.recent) / len(self.recent))
        self.recent.append(loss)
        return spike


class ProgressBar:
    """The rank-0 progress bar: loss, LR and gradient norm every ``log.every`` steps; spikes and
    skipped updates as lines of their own."""

    def __init__(self, bar, cfg) -> None:
        self.bar, self.cfg = bar, cfg

    @classmethod
    def start(cls, cfg, rank: int, start_step: int) -> ProgressBar | None:
        if rank != 0 or not cfg.log.progress:
            return None
        from tqdm import tqdm

        return cls(tqdm(total=cfg.max_steps, initial=start_step, desc="train", dynamic_ncols=True), cfg)

    def report(self, record: dict) -> None:
        step, loss = record["step"], _nan_if_none(record["loss"])
        self.bar.update(1)
        if (step + 1) % self.cfg.log.every == 0:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}",
                                 gnorm=f"{_nan_if_none(record['grad_norm']):.2f}")
        if record["spike"]:
            self.bar.write(f"step {step}: loss spike {loss:.4f} (> {self.cfg.guards.spike_factor}x recent mean)")
        if record["bad_step"]:
            self.bar.write(f"step {step}: non-finite loss or gradient norm; update skipped")

    def close(self) -> None:
        self.bar.close()


def _nan_if_none(x: float | None) -> float:
    return float("nan") if x is None else x
