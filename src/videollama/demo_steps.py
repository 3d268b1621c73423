"""The steps of ``make demo`` (videollama/demo.py): its settings, a stage's header and timing,
the ``videollama`` command runner, the corpus makers, train + export, eval, and the summaries
the report is built from."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

CORPUS_STAMP = "demo-corpus.json"  # written beside the corpus: the parameters it was made with


@dataclass
class DemoSettings:
    """What the demo trains on and for how long (the defaults are the 30-minute CPU demo)."""

    data: str = "data/shapes"
    out: str = "runs/demo"
    train_clips: int = 2000
    eval_clips: int = 100
    seed: int = 0
    synth_workers: int = 2
    vocab_size: int = 1024
    web: str = "data/web"  # the raw web pool
    web_videos: int = 80
    web_seed: int = 0
    curator_config: str = "configs/demo-curator.yaml"
    curate_config: str = "configs/curate-web.yaml"
    curator: str | None = None  # an existing scorer + captioner model directory: no bootstrap
    curator_steps: int | None = None  # None: the recipe's max_steps
    curation_only: bool = False  # stop after curating (and its figures)
    pretrain_config: str = "configs/demo-pretrain.yaml"
    finetune_config: str = "configs/demo-finetune.yaml"
    pretrain_steps: int | None = None  # None: the recipe's max_steps
    finetune_steps: int | None = None
    nproc: int = 1  # training processes (torchrun when > 1)
    eval_batch_size: int = 32
    caption_eval: bool = True
    train_overrides: tuple[str, ...] = ()  # recipe overrides for both training stages, e.g. micro_batch=4
    in_process: bool = False  # run the stages in this interpreter (tests), not as subprocesses


class Stage:
    """Prints a header, times the stage, and records the time in ``timings``."""

    def __init__(self, timings: dict[str, float], name: str, title: str):
        self.timings, self.name, self.title = timings, name, title

    def __enter__(self) -> Stage:
        n = len(self.timings) + 1
        print(f"\n=== [{n}] {self.title} ===", flush=True)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.timings[self.name] = round(time.perf_counter() - self.start, 1)
        if exc[0] is None:
            print(f"--- {self.title}: {self.timings[self.name]:.1f} s", flush=True)


def videollama(*args: str, capture: bool = False, nproc: int = 1, in_process: bool = False) -> str:
    """Run one ``videollama`` subcommand as a subprocess (progress bars pass straight through).

    Raises RuntimeError naming the command when it fails. With ``capture`` returns its stdout.
    ``in_process`` calls the same entry point in this interpreter instead (the tests use it
    to save a Python and torch start-up per stage); ``nproc > 1`` runs it under torchrun.
    """
    print("$ videollama " + " ".join(args), flush=True)
    if in_process:
        if nproc > 1:
            raise ValueError("in_process runs one training process; use a subprocess for nproc > 1")
        from videollama.cli import main

        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer) if capture else contextlib.nullcontext():
            code = main(list(args))
        output = buffer.getvalue()
    else:
        cli = ["-m", "videollama.cli", *args]
        if nproc > 1:
            cli = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *cli]
        # OpenMP threads that spin while they wait are fast on an idle machine and a disaster on a
        # busy one (each waiter burns the core another process needs); sleeping waiters cost
        # nothing measurable when the machine is idle.
        env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "PYTHONUNBUFFERED": "1"}
        result = subprocess.run([sys.executable, *cli], stdout=subprocess.PIPE if capture else None, text=True,
                                env=env)
        code, output = result.returncode, result.stdout or ""
    if code != 0:
        raise RuntimeError(f"`videollama {' '.join(args)}` failed with exit code {code}")
    if capture:
        print(output, end="", flush=True)
    return output


# ---- stages ------------------------------------------------------------------------------------


def _same_corpus(folder: Path, wanted: dict, complete: bool) -> bool:
    """Whether ``folder`` holds a ``complete`` corpus whose stamp says it was made with ``wanted``."""
    stamp = folder / CORPUS_STAMP
    if not (complete and stamp.is_file()):
        return False
    from videollama.data.errors import BadSample
    from videollama.data.safe_io import read_json_object

    try:
        same = read_json_object(stamp, "corpus stamp") == wanted
    except (OSError, ValueError, BadSample):
        return False
    if same:
        print(f"{folder}: corpus with the same parameters already there ({wanted}); kept")
    return same


def make_corpus(s: DemoSettings) -> bool:
    """Synthesise the corpus unless the same one is already there. Returns True if it was made."""
    data = Path(s.data)
    wanted = {"train": s.train_clips, "eval": s.eval_clips, "seed": s.seed, "shapes_version": 1}
    stamp = data / CORPUS_STAMP
    if _same_corpus(data, wanted, (data / "eval" / "videoqa.jsonl").is_file() and any((data / "train").glob("*.tar"))):
        return False
    # A corpus with other parameters (or a half-written one) is replaced, never mixed with.
    for part in ("train", "eval", "cache"):
        shutil.rmtree(data / part, ignore_errors=True)
    stamp.unlink(missing_ok=True)
    videollama("data", "synth", "--out", str(data), "--train", str(s.train_clips), "--eval", str(s.eval_clips),
               "--seed", str(s.seed), "--workers", str(s.synth_workers), in_process=s.in_process)
    stamp.write_text(json.dumps(wanted) + "\n")
    return True


def make_web_corpus(s: DemoSettings) -> bool:
    """The raw web pool, unless the same one is already there. Returns True if it was made."""
    web = Path(s.web)
    wanted = {"videos": s.web_videos, "seed": s.web_seed, "web_version": 1}
    if _same_corpus(web, wanted, (web / "truth.json").is_file() and (web / "manifest.jsonl").is_file()):
        return False
    stamp = web / CORPUS_STAMP
    shutil.rmtree(web, ignore_errors=True)  # never a mix of two corpora's videos
    videollama("data", "web", "--out", str(web), "--videos", str(s.web_videos), "--seed", str(s.web_seed),
               "--workers", str(s.synth_workers), in_process=s.in_process)
    stamp.write_text(json.dumps(wanted) + "\n")
    return True


def train_and_export(s: DemoSettings, config: str, run_dir: Path, model_dir: Path, steps: int | None,
                     overrides: list[str], data: list[Path] | None = None, cache: Path | None = None) -> None:
    """``videollama train`` (from scratch: an old run is removed first) on ``data`` (default the
    clean train split), then ``videollama export`` to ``model_dir``."""
    # A demo run starts from scratch: the training loop would otherwise resume an old checkpoint.
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(model_dir, ignore_errors=True)
    data = data or [Path(s.data) / "train"]
    args = ["train", "--config", config, "--run-dir", str(run_dir)]
    if len(data) == 1:
        args += ["--data", str(data[0])]
    else:
        overrides = [*overrides, "data.sources=[" + ",".join(str(d) for d in data) + "]"]
    overrides = [*overrides, f"data.cache_dir={cache or Path(s.data) / 'cache'}"]
    if steps is not None:
        args += ["--max-steps", str(steps)]
    videollama(*args, *overrides, *s.train_overrides, nproc=s.nproc, in_process=s.in_process)
    videollama("export", str(run_dir), "--out", str(model_dir), in_process=s.in_process)


def evaluate(s: DemoSettings, model_dir: Path, task: str, out: Path, frames: int | None = None) -> dict:
    data = Path(s.data) / "eval" / ("videoqa.jsonl" if task == "videoqa" else "caption.jsonl")
    args = ["eval", "--model", str(model_dir), "--task", task, "--data", str(data), "--out", str(out),
            "--batch-size", str(s.eval_batch_size), "--no-meteor"]
    if frames is not None:
        args += ["--frames", str(frames)]
    videollama(*args, capture=True, in_process=s.in_process)
    return json.loads((out / "metrics.json").read_text())


def question_type(question: str) -> str:
    """The Shapes question template a question comes from (SHAPES.md), for the per-type table."""
    for prefix, name in (("what color", "color"), ("what shape", "shape"), ("how many", "count"),
                         ("which way", "direction"), ("which object moves", "which_object")):
        if question.startswith(prefix):
            return name
    return "other"


def accuracy_by_type(predictions: Path) -> dict[str, float]:
    """Accuracy per question template, from an eval run's predictions.jsonl."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for line in predictions.read_text().splitlines():
        rec = json.loads(line)
        hits[question_type(rec["question"])].append(bool(rec["correct"]))
    return {k: round(sum(v) / len(v), 4) for k, v in sorted(hits.items())}


def training_speed(run_dir: Path) -> dict[str, float]:
    """Median clips/s over a run's steps (the first steps, warming up, are left out) and its length."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    speeds = sorted(r["clips_per_s"] for r in records[min(5, len(records) - 1):])
    return {"steps": len(records), "clips_per_s": round(speeds[len(speeds) // 2], 2),
            "final_loss": records[-1]["loss"], "train_seconds": round(sum(r["time_s"] for r in records), 1)}


def example_questions(s: DemoSettings, n: int = 2) -> list[dict]:
    """n held-out questions about n different videos: a motion question first, then a static one."""
    rows = [json.loads(line) for line in (Path(s.data) / "eval" / "videoqa.jsonl").read_text().splitlines()]
    picked: list[dict] = []
    for kind in ("temporal", "static"):
        for row in rows:
            if row["kind"] == kind and all(p["video"] != row["video"] for p in picked):
                picked.append(row)
                break
    return picked[:n]
