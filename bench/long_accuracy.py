"""Long-video accuracy of a model fine-tuned from `make demo`'s on whole Shapes-Long videos.

Not one of `make bench`'s scripts (it trains for about an hour on 2 cores): run it by hand in a
folder holding the demo's `runs/demo/model` and `data/shapes` (a `make demo` checkout)::

    python bench/long_accuracy.py --work .

Every step is a `videollama` command, skipped when its output is already there (so an
interrupted run resumes):

1. `data synth-long --out data/shapes-long --train 200` (corpus seed 0: the evaluation grid,
   needle durations 30-600 s x depths 0-1, 2 videos per cell; the whole-video split, 4 per duration);
2. stage 1: `train --config configs/long-videoqa.yaml` from the demo's model (200 long videos
   beside the demo's 2,000 clips, 400 steps);
3. `data synth-long --out data/shapes-long2 --train 800 --seed 7` (more training videos; its own
   evaluation splits are not used);
4. stage 2: the same recipe from stage 1's model, 800 steps, on the 1,000 long videos and the
   first 1,000 clips (half the samples long);
5. `eval` of each stage's model: the needle grid and the whole-video split (VideoQA and
   grounding), the 4-second split with all frames and with one.

Writes bench/results/long_accuracy.md and the stage 2 needle heatmap beside it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
RECIPE = ROOT / "configs" / "long-videoqa.yaml"
EVALS = [  # (name, task, data, extra arguments)
    ("needle-qa", "videoqa", "data/shapes-long/eval/needle/videoqa.jsonl", []),
    ("needle-ground", "grounding", "data/shapes-long/eval/needle/grounding.jsonl", []),
    ("whole-qa", "videoqa", "data/shapes-long/eval/whole/videoqa.jsonl", []),
    ("whole-ground", "grounding", "data/shapes-long/eval/whole/grounding.jsonl", []),
    ("short-qa", "videoqa", "data/shapes/eval/videoqa.jsonl", []),
    ("short-qa1", "videoqa", "data/shapes/eval/videoqa.jsonl", ["--frames", "1"]),
]
STAGES = {  # name -> (initial model, run directory, model directory, recipe overrides)
    "stage 1": ("runs/demo/model", "runs/long-videoqa", "runs/long-model", []),
    "stage 2": ("runs/long-model", "runs/long-v2", "runs/long-v2-model",
                ["data.sources=[data/shapes-long/train,data/shapes-long2/train,data/shapes/train/shapes-000000.tar]",
                 "max_steps=800"]),
}


def videollama(work: Path, *args: str) -> None:
    cmd = [str(Path(sys.executable).parent / "videollama"), *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=work, check=True)


def run(work: Path) -> None:
    if not (work / "data/shapes-long/eval").is_dir():
        videollama(work, "data", "synth-long", "--out", "data/shapes-long", "--train", "200", "--duration", "30:600",
                   "--per-cell", "2", "--per-duration", "4", "--workers", "1")
    if not (work / "data/shapes-long2/train").is_dir():
        videollama(work, "data", "synth-long", "--out", "data/shapes-long2", "--train", "800", "--duration", "30:600",
                   "--per-cell", "1", "--per-duration", "1", "--seed", "7", "--workers", "1")
    for init, run_dir, model, overrides in STAGES.values():
        if not (work / model / "model.safetensors").is_file():
            videollama(work, "train", "--config", str(RECIPE), "--run-dir", run_dir, f"model.init_from={init}",
                       *overrides)
            videollama(work, "export", run_dir, "--out", model)
        for name, task, data, extra in EVALS:
            out = f"{model}-eval/{name}"
            if not (work / out / "metrics.json").is_file():
                videollama(work, "eval", "--model", model, "--task", task, "--data", data, "--out", out, *extra)


def _ci(metrics: dict, key: str, kind: str | None = None) -> str:
    ci = metrics.get("ci95", {}).get(key, {})
    pair = ci.get("by_kind", {}).get(kind) if kind else ci.get("all")
    return f" [{pair[0]:.2f}, {pair[1]:.2f}]" if pair else ""


def render(work: Path) -> str:
    rows, niah_rows = [], []
    for stage, (_, _, model, _) in STAGES.items():
        m = {name: json.loads((work / f"{model}-eval/{name}/metrics.json").read_text()) for name, *_ in EVALS}
        n, w, s, s1 = m["needle-qa"], m["whole-qa"], m["short-qa"], m["short-qa1"]
        niah = n["niah"]
        rows.append(
            f"| {stage} | **{niah['mean']:.2f}** (min {niah['min']:.2f}) | "
            f"{w['accuracy_by_kind']['needle']:.2f}{_ci(w, 'accuracy', 'needle')} | "
            f"{w['accuracy_by_kind']['order']:.2f}{_ci(w, 'accuracy', 'order')} | "
            f"{w['accuracy_by_kind']['count']:.2f}{_ci(w, 'accuracy', 'count')} | "
            f"{m['whole-ground']['R@0.5']:.2f} / {m['whole-ground']['mIoU']:.2f} | "
            f"{m['needle-ground']['R@0.5']:.2f} / {m['needle-ground']['mIoU']:.2f} | "
            f"{s['accuracy_by_kind']['static']:.3f} / {s['accuracy_by_kind']['temporal']:.3f} | "
            f"{s1['accuracy_by_kind']['temporal']:.3f} |")
        niah_rows.append((stage, niah))
    lines = ["## Long-video accuracy (Shapes-Long), fine-tuned from the demo's model on a CPU", "",
             "`bench/long_accuracy.py` (by hand, not `make bench`: about an hour of training on 2 cores): the "
             "demo's final model fine-tuned on whole Shapes-Long videos with `configs/long-videoqa.yaml` (vision "
             "side frozen, latent cache, every text of a video per sample), in two stages: **stage 1** the recipe "
             "as shipped (200 long videos of 30-600 s beside the demo's 2,000 4-second clips, 400 steps of 4 "
             "videos: a long video is about one sample in eleven), **stage 2** 800 more steps on 1,000 long videos "
             "and 1,000 clips (half the samples long). Evaluation: Shapes-Long's splits from corpus seed 0 (not "
             "trained on), greedy; 95% intervals by bootstrap over videos. NIAH: the needle questions' accuracy per "
             "(duration 30, 60, 120, 300, 600 s) x (depth 0, 0.25, 0.5, 0.75, 1) cell, 4 questions per cell, "
             "mean over the 25 cells and the worst cell. Grounding: the first time range of the answer against "
             "the event's segment (temporal IoU).", "",
             "| model | NIAH mean over cells | whole: needle | whole: order | whole: count | whole: grounding "
             "R@0.5 / mIoU | needle split: grounding R@0.5 / mIoU | 4 s split: static / temporal | 4 s, one "
             "frame: temporal |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |", *rows, "",
             "Targets (the whole-video issue): NIAH mean >= 0.95 and no cell below 0.8; needle >= 0.95, order >= "
             "0.90, count >= 0.90; grounding R@0.5 >= 0.70 and mIoU >= 0.60; the 4 s split static >= 0.97, "
             "temporal >= 0.95, one frame <= 0.30. Stage 2 comes close on the needle grid and keeps the 4 s split "
             "(static just under 0.97, as the demo's model itself: 0.961); order, count and grounding are far "
             "from their targets: the ~0.7 M-parameter model writes times as broken numbers (\"from 24.3 to 2 "
             "tom 1\"), and 1,200 steps on a CPU are not enough. The mix of long and short samples is what moved "
             "the needle grid (stage 1: a long video one sample in eleven).", ""]
    for stage, niah in niah_rows:
        lines += [f"NIAH cells, {stage} (rows: the needle's depth; columns: the video's duration, s):", "",
                  "| depth | " + " | ".join(niah["durations"]) + " |", "| --- |" + " ---: |" * len(niah["durations"]),
                  *[f"| {d} | " + " | ".join(f"{a:.2f}" for a in row) + " |"
                    for d, row in zip(niah["depths"], niah["accuracy"], strict=True)], ""]
    lines += ["![needle in a haystack, stage 2](bench/results/long_accuracy_niah.png)", ""]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("."), help="a folder with runs/demo/model and data/shapes")
    parser.add_argument("--render-only", action="store_true", help="only rebuild the table from the evaluations")
    args = parser.parse_args(argv)
    work = args.work.resolve()
    if not args.render_only:
        run(work)
    from machine import RESULTS, write_result

    shutil.copyfile(work / f"{STAGES['stage 2'][2]}-eval/needle-qa/niah.png", RESULTS / "long_accuracy_niah.png")
    print(f"wrote {write_result('long_accuracy', render(work))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
