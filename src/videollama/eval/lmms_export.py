"""Our VideoQA evaluation sets as lmms-eval tasks, for ``--include_path``.

    python -m videollama.eval.lmms_export --data data/shapes/eval/videoqa.jsonl --out runs/lmms_tasks
    lmms-eval --model videollama --model_args pretrained=MODEL_DIR \\
        --tasks shapes_videoqa,shapes_mc_letter,shapes_mc_ppl --include_path runs/lmms_tasks

``--out`` receives the task YAMLs and ``utils.py`` of ``videollama/eval/lmms_tasks/`` and, beside
them, the local data they read (``dataset_path: json``; lmms-eval resolves ``data_files`` against
the YAML's folder, so nothing is fetched and the folder works offline):

- ``shapes_videoqa.json``: every item of the set (the open-ended split; ``shapes_videoqa``);
- ``shapes_mc.json``: the multiple-choice variant (``shapes_mc_letter``, ``shapes_mc_ppl``);
- ``shapes_mc.jsonl``: the same multiple-choice items in our evaluation-set format, for
  ``videollama eval --data OUT/shapes_mc.jsonl --video-root ROOT``.

The multiple-choice variant keeps the options of an item that has them; otherwise an item gets
its answer and up to ``num_options - 1`` distractors, the answers of other questions of the same
family (the questions that share their first three words: "what color is", "which way does", ...),
drawn and shuffled by a seeded generator. A family with fewer answers gives fewer options (in Shapes
there are three shapes and three counts); an item left with a single option is not in the variant.
Video paths are resolved against the video root with the harness's rule (a path that leaves it is
refused unless allowed), and written absolute; a refused one is written as "", which fails to load
and is scored wrong, as ``videollama eval`` scores it. Imports no torch and no lmms-eval.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from pathlib import Path
from typing import Any

from videollama.data.errors import BadSample
from videollama.data.evalset import EvalItem, read_eval_set
from videollama.data.read_policy import DEFAULT_POLICY, ReadPolicy
from videollama.data.tokenizer import normalize_answer

TASKS_DIR = Path(__file__).with_name("lmms_tasks")
TASK_NAMES = ("shapes_videoqa", "shapes_mc_letter", "shapes_mc_ppl")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def question_family(question: str) -> str:
    """Questions that share their first three words share an answer vocabulary."""
    return " ".join(normalize_answer(question).split()[:3])


def multiple_choice(items: list[EvalItem], *, num_options: int = 4, seed: int = 0) -> list[EvalItem]:
    """The multiple-choice variant of ``items`` (see the module's doc); the answer is an option's text."""
    from videollama.eval.metrics import choose_option

    if num_options < 2:
        raise ValueError(f"num_options must be >= 2, got {num_options}")
    pools: dict[str, dict[str, str]] = {}  # family -> normalised answer -> its first spelling
    for it in items:
        pools.setdefault(question_family(it.question), {}).setdefault(normalize_answer(it.answer), it.answer.strip())
    out = []
    for it in items:
        if it.options is not None:
            options = list(it.options)
            answer = options[choose_option(it.answer, options)]  # the parser checked that it names one
        else:
            answer = it.answer.strip()
            others = sorted(a for n, a in pools[question_family(it.question)].items() if n != normalize_answer(answer))
            # A per-item generator: an item's options do not depend on the items before it.
            rng = random.Random(f"{seed}/{it.index}/{it.video}/{it.question}")
            options = rng.sample(others, min(num_options - 1, len(others))) + [answer]
            rng.shuffle(options)
        if len(options) >= 2:
            out.append(EvalItem(index=it.index, video=it.video, question=it.question, answer=answer, kind=it.kind,
                                options=options, extra=dict(it.extra)))
    return out


def _video_path(root: Path, video: str, policy: ReadPolicy) -> str:
    try:
        return str(policy.resolve(root, video))
    except BadSample:
        return ""  # fails to load in the model: scored wrong, as the harness scores a refused path


def _row(it: EvalItem, video_path: str, *, choice: bool = False) -> dict[str, Any]:
    """One line of the tasks' JSON; ``choice`` adds the answer's option index and letter."""
    from videollama.eval.metrics import choose_option

    row = {"index": it.index, "video": it.video, "video_path": video_path, "question": it.question,
           "answer": it.answer, "kind": it.kind, "options": it.options}
    if choice:
        answer_index = choose_option(it.answer, it.options)
        row.update(answer_index=answer_index, answer_letter=LETTERS[answer_index])
    return row


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def export_tasks(data: str | Path, out: str | Path, *, video_root: str | Path | None = None, num_options: int = 4,
                 seed: int = 0, policy: ReadPolicy = DEFAULT_POLICY) -> dict[str, Any]:
    """Write the Shapes tasks for lmms-eval into ``out``; returns what was written (counts, paths)."""
    data = Path(data)
    root = Path(video_root) if video_root is not None else data.parent
    items, bad_lines = read_eval_set(data, "videoqa")
    if not items:
        raise ValueError(f"{data}: no VideoQA item to export ({len(bad_lines)} bad lines)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for src in sorted(TASKS_DIR.iterdir()):
        if src.suffix in (".yaml", ".py") or src.name.endswith("_yaml"):
            shutil.copyfile(src, out / src.name)
    paths = {it.video: _video_path(root, it.video, policy) for it in items}
    mc = multiple_choice(items, num_options=num_options, seed=seed)
    _write_jsonl(out / "shapes_videoqa.json", [_row(it, paths[it.video]) for it in items])
    _write_jsonl(out / "shapes_mc.json", [_row(it, paths[it.video], choice=True) for it in mc])
    _write_jsonl(out / "shapes_mc.jsonl", [{"video": it.video, "question": it.question, "answer": it.answer,
                                            "kind": it.kind, "options": it.options, **it.extra} for it in mc])
    return {"items": len(items), "bad_lines": len(bad_lines), "multiple_choice_items": len(mc),
            "refused_videos": sorted(v for v, p in paths.items() if not p), "out": str(out),
            "tasks": list(TASK_NAMES)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m videollama.eval.lmms_export", description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, type=Path, help="a VideoQA evaluation set (JSONL)")
    parser.add_argument("--video-root", type=Path, default=None, help="default: the JSONL's folder")
    parser.add_argument("--out", required=True, type=Path, help="the folder to pass to lmms-eval's --include_path")
    parser.add_argument("--num-options", type=int, default=4, help="options per multiple-choice question, at most")
    parser.add_argument("--seed", type=int, default=0, help="draws the distractors and their order")
    parser.add_argument("--allow-outside-root", action="store_true",
                        help="let the JSONL's video paths leave --video-root (absolute, '..', links out)")
    args = parser.parse_args(argv)
    try:
        summary = export_tasks(args.data, args.out, video_root=args.video_root, num_options=args.num_options,
                               seed=args.seed, policy=ReadPolicy(allow_outside_root=args.allow_outside_root))
    except (OSError, ValueError) as e:
        print(f"videollama: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    print(f"run: lmms-eval --model videollama --model_args pretrained=MODEL_DIR --tasks {','.join(TASK_NAMES)} "
          f"--include_path {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
