"""The value of curation, measured (issue 12): one pre-training budget on the raw noisy web pairs
and on the shards `videollama curate` makes of them, then one fine-tuning, then held-out metrics.

    python bench/bench_curation_value.py [--demo-data data/shapes] [--out runs/curation-value]
        [--finetune-steps 1000] [--scorer raw|PATH] [--captioner raw|PATH]

Arms, both from scratch with the demo's pre-training recipe (configs/demo-pretrain.yaml: model
preset ``shapes``, its steps, batch and LR) and the demo's tokenizer (``DEMO_DATA/tokenizer.json``):

1. ``raw``: what a user without curation trains on: every raw upload of the default web corpus
   (``videollama data web``) whole, with all its candidate texts as captions (one drawn per step),
   through ``videollama data shards``; no cuts, no filter. Corrupt uploads are left to the loader,
   which skips them (``data.skip_budget=0.05``: 5 of 80 uploads are corrupt by design).
2. ``curated``: the shards of ``videollama curate --config configs/curate-web.yaml``. The scorer and
   captioner default to arm 1's pre-trained model (``raw``: the bootstrap the demo would do); a
   path uses that model instead.

Then each pre-trained model is fine-tuned with configs/demo-finetune.yaml on the clean Shapes
VideoQA train split (``--finetune-steps`` for both) and evaluated as ``videollama.demo`` does:
VideoQA accuracy by kind on the held-out split, with all frames and with one frame, and the
captioning metrics (BLEU-4, ROUGE-L, CIDEr) of the pre-trained model. Every step is the real CLI
in a subprocess. Finished steps (a model directory, an eval's metrics.json) are reused, so a cut
run resumes. Writes bench/results/curation_value.md and OUT/report.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from videollama.curate.inputs import raw_pairs_manifest  # noqa: E402
from videollama.curate.quality import evaluate as curate_quality  # noqa: E402
from videollama.demo import accuracy_by_type, training_speed  # noqa: E402

ARMS = ("raw", "curated")


def cli(*args: str) -> None:
    """``python -m videollama.cli ARGS``, niced, with this checkout's sources first on the path."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = ["nice", sys.executable, "-m", "videollama.cli", *args]
    print("+", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, env=env, check=True, cwd=ROOT)


def timed(timings: dict, name: str, done: bool, fn, *args) -> None:
    """Run ``fn(*args)`` unless ``done``; its wall seconds go to ``timings[name]`` (kept from a former run)."""
    if done:
        return
    t0 = time.perf_counter()
    fn(*args)
    timings[name] = round(time.perf_counter() - t0, 1)


def train(config: str, run_dir: Path, model_dir: Path, data: Path, overrides: list[str],
          steps: int | None = None) -> None:
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(model_dir, ignore_errors=True)
    args = ["train", "--config", config, "--run-dir", str(run_dir), "--data", str(data)]
    if steps is not None:
        args += ["--max-steps", str(steps)]
    cli(*args, *overrides)
    cli("export", str(run_dir), "--out", str(model_dir))


def evaluate(model: Path, task: str, data: Path, out: Path, frames: int | None = None) -> None:
    args = ["eval", "--model", str(model), "--task", task, "--data", str(data), "--out", str(out),
            "--batch-size", "32", "--no-meteor"]
    if frames is not None:
        args += ["--frames", str(frames)]
    cli(*args)


