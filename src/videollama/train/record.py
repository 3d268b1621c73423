"""What a run keeps of itself, and keeps true.

``RUN_DIR/train_config.json`` is the recipe the run's checkpoints were trained with. A rerun of a
run directory that holds checkpoints resumes them only with the same settings: a setting that
changes what is trained (the LR, the data, the schedule, ``max_steps``, ...) is refused, naming
each key with its recorded and its new value, before anything in the directory is written.
``--allow-config-change`` continues anyway, and then nothing is lost: the recorded recipe is kept
as ``train_config.until-step-N.json``, ``config_history.json`` lists each change with the step from
which it applies, and ``train_config.json`` holds the recipe of the steps from there on.
Operational settings (loader workers, logging, checkpoint cadence, guard timeouts) change what a
run does around its steps, not the steps, and may change freely.

``summary.json`` (end of run) is valid JSON: a value that is not a finite number is written as
``null``, never as ``NaN``. It counts the samples the loader skipped, by reason, over all ranks,
and lists the run's warnings (a learning rate that never reaches its peak, for one).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from videollama.train.schedule import lr_at

CONFIG_NAME = "train_config.json"
HISTORY_NAME = "config_history.json"
# Dotted keys (or prefixes ending in ".") that may change between a run's segments.
OPERATIONAL_KEYS = ("data.num_workers", "log.", "checkpoint.every", "checkpoint.keep", "checkpoint.at_end",
                    "guards.timeout_s", "guards.barrier_every")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and other values are leaves."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(before: dict[str, Any], after: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Every dotted key whose value differs (a key on one side only: None on the other), less the
    operational ones. Both sides are compared as JSON gives them back (tuples as lists)."""
    a, b = flatten(json_ready(before)), flatten(json_ready(after))
    changes = {}
    for key in sorted(set(a) | set(b)):
        if any(key == k or (k.endswith(".") and key.startswith(k)) for k in OPERATIONAL_KEYS):
            continue
        if a.get(key) != b.get(key):
            changes[key] = (a.get(key), b.get(key))
    return changes


def trained_step(run_dir: Path) -> int | None:
    """The step of the newest intact checkpoint of the run, or None when it has none."""
    from videollama.train.checkpoint import intact_checkpoints

    found = intact_checkpoints(run_dir)
    return int(found[0].name.split("-")[1]) if found else None


def keep_config(run_dir: Path, config: dict[str, Any], *, allow_change: bool, write: bool) -> dict | None:
    """Check ``config`` (a recipe's ``to_dict()``) against the run's record; with ``write``, record it.

    Raises ValueError, naming the differing keys, when the run holds checkpoints trained with other
    settings and ``allow_change`` is False. Returns the history entry of an allowed change, or None.
    """
    path = run_dir / CONFIG_NAME
    step = trained_step(run_dir)
    recorded = _read_recorded(path) if step is not None else None
    changes = config_changes(recorded, config) if recorded is not None else {}
    if changes and not allow_change:
        listed = "; ".join(f"{k}: {_show(old)} -> {_show(new)}" for k, (old, new) in changes.items())
        raise ValueError(f"{run_dir} holds checkpoints trained to step {step} with other settings ({listed}); "
                         f"rerun with the recorded ones ({path}), use a new --run-dir, or pass "
                         "--allow-config-change to continue with the new settings (both are kept)")
    entry = None
    if changes:
        kept = f"train_config.until-step-{step:08d}.json"
        entry = {"step": step, "previous": kept, "changes": {k: {"from": old, "to": new}
                                                             for k, (old, new) in changes.items()}}
    if write:
        if entry is not None:
            write_json(run_dir / entry["previous"], recorded)
            history = _read_history(run_dir / HISTORY_NAME)
            write_json(run_dir / HISTORY_NAME, [*history, entry])
        write_json(path, config)
    return entry


def schedule_warnings(*, peak_lr: float, warmup_steps: int, max_steps: int, min_lr: float) -> list[str]:
    """Why the recipe's learning rate will not do what it says: a warmup as long as the run."""
    if max_steps < 1 or warmup_steps < max_steps:
        return []
    reached = lr_at(max_steps - 1, peak_lr=peak_lr, warmup_steps=warmup_steps, max_steps=max_steps, min_lr=min_lr)
    return [f"schedule.warmup_steps ({warmup_steps}) >= max_steps ({max_steps}): the learning rate rises to "
            f"{reached:.3g} at most and never reaches optimizer.lr ({peak_lr:.3g}); lower schedule.warmup_steps "
            f"(e.g. schedule.warmup_steps={max(1, max_steps // 10)}) or raise max_steps"]


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    write_json(run_dir / "summary.json", summary)


def json_ready(value: Any) -> Any:
    """``value`` with every float that is not finite replaced by None and tuples made lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def write_json(path: Path, value: Any) -> None:
    """Strict JSON (``allow_nan=False`` after :func:`json_ready`), written whole or not at all."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(json_ready(value), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _read_recorded(path: Path) -> dict | None:
    from videollama.data.safe_io import read_json_object

    if not path.exists():
        return None  # a record deleted by hand cannot be checked against; the new one is written
    return read_json_object(path, "recorded training config")


def _read_history(path: Path) -> list:
    from videollama.data.safe_io import MAX_JSON_BYTES, parse_json, read_bounded

    if not path.exists():
        return []
    history = parse_json(read_bounded(path, 16 * MAX_JSON_BYTES, "config history"), str(path))
    if not isinstance(history, list):
        raise ValueError(f"{path}: not a list of config changes")
    return history


def _show(value: Any) -> str:
    return json.dumps(value)
