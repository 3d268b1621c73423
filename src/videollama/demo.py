"""``make demo``: the whole system on the embedded Shapes corpus, end to end, on a laptop CPU.

    python -m videollama.demo            (what ``make demo`` runs)

It starts where a real project starts, from raw web video with noisy texts, and follows the
reference recipe: curate the web pool, pre-train on the curated shards, fine-tune on a small clean
task set, evaluate. Every stage is the real command a user would type, run as a subprocess, so
the demo exercises exactly what users run::

    1. videollama data synth        the clean Shapes corpus: the small task set (VideoQA and
                                    captions) for fine-tuning and the held-out split (skipped
                                    when data/shapes already holds one made the same way)
    2. videollama data web          the raw web pool (data/web): long uploads of several scenes,
                                    wrong / missing / decorated texts, re-uploads, slideshows,
                                    corrupt files; truth.json apart (skipped likewise)
    3. videollama tokenizer train   byte-level BPE on the clean and the raw web texts
    4. videollama data shards       the raw web pairs as they come (each upload whole, all its
          + train + export          texts), then the curator: the bootstrap scorer and captioner,
                                    trained on those raw pairs plus the clean captions
                                    (configs/demo-curator.yaml), kept at runs/demo/curator
    5. videollama curate            the web pool through configs/curate-web.yaml with the curator
                                    as --scorer and --captioner -> runs/demo/curated/shards; its
                                    figures against truth.json go to the report
    6. videollama train + export    pre-train from scratch on the curated shards (captions only,
                                    configs/demo-pretrain.yaml)
    7. videollama train + export    fine-tune on the clean VideoQA + captions (configs/demo-finetune.yaml)
    8. videollama eval              held-out VideoQA with all frames, and with one frame (--frames 1)
    9. videollama eval              held-out captioning
   10. videollama plot              loss / LR curves of the training runs
   11. videollama generate          two example questions about held-out videos

Why the curator trains on the clean captions too: a scorer learnt from the raw pairs alone cannot
tell a video's right text from its wrong ones (bench/results/curation_value.md, bootstrap
variant); the small clean set teaches it what a caption of a clip is, and the raw pairs teach it
the web's language (boilerplate, hashtags) so that those words are not taken for evidence. Data
filtering networks (Fang et al., 2023) and BLIP's CapFilt bootstrap a filter the same way.

It writes ``runs/demo/model`` (the final model directory), ``runs/demo/report.json`` (accuracy
overall and by kind, the single-frame ablation, caption metrics, the curation figures, per-stage
timings, training clips/s) and ``runs/demo/*-curves.png``, and prints a short summary. The targets
it checks (issue 5): temporal accuracy >= 0.80, static >= 0.90, single-frame temporal <= 0.45.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from videollama.curate.inputs import raw_pairs_manifest
from videollama.curate.quality import curation_report, print_curation

TARGETS = {"temporal": 0.80, "static": 0.90, "single_frame_temporal_max": 0.45}
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


# ---- the demo ----------------------------------------------------------------------------------


def run_demo(s: DemoSettings) -> dict:
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    data = Path(s.data)

    web = Path(s.web)
    with Stage(timings, "corpus", f"clean Shapes corpus: {s.train_clips} training clips, {s.eval_clips} held-out clips"):
        make_corpus(s)
    with Stage(timings, "web_corpus", f"raw web pool: {s.web_videos} uploads"):
        make_web_corpus(s)
    raw_pairs = raw_pairs_manifest(web, web / "raw-pairs.jsonl")
    with Stage(timings, "tokenizer", "tokenizer: byte-level BPE on the clean and the raw web texts"):
        # The web's words (boilerplate, hashtags) become tokens too, not strings of single letters.
        videollama("tokenizer", "train", "--data", str(data / "train"), str(raw_pairs), "--vocab-size",
                   str(s.vocab_size), "--out", str(data), in_process=s.in_process)
    tokenizer = f"tokenizer={data / 'tokenizer.json'}"
    curator = Path(s.curator) if s.curator else out / "curator"
    if s.curator is None:
        with Stage(timings, "curator", "bootstrap the curator: raw web pairs + clean captions"):
            raw = web / "raw-shards"
            videollama("data", "shards", "--input", str(raw_pairs), "--out", str(raw), "--overwrite",
                       in_process=s.in_process)
            train_and_export(s, s.curator_config, out / "curator-run", curator, s.curator_steps, [tokenizer],
                             data=[data / "train", raw])
    curated = out / "curated"
    with Stage(timings, "curate", f"curate the web pool with {curator}"):
        shutil.rmtree(curated, ignore_errors=True)  # this curator's scores, not an older one's
        videollama("curate", "--input", str(web / "manifest.jsonl"), "--out", str(curated), "--config",
                   s.curate_config, "--scorer", str(curator), "--captioner", str(curator), in_process=s.in_process)
    curation = curation_report(web, curated, curator)
    print_curation(curation)
    if s.curation_only:
        timings["total"] = round(time.perf_counter() - t0, 1)
        report = {"curation": curation, "timings_s": timings, "settings": asdict(s)}
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        return report
    with Stage(timings, "pretrain", "pre-train from scratch on the curated shards"):
        train_and_export(s, s.pretrain_config, out / "pretrain", out / "pretrain-model", s.pretrain_steps,
                         [tokenizer], data=[curated / "shards"], cache=web / "cache")
    with Stage(timings, "finetune", "fine-tune on the clean VideoQA and captions"):
        train_and_export(s, s.finetune_config, out / "finetune", out / "model", s.finetune_steps,
                         [f"model.init_from={out / 'pretrain-model'}"])
    model = out / "model"
    with Stage(timings, "eval_videoqa", "evaluate VideoQA on the held-out split (all frames)"):
        qa = evaluate(s, model, "videoqa", out / "eval-videoqa")
    with Stage(timings, "eval_single_frame", "evaluate VideoQA with a single frame (--frames 1)"):
        single = evaluate(s, model, "videoqa", out / "eval-videoqa-1frame", frames=1)
    caption: dict = {}
    if s.caption_eval:
        with Stage(timings, "eval_caption", "evaluate captioning on the held-out split"):
            # The VideoQA model answers questions; captions come from the caption-trained model.
            caption = evaluate(s, out / "pretrain-model", "caption", out / "eval-caption")
    with Stage(timings, "plot", "training curves"):
        for name in (("curator-run",) if s.curator is None else ()) + ("pretrain", "finetune"):
            videollama("plot", str(out / name), "--out", str(out / f"{name}-curves.png"), in_process=s.in_process)
    examples = []
    with Stage(timings, "generate", "two held-out questions, answered by `videollama generate`"):
        for row in example_questions(s):
            video = data / "eval" / row["video"]
            answer = videollama("generate", "--model", str(model), "--template", "videoqa", "--prompt",
                                row["question"], "--video", str(video), capture=True, in_process=s.in_process).strip()
            examples.append({"video": str(video), "question": row["question"], "answer": answer,
                             "reference": row["answer"], "kind": row["kind"]})
    timings["total"] = round(time.perf_counter() - t0, 1)

    by_kind = qa["accuracy_by_kind"]
    single_temporal = single["accuracy_by_kind"].get("temporal", 0.0)
    report = {
        "accuracy": qa["accuracy"],
        "accuracy_by_kind": by_kind,
        "single_frame_temporal_accuracy": single_temporal,
        "single_frame_accuracy_by_kind": single["accuracy_by_kind"],
        "accuracy_by_question_type": accuracy_by_type(out / "eval-videoqa" / "predictions.jsonl"),
        "single_frame_accuracy_by_question_type": accuracy_by_type(out / "eval-videoqa-1frame" / "predictions.jsonl"),
        "n_questions": qa["n"],
        "caption_metrics": {k: v for k, v in caption.items() if k in ("BLEU-4", "ROUGE-L", "CIDEr", "METEOR")},
        "curation": curation,
        "targets": TARGETS,
        "targets_met": {
            "temporal": by_kind.get("temporal", 0.0) >= TARGETS["temporal"],
            "static": by_kind.get("static", 0.0) >= TARGETS["static"],
            "single_frame_temporal": single_temporal <= TARGETS["single_frame_temporal_max"],
        },
        "training": {**({"curator": training_speed(out / "curator-run")} if s.curator is None else {}),
                     "pretrain": training_speed(out / "pretrain"), "finetune": training_speed(out / "finetune")},
        "timings_s": timings,
        "examples": examples,
        "settings": asdict(s),
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print_summary(report, out)
    return report


def print_summary(report: dict, out: Path) -> None:
    by_kind, met = report["accuracy_by_kind"], report["targets_met"]

    def mark(ok: bool) -> str:
        return "met" if ok else "NOT met"

    print("\n=== summary ===")
    print(f"held-out VideoQA ({report['n_questions']} questions): accuracy {report['accuracy']:.3f}")
    print(f"  static   {by_kind.get('static', 0):.3f}  (target >= {TARGETS['static']}: {mark(met['static'])})")
    print(f"  temporal {by_kind.get('temporal', 0):.3f}  (target >= {TARGETS['temporal']}: {mark(met['temporal'])})")
    print(f"  single-frame temporal {report['single_frame_temporal_accuracy']:.3f}  "
          f"(target <= {TARGETS['single_frame_temporal_max']}: {mark(met['single_frame_temporal'])})")
    print("  by question: " + ", ".join(f"{k} {v:.2f}" for k, v in report["accuracy_by_question_type"].items()))
    if report["caption_metrics"]:
        print("captioning: " + ", ".join(f"{k} {v:.3f}" for k, v in report["caption_metrics"].items()))
    for ex in report["examples"]:
        print(f"Q ({ex['kind']}) {ex['question']}  ->  {ex['answer']!r}  (reference: {ex['reference']!r})")
    t = report["timings_s"]
    print("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in t.items()))
    print(f"training speed: pre-train {report['training']['pretrain']['clips_per_s']} clips/s, "
          f"fine-tune {report['training']['finetune']['clips_per_s']} clips/s")
    print(f"model: {out / 'model'}; report: {out / 'report.json'}; curves: {out}/*-curves.png")


def parse_args(argv: list[str] | None) -> DemoSettings:
    d = DemoSettings()
    p = argparse.ArgumentParser(prog="python -m videollama.demo", description=__doc__.splitlines()[0])
    p.add_argument("--data", default=d.data, help="corpus folder (default %(default)s)")
    p.add_argument("--out", default=d.out, help="demo output folder (default %(default)s)")
    p.add_argument("--train-clips", type=int, default=d.train_clips)
    p.add_argument("--eval-clips", type=int, default=d.eval_clips)
    p.add_argument("--seed", type=int, default=d.seed, help="corpus seed")
    p.add_argument("--synth-workers", type=int, default=d.synth_workers)
    p.add_argument("--web", default=d.web, help="raw web pool folder (default %(default)s)")
    p.add_argument("--web-videos", type=int, default=d.web_videos)
    p.add_argument("--web-seed", type=int, default=d.web_seed, help="web pool seed")
    p.add_argument("--curator-config", default=d.curator_config)
    p.add_argument("--curate-config", default=d.curate_config)
    p.add_argument("--curator", default=None, help="an existing model directory as scorer and captioner "
                   "(default: bootstrap one, kept at OUT/curator)")
    p.add_argument("--curator-steps", type=int, default=None, help="default: the recipe's max_steps")
    p.add_argument("--curation-only", action="store_true", help="stop after curating the web pool")
    p.add_argument("--pretrain-config", default=d.pretrain_config)
    p.add_argument("--finetune-config", default=d.finetune_config)
    p.add_argument("--pretrain-steps", type=int, default=None, help="default: the recipe's max_steps")
    p.add_argument("--finetune-steps", type=int, default=None, help="default: the recipe's max_steps")
    p.add_argument("--nproc", type=int, default=d.nproc, help="training processes (torchrun when > 1)")
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    p.add_argument("--no-caption-eval", action="store_true", help="skip the captioning evaluation")
    a = p.parse_args(argv)
    return DemoSettings(data=a.data, out=a.out, train_clips=a.train_clips, eval_clips=a.eval_clips, seed=a.seed,
                        synth_workers=a.synth_workers, web=a.web, web_videos=a.web_videos, web_seed=a.web_seed,
                        curator_config=a.curator_config, curate_config=a.curate_config, curator=a.curator,
                        curator_steps=a.curator_steps, curation_only=a.curation_only,
                        pretrain_config=a.pretrain_config,
                        finetune_config=a.finetune_config, pretrain_steps=a.pretrain_steps,
                        finetune_steps=a.finetune_steps, nproc=a.nproc, eval_batch_size=a.eval_batch_size,
                        caption_eval=not a.no_caption_eval)


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    try:
        run_demo(settings)
    except RuntimeError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