def link_demo(run: Path, web: Path, out: Path) -> None:
    """Make OUT look like a finished curated arm: links to the demo's web pool, curated output,
    pre-training and fine-tuning runs, models and evaluations (so that the steps below reuse them)."""
    links = {out / "web": web, out / "curated-data": run / "curated", out / "curated" / "pretrain": run / "pretrain",
             out / "curated" / "pretrain-model": run / "pretrain-model", out / "curated" / "finetune": run / "finetune",
             out / "curated" / "model": run / "model", out / "curated" / "eval-videoqa": run / "eval-videoqa",
             out / "curated" / "eval-videoqa-1frame": run / "eval-videoqa-1frame",
             out / "curated" / "eval-caption": run / "eval-caption"}
    for link, target in links.items():
        if not target.exists():
            raise FileNotFoundError(f"{target}: not in the finished demo output")
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(target, target_is_directory=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-data", type=Path, default=ROOT / "data" / "shapes",
                        help="the demo's Shapes corpus (train/, eval/, tokenizer.json), read only")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "curation-value")
    parser.add_argument("--pretrain-config", default="configs/demo-pretrain.yaml")
    parser.add_argument("--finetune-config", default="configs/demo-finetune.yaml")
    parser.add_argument("--finetune-steps", type=int, default=1000)
    parser.add_argument("--scorer", default="raw", help="'raw' (arm 1's pre-trained model) or a model directory")
    parser.add_argument("--captioner", default="raw", help="'raw' or a model directory")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "curation_value.md")
    parser.add_argument("--from-demo", type=Path, default=None, metavar="DEMO_OUT",
                        help="a finished `make demo` output (runs/demo): its curated arm (the curation with its "
                             "own curator, the pre-training on its shards, the fine-tune) is taken as it is, with "
                             "its web pool (--demo-web); only the raw arm is trained, with the same recipes and "
                             "--finetune-steps the demo's")
    parser.add_argument("--demo-web", type=Path, default=ROOT / "data" / "web", help="the demo's web pool")
    args = parser.parse_args()
    out, demo = args.out.resolve(), args.demo_data.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.from_demo is not None:
        link_demo(args.from_demo.resolve(), args.demo_web.resolve(), out)
        args.scorer = args.captioner = str(args.from_demo.resolve() / "curator")
    report_path = out / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    timings = report.setdefault("wall_s", {})
    shutil.copyfile(demo / "tokenizer.json", out / "tokenizer.json")
    web = out / "web"

    def save() -> None:
        report_path.write_text(json.dumps(report, indent=1))

    timed(timings, "web_corpus", (web / "truth.json").is_file(), lambda: cli("data", "web", "--out", str(web)))
    timed(timings, "raw_shards", any((out / "raw-shards").glob("*.tar")), lambda: cli(
        "data", "shards", "--input", str(raw_pairs_manifest(web, web / "raw-pairs.jsonl")), "--out", str(out / "raw-shards"), "--overwrite"))
    pretrain_overrides = [f"tokenizer={out / 'tokenizer.json'}"]
    raw_model = out / "raw" / "pretrain-model"
    timed(timings, "raw_pretrain", (raw_model / "config.json").is_file(), lambda: train(
        args.pretrain_config, out / "raw" / "pretrain", raw_model, out / "raw-shards",
        [*pretrain_overrides, f"data.cache_dir={out / 'raw' / 'cache'}", "data.skip_budget=0.05"]))
    save()

    scorer = str(raw_model) if args.scorer == "raw" else args.scorer
    captioner = str(raw_model) if args.captioner == "raw" else args.captioner
    curated = out / "curated-data"
    timed(timings, "curate", (curated / "stats.json").is_file(), lambda: cli(
        "curate", "--input", str(web / "manifest.jsonl"), "--out", str(curated), "--config",
        "configs/curate-web.yaml", "--scorer", scorer, "--captioner", captioner, "workers=1"))
    report["curate"] = {"scorer": scorer, "captioner": captioner}
    quality = curate_quality(web, curated)
    report["curate"].update(counts=quality["counts"], caption_choice=quality["caption_choice"],
                            generated=quality["generated"])
    cur_model = out / "curated" / "pretrain-model"
    timed(timings, "curated_pretrain", (cur_model / "config.json").is_file(), lambda: train(
        args.pretrain_config, out / "curated" / "pretrain", cur_model, curated / "shards",
        [*pretrain_overrides, f"data.cache_dir={out / 'curated' / 'cache'}"]))
    save()

    ft_cache = out / "finetune-cache"  # one decoded-frame cache of the clean train split for both arms
    for arm in ARMS:
        pre, ft = out / arm / "pretrain-model", out / arm / "model"
        timed(timings, f"{arm}_finetune", (ft / "config.json").is_file(), train,
              args.finetune_config, out / arm / "finetune", ft, demo / "train",
              [f"model.init_from={pre}", f"data.cache_dir={ft_cache}"], args.finetune_steps)
        for name, model, task, frames in (("eval-videoqa", ft, "videoqa", None),
                                          ("eval-videoqa-1frame", ft, "videoqa", 1),
                                          ("eval-caption", pre, "caption", None)):
            data = demo / "eval" / ("caption.jsonl" if task == "caption" else "videoqa.jsonl")
            timed(timings, f"{arm}_{name}", (out / arm / name / "metrics.json").is_file(),
                  evaluate, model, task, data, out / arm / name, frames)
        qa = json.loads((out / arm / "eval-videoqa" / "metrics.json").read_text())
        single = json.loads((out / arm / "eval-videoqa-1frame" / "metrics.json").read_text())
        cap = json.loads((out / arm / "eval-caption" / "metrics.json").read_text())
        report[arm] = {
            "pretrain": training_speed(out / arm / "pretrain"), "finetune": training_speed(out / arm / "finetune"),
            "accuracy": qa["accuracy"], "accuracy_by_kind": qa["accuracy_by_kind"],
            "accuracy_by_question_type": accuracy_by_type(out / arm / "eval-videoqa" / "predictions.jsonl"),
            "single_frame_accuracy_by_kind": single["accuracy_by_kind"], "n_questions": qa["n"],
            "caption": {k: cap[k] for k in ("BLEU-4", "ROUGE-L", "CIDEr")}}
        save()
    report["settings"] = {"demo_data": str(demo), "finetune_steps": args.finetune_steps,
                          "pretrain_config": args.pretrain_config, "finetune_config": args.finetune_config}
    save()
    write_results(report, args.results)


