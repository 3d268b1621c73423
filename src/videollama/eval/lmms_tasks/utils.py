"""The Shapes tasks' functions for lmms-eval (its YAMLs name them ``!function utils.NAME``).

Loaded by lmms-eval from this file's path, inside lmms-eval's environment; the scoring rules are
the harness's own (``videollama.eval.metrics``), the prompt text the one template's
(``videollama.data.tokenizer.videoqa_question``).
"""

from __future__ import annotations

from videollama.data.tokenizer import videoqa_question
from videollama.eval.metrics import OPTION_LETTERS, is_correct


def doc_to_visual(doc: dict) -> list[str]:
    """The one video, an absolute path written by the exporter ("" when it lay outside the root)."""
    return [doc["video_path"]]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The question (and its options line, for an item that has options), as ``videollama eval`` asks it."""
    return videoqa_question(doc["question"], doc.get("options"))


def doc_to_question(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The question alone: the context each option's likelihood is measured after."""
    return videoqa_question(doc["question"])


def mc_letter_doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The question, the options as "A. red" lines, then the task's instruction (Video-MME's layout)."""
    kwargs = lmms_eval_specific_kwargs or {}
    lines = [kwargs.get("pre_prompt", "") + doc["question"].strip()]
    lines += [f"{letter.upper()}. {option.strip()}" for letter, option in zip(OPTION_LETTERS, doc["options"])]
    if kwargs.get("post_prompt"):
        lines.append(kwargs["post_prompt"])
    return "\n".join(lines)


def videoqa_process_results(doc: dict, results: list[str]) -> dict:
    prediction = results[0]
    correct = float(is_correct(prediction, doc["answer"], doc.get("options")))
    per_kind = {"kind": doc["kind"], "correct": correct}
    return {"exact_match": _scored(doc, correct, prediction), "static": per_kind, "temporal": per_kind}


def mc_letter_process_results(doc: dict, results: list[str]) -> dict:
    from lmms_eval.tasks._task_utils.mcq_extract import extract_mcq_answer

    letters = [letter.upper() for letter in OPTION_LETTERS[: len(doc["options"])]]
    chosen = extract_mcq_answer(results[0], choices=letters)
    scored = _scored(doc, float(chosen == doc["answer_letter"]), results[0])
    return {"accuracy": {**scored, "chosen": chosen}}


def _scored(doc: dict, score: float, prediction: str) -> dict:
    # "score" and "video" are what lmms-eval's clustered standard error reads (score_key, cluster_key).
    return {"score": score, "video": doc["video"], "kind": doc["kind"], "prediction": prediction,
            "answer": doc["answer"]}


def mean_score(items: list[dict]) -> float:
    return sum(i["score"] for i in items) / len(items) if items else 0.0


def _mean_of_kind(items: list[dict], kind: str) -> float:
    scores = [i["correct"] for i in items if i["kind"] == kind]
    return sum(scores) / len(scores) if scores else float("nan")  # no question of that kind


def mean_static(items: list[dict]) -> float:
    return _mean_of_kind(items, "static")


def mean_temporal(items: list[dict]) -> float:
    return _mean_of_kind(items, "temporal")
