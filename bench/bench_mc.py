"""Multiple choice on the Shapes VideoQA split, answered two ways by one model: by option likelihood
and by letter, side by side with their 95% intervals (videos resampled), written to
bench/results/mc.md.

The items are ``videollama eval --task mc``'s (eval/multiple_choice.py): every 4-second question
with its answer and up to ``--num-options`` - 1 distractors (answers of other questions of the same
family; colour and direction questions get 5 options, shape and count questions 3, all that Shapes
has). Likelihood: the option with the largest summed token log-probability after the question.
Letter: the options listed "A. ...", then Video-MME's instruction; the letter parsed by
lmms-eval's rules.

    python bench/bench_mc.py                                   # runs/demo/model (make demo)
    python bench/bench_mc.py --model DIR --data data/shapes/eval/videoqa.jsonl --limit 200
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

RESULT = ROOT / "bench" / "results" / "mc.md"


def _default(relative: str) -> Path:
    """``relative`` in this checkout, else in the main checkout (/work/main) when it has one."""
    here = ROOT / relative
    return here if here.exists() or not (Path("/work/main") / relative).exists() else Path("/work/main") / relative


def _interval(metrics: dict, way: str, kind: str | None = None) -> str:
    ci = metrics["ci95"][f"accuracy_{way}"]
    low, high = ci["all"] if kind is None else ci["by_kind"][kind]
    return f"[{low:.3f}, {high:.3f}]"


def report(metrics: dict, args: argparse.Namespace, seconds: float, note: str) -> str:
    kinds = sorted(metrics["accuracy_likelihood_by_kind"])
    prov = metrics["provenance"]
    videos = len({json.loads(line)["video"] for line in (args.out / "predictions.jsonl").read_text().splitlines()})
    lines = [
        "# Multiple choice: by option likelihood and by letter",
        "",
        f"Model: `{args.model}` (weights digest {prov['model_dir']['digest'][:16]}). {note}",
        f"Data: `{args.data}` (sha256 {prov['data']['sha256'][:16]}), {metrics['n']} questions about {videos} "
        f"videos; options per question: {metrics['options_per_item']} (`--num-options {args.num_options}`, "
        f"seed {args.seed}); chance {metrics['chance']:.3f}.",
        "",
        "| scoring | accuracy | 95% CI (videos resampled) | "
        + " | ".join(f"{k} | {k} CI" for k in kinds) + " |",
        "| --- | --- | --- | " + " | ".join("--- | ---" for _ in kinds) + " |",
    ]
    for way in ("likelihood", "letter"):
        cells = [f"{metrics[f'accuracy_{way}_by_kind'][k]:.3f} | {_interval(metrics, way, k)}" for k in kinds]
        lines.append(f"| {way} | {metrics[f'accuracy_{way}']:.3f} | {_interval(metrics, way)} | "
                     + " | ".join(cells) + " |")
    lines += [
        "",
        f"- likelihood: {metrics['scoring']['likelihood']}.",
        f"- letter: {metrics['scoring']['letter']}.",
        f"- {metrics['evaluated']} of {metrics['n']} evaluated ({metrics['skipped']} skipped); "
        f"{seconds:.0f} s wall for both ways, batch {args.batch_size}, `videollama eval --task mc` "
        f"(bench/bench_mc.py).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=_default("runs/demo/model"))
    parser.add_argument("--data", type=Path, default=_default("data/shapes/eval/videoqa.jsonl"))
    parser.add_argument("--video-root", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_mc", help="predictions.jsonl, metrics.json")
    parser.add_argument("--limit", type=int, default=None, help="the first N questions of the file")
    parser.add_argument("--num-options", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--note", default="", help="a sentence on the model, written under the table's title")
    args = parser.parse_args(argv)
    if not (args.model / "config.json").is_file() or not args.data.is_file():
        print(f"bench_mc: need a model directory ({args.model}) and a VideoQA set ({args.data}): run `make demo` "
              "or pass --model and --data", file=sys.stderr)
        return 2
    import torch

    from videollama.eval.harness import evaluate
    from videollama.model.videollama import VideoLlama

    torch.manual_seed(0)
    model, tokenizer = VideoLlama.from_pretrained(args.model, return_tokenizer=True)
    start = time.perf_counter()
    metrics = evaluate(model, tokenizer, "mc", args.data, args.video_root, args.out, batch_size=args.batch_size,
                       limit=args.limit, num_options=args.num_options, seed=args.seed, model_dir=args.model)
    seconds = time.perf_counter() - start
    from machine import stamped  # bench/machine.py: the CPU, its ISA, measured peak and bandwidth

    RESULT.write_text(stamped(report(metrics, args, seconds, args.note)))
    print(RESULT.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
