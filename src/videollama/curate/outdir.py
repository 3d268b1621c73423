"""Where a curate run writes, and what it may replace: the ``--out`` rule of ``data shards``.

``OUT`` is written only when it is

* missing or empty: a new run, written in place;
* a curate output of the same run (``OUT/.work/run.json``: the same input and settings): the run
  resumes there, reusing every completion record (``pipeline.py``), exactly as before;
* a curate output of another run, with ``--overwrite``: the new run is written beside it, in
  ``.OUT.curate-new`` (resumed there after a crash by the same command), and swapped in whole
  only when complete, so a failure never loses the previous output.

Anything else is refused before any work: a non-empty folder that is not a curate output (even
with ``--overwrite``: it replaces only what curate wrote), a file, an ``OUT`` that holds the input,
and an ``OUT`` inside an input folder (the next run would curate its own clips).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from videollama.curate.records import read_record

# What a curate run leaves in OUT (output.py, records.py), and the temp names it writes them under.
OWN_ENTRIES = frozenset({".work", "shards", "clips.parquet", "stats.json", "stats.png"})
_OWN_TEMP = re.compile(r"\.(shards\.(writing|old)-\d+|clips\.parquet\.\d+\.tmp|stats\.json\.\d+\.tmp|"
                       r"stats\.png\.\d+\.tmp\.png)")


def run_record(out: Path) -> Path:
    """The record that makes ``out`` a curate output: the run's input and settings."""
    return out / ".work" / "run.json"


def _entries(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir())


def _is_fresh(out: Path) -> bool:
    """Missing, empty, or holding only the start of a run killed before it wrote its run record."""
    if not out.exists():
        return True
    if not out.is_dir():
        return False
    names = _entries(out)
    if names == [".work"] and (out / ".work").is_dir():
        return all(n.startswith(".run.json.") for n in os.listdir(out / ".work"))
    return not names


def previous_run(out: Path) -> dict[str, Any] | None:
    """The run record of a curate output in ``out`` (None: ``out`` is not one, or holds more)."""
    record = read_record(run_record(out))
    if not isinstance(record, dict) or set(record) != {"input", "config"}:
        return None
    if any(name not in OWN_ENTRIES and not _OWN_TEMP.fullmatch(name) for name in _entries(out)):
        return None
    return record


def _check_not_inside_input(input_path: Path, out: Path) -> None:
    source, target = input_path.resolve(), out.resolve()
    if target == source or source.is_relative_to(target):
        raise ValueError(f"--out {out} holds the input {input_path}; write somewhere else")
    if input_path.is_dir() and target.is_relative_to(source):
        raise ValueError(f"--out {out} is inside the input folder {input_path}: the next run would curate its "
                         "own clips; write somewhere else")


def staging_dir(out: Path) -> Path:
    """Where an ``--overwrite`` run is written before it replaces ``out`` (beside it)."""
    out = out.resolve()  # (``--out .`` has no name of its own)
    return out.with_name(f".{out.name}.curate-new")


def choose_target(input_path: Path, out: Path, identity: dict[str, Any], overwrite: bool) -> Path:
    """The folder this run writes into (``out`` itself, or ``staging_dir(out)`` for an
    ``--overwrite`` run that :func:`swap_in` moves over ``out`` at the end); raises ValueError for
    an ``out`` the rule refuses (module docstring). ``identity``: the run record of this run."""
    _check_not_inside_input(input_path, out)
    if _is_fresh(out):
        return out
    if not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    previous = previous_run(out)
    if previous is None:
        what = ", ".join(_entries(out)[:5])
        if overwrite:
            raise ValueError(f"--overwrite: {out} holds more than a curate output ({what}); refusing to replace it")
        raise ValueError(f"--out {out} is not empty ({what}) and holds no curate output; give an empty or new "
                         "folder (--overwrite replaces only a previous curate output)")
    if not overwrite:
        if previous != identity:
            raise ValueError(f"{out} holds a curate run with other input or settings (see {run_record(out)}); "
                             "use another --out, or --overwrite to replace it whole")
        return out  # the same run: resume it
    staging = staging_dir(out)
    if not _is_fresh(staging) and previous_run(staging) != identity:
        if previous_run(staging) is None:
            raise ValueError(f"--overwrite: {staging}, where the new run is written before it replaces {out}, "
                             "holds something else; move it away")
        shutil.rmtree(staging)  # an unfinished --overwrite run with other settings: ours to replace
    return staging


def swap_in(staging: Path, out: Path) -> None:
    """Replace ``out`` with the complete run in ``staging`` (two renames; the old output is deleted
    only once the new one is in place)."""
    out = out.resolve()
    retired = out.with_name(f".{out.name}.curate-old")
    shutil.rmtree(retired, ignore_errors=True)
    os.replace(out, retired)
    os.replace(staging, out)
    shutil.rmtree(retired)