def write_results(r: dict, path: Path) -> None:
    raw, cur, c = r["raw"], r["curated"], r["curate"]
    ch, gen = c["caption_choice"], c["generated"]

    def row(name: str, a, b, fmt: str = "{:.3f}") -> str:
        return f"| {name} | {fmt.format(a)} | {fmt.format(b)} |"

    lines = [
        "## Curation value: raw web pairs vs curated shards (same budgets)",
        "",
        "`python bench/bench_curation_value.py` on the default web corpus (`videollama data web`: 80 uploads, "
        "5 corrupt). Both arms are pre-trained from scratch with configs/demo-pretrain.yaml (preset `shapes`, "
        f"{raw['pretrain']['steps']} steps of 16 clips, the demo's tokenizer), then fine-tuned with "
        f"configs/demo-finetune.yaml on the clean Shapes VideoQA train split for "
        f"{r['settings']['finetune_steps']} steps each (the demo fine-tunes 3200), then evaluated on the held-out split "
        "as `videollama.demo` does. Raw: every upload whole with all its candidate texts (one drawn per step), "
        "corrupt uploads skipped by the loader. Curated: `videollama curate --config configs/curate-web.yaml` "
        f"with scorer `{c['scorer']}` and captioner `{c['captioner']}`: {c['counts']['kept']} of "
        f"{c['counts']['clips']} clips kept, input captions precision "
        f"{ch['precision'] or 0:.3f} / recall {ch['recall'] or 0:.3f}, generated captions equal to the truth "
        f"for {gen['share_equal'] or 0:.3f} of the clips without a good text. 2 shared CPU cores, wall times "
        "include other jobs' load.",
        "",
        "| held-out metric | raw | curated |",
        "| --- | ---: | ---: |",
        row("VideoQA accuracy (all)", raw["accuracy"], cur["accuracy"]),
        row("VideoQA temporal", raw["accuracy_by_kind"].get("temporal", 0), cur["accuracy_by_kind"].get("temporal", 0)),
        row("VideoQA static", raw["accuracy_by_kind"].get("static", 0), cur["accuracy_by_kind"].get("static", 0)),
    ]
    for q in sorted(raw["accuracy_by_question_type"]):
        lines.append(row(f"VideoQA {q}", raw["accuracy_by_question_type"][q],
                         cur["accuracy_by_question_type"].get(q, 0)))
    lines += [
        row("single-frame temporal", raw["single_frame_accuracy_by_kind"].get("temporal", 0),
            cur["single_frame_accuracy_by_kind"].get("temporal", 0)),
        row("caption BLEU-4 (pre-trained model)", raw["caption"]["BLEU-4"], cur["caption"]["BLEU-4"]),
        row("caption ROUGE-L (pre-trained model)", raw["caption"]["ROUGE-L"], cur["caption"]["ROUGE-L"]),
        row("caption CIDEr (pre-trained model)", raw["caption"]["CIDEr"], cur["caption"]["CIDEr"]),
        row("pre-train final loss", raw["pretrain"]["final_loss"], cur["pretrain"]["final_loss"], "{:.2g}"),
        row("fine-tune final loss", raw["finetune"]["final_loss"], cur["finetune"]["final_loss"], "{:.2g}"),
        row("pre-train steps", raw["pretrain"]["steps"], cur["pretrain"]["steps"], "{}"),
        row("fine-tune steps", raw["finetune"]["steps"], cur["finetune"]["steps"], "{}"),
        row("pre-train train seconds", raw["pretrain"]["train_seconds"], cur["pretrain"]["train_seconds"], "{:.1f}"),
        row("fine-tune train seconds", raw["finetune"]["train_seconds"], cur["finetune"]["train_seconds"], "{:.1f}"),
        "",
        f"VideoQA: {raw['n_questions']} held-out questions. Wall seconds per step of the run: "
        + ", ".join(f"{k} {v}" for k, v in r["wall_s"].items()) + ".",
    ]
    from machine import stamped  # bench/machine.py: the CPU, its ISA, measured peak and bandwidth
    path.write_text(stamped("\n".join(lines) + "\n"))


if __name__ == "__main__":
    main()
