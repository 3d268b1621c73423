"""``videollama plot RUN_DIR``: RUN_DIR/curves.png with the loss and LR curves of a run.

Reads RUN_DIR/metrics.jsonl (one JSON object per step, written by the training loop).
Skipped (non-finite) steps have no loss and leave a gap. matplotlib is imported lazily:
it is an optional dependency (`pip install videollama[plot]`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise ValueError(f"{path}: no such file (is {run_dir} a training run directory?)")
    from videollama.data.safe_io import iter_lines

    records = []
    for n, line in iter_lines(path):  # a regular file, each line bounded
        if isinstance(line, ValueError):
            raise line
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON: {e}") from e
    if not records:
        raise ValueError(f"{path}: no steps logged yet")
    return records


def plot(run_dir: str | Path, out: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    steps = [r["step"] for r in records]
    loss = [r["loss"] if r.get("loss") is not None else float("nan") for r in records]
    lr = [r["lr"] for r in records]
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ax_loss.plot(steps, loss, lw=1)
    ax_loss.set_ylabel("loss")
    ax_loss.set_title(str(Path(run_dir).name))
    ax_loss.grid(alpha=0.3)
    ax_lr.plot(steps, lr, lw=1, color="tab:orange")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="training run directory (with metrics.jsonl)")
    parser.add_argument("--out", help="image to write (default RUN_DIR/curves.png)")


def run(args: argparse.Namespace) -> int:
    out = plot(args.run_dir, args.out)  # a ValueError is one line from the command line
    print(f"wrote {out}")
    return 0
