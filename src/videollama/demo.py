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
it checks: temporal accuracy >= 0.80, static >= 0.90, single-frame temporal <= 0.45.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

from videollama.curate.inputs import raw_pairs_manifest
from videollama.curate.quality import curation_report, print_curation
from videollama.demo_steps import (
    CORPUS_STAMP,
    DemoSettings,
    Stage,
    accuracy_by_type,
    evaluate,
    example_questions,
    make_corpus,
    make_web_corpus,
    question_type,
    train_and_export,
    training_speed,
    videollama,
)

__all__ = ["CORPUS_STAMP", "DemoSettings", "main", "make_corpus", "make_web_corpus", "question_type", "run_demo",
           "accuracy_by_type", "training_speed"]

TARGETS = {"temporal": 0.80, "static": 0.90, "single_frame_temporal_max": 0.45}


# ---- the demo ----------------------------------------------------------------------------------


def run_demo(s: DemoSettings) -> dict:
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    curation = curation_stages(s, timings)
    if s.curation_only:
        timings["total"] = round(time.perf_counter() - t0, 1)
        report = {"curation": curation, "timings_s": timings, "settings": asdict(s)}
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        return report
    with Stage(timings, "pretrain", "pre-train from scratch on the curated shards"):
        train_and_export(s, s.pretrain_config, out / "pretrain", out / "pretrain-model", s.pretrain_steps,
                         [f"tokenizer={Path(s.data) / 'tokenizer.json'}"], data=[out / "curated" / "shards"],
                         cache=Path(s.web) / "cache")
    with Stage(timings, "finetune", "fine-tune on the clean VideoQA and captions"):
        train_and_export(s, s.finetune_config, out / "finetune", out / "model", s.finetune_steps,
                         [f"model.init_from={out / 'pretrain-model'}"])
    qa, single, caption = evaluation_stages(s, timings)
    with Stage(timings, "plot", "training curves"):
        for name in (("curator-run",) if s.curator is None else ()) + ("pretrain", "finetune"):
            videollama("plot", str(out / name), "--out", str(out / f"{name}-curves.png"), in_process=s.in_process)
    with Stage(timings, "generate", "two held-out questions, answered by `videollama generate`"):
        examples = [ask(s, row) for row in example_questions(s)]
    timings["total"] = round(time.perf_counter() - t0, 1)
    report = build_report(s, qa, single, caption, curation, timings, examples)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print_summary(report, out)
    return report


def curation_stages(s: DemoSettings, timings: dict[str, float]) -> dict:
    """Stages 1-5: the corpora, the tokenizer, the curator (unless given), the curation of the
    web pool into OUT/curated; returns the curation's figures against the pool's truth."""
    out, data, web = Path(s.out), Path(s.data), Path(s.web)
    with Stage(timings, "corpus", f"clean Shapes corpus: {s.train_clips} training clips, {s.eval_clips} held-out clips"):
        make_corpus(s)
    with Stage(timings, "web_corpus", f"raw web pool: {s.web_videos} uploads"):
        make_web_corpus(s)
    raw_pairs = raw_pairs_manifest(web, web / "raw-pairs.jsonl")
    with Stage(timings, "tokenizer", "tokenizer: byte-level BPE on the clean and the raw web texts"):
        # The web's words (boilerplate, hashtags) become tokens too, not strings of single letters.
        videollama("tokenizer", "train", "--data", str(data / "train"), str(raw_pairs), "--vocab-size",
                   str(s.vocab_size), "--out", str(data), in_process=s.in_process)
    curator = Path(s.curator) if s.curator else out / "curator"
    if s.curator is None:
        with Stage(timings, "curator", "bootstrap the curator: raw web pairs + clean captions"):
            raw = web / "raw-shards"
            videollama("data", "shards", "--input", str(raw_pairs), "--out", str(raw), "--overwrite",
                       in_process=s.in_process)
            train_and_export(s, s.curator_config, out / "curator-run", curator, s.curator_steps,
                             [f"tokenizer={data / 'tokenizer.json'}"], data=[data / "train", raw])
    curated = out / "curated"
    with Stage(timings, "curate", f"curate the web pool with {curator}"):
        shutil.rmtree(curated, ignore_errors=True)  # this curator's scores, not an older one's
        videollama("curate", "--input", str(web / "manifest.jsonl"), "--out", str(curated), "--config",
                   s.curate_config, "--scorer", str(curator), "--captioner", str(curator), in_process=s.in_process)
    curation = curation_report(web, curated, curator)
    print_curation(curation)
    return curation


def evaluation_stages(s: DemoSettings, timings: dict[str, float]) -> tuple[dict, dict, dict]:
    """Held-out VideoQA with every frame and with one, and captioning: their metrics.json."""
    out = Path(s.out)
    with Stage(timings, "eval_videoqa", "evaluate VideoQA on the held-out split (all frames)"):
        qa = evaluate(s, out / "model", "videoqa", out / "eval-videoqa")
    with Stage(timings, "eval_single_frame", "evaluate VideoQA with a single frame (--frames 1)"):
        single = evaluate(s, out / "model", "videoqa", out / "eval-videoqa-1frame", frames=1)
    caption: dict = {}
    if s.caption_eval:
        with Stage(timings, "eval_caption", "evaluate captioning on the held-out split"):
            # The VideoQA model answers questions; captions come from the caption-trained model.
            caption = evaluate(s, out / "pretrain-model", "caption", out / "eval-caption")
    return qa, single, caption


def ask(s: DemoSettings, row: dict) -> dict:
    """One held-out question answered by ``videollama generate``, beside its reference."""
    video = Path(s.data) / "eval" / row["video"]
    answer = videollama("generate", "--model", str(Path(s.out) / "model"), "--template", "videoqa", "--prompt",
                        row["question"], "--video", str(video), capture=True, in_process=s.in_process).strip()
    return {"video": str(video), "question": row["question"], "answer": answer, "reference": row["answer"],
            "kind": row["kind"]}


def build_report(s: DemoSettings, qa: dict, single: dict, caption: dict, curation: dict,
                 timings: dict[str, float], examples: list[dict]) -> dict:
    """report.json: accuracy overall, by kind and by question type, with one frame, captioning,
    curation, the targets, training speed, timings and the examples."""
    out = Path(s.out)
    by_kind = qa["accuracy_by_kind"]
    single_temporal = single["accuracy_by_kind"].get("temporal", 0.0)
    return {
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
