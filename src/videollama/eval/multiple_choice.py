"""Multiple choice in the harness (``videollama eval --task mc``), answered two ways on the same items.

The items are a VideoQA set's, each with its options: a line's own ``options``, or for a line
without them the answer and distractors drawn as the lmms-eval export draws them
(``lmms_export.multiple_choice``: answers of other questions of the same family, seeded), so that
``videollama eval --task mc`` and lmms-eval's ``shapes_mc_ppl`` / ``shapes_mc_letter`` see the same
items. For every item, with the video's latents computed once and shared:

- by likelihood: the question alone (no options listed) is the prompt, each option the continuation;
  an option's score is the SUM of its token log-probabilities given the prompt and the video
  (``eval.likelihood.score_continuations``, options of several questions in one forward pass);
  the option with the largest sum is the choice (the first of equal ones). lmms-eval's
  ``shapes_mc_ppl`` makes the same choice through its ``loglikelihood`` path.
- by letter: the options listed "A. red" one per line, then Video-MME's instruction, generated
  greedily; the letter is parsed by :func:`extract_letter`, lmms-eval's ``extract_mcq_answer`` rules.

Each predictions.jsonl line carries both (``option_logprobs``, ``choice_likelihood``,
``correct_likelihood``; ``letter_output``, ``choice_letter``, ``correct_letter``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from videollama.data import errors
from videollama.data.evalset import EvalItem

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
LETTER_INSTRUCTION = "Answer with the option's letter from the given choices directly."
SCORING = {
    "likelihood": "the option with the largest SUM of its token log-probabilities, given the question "
                  "alone (no options listed) and the video",
    "letter": "options listed 'A. ...' one per line, then \"" + LETTER_INSTRUCTION + "\"; greedy answer, "
              "letter parsed with lmms-eval's extract_mcq_answer rules",
}


def mc_items(items: list[EvalItem], *, num_options: int, seed: int) -> list[EvalItem]:
    """Every item with options (see the module's doc); an item left with one option is dropped."""
    from videollama.eval.lmms_export import multiple_choice

    return multiple_choice(items, num_options=num_options, seed=seed)


def letter_question(question: str, options: Sequence[str], instruction: str = LETTER_INSTRUCTION) -> str:
    """The question, its options as "A. red" lines, then the instruction (the ``shapes_mc_letter`` text)."""
    lines = [question.strip(), *(f"{LETTERS[i]}. {o.strip()}" for i, o in enumerate(options))]
    if instruction:
        lines.append(instruction)
    return "\n".join(lines)


# lmms-eval's format priorities (higher wins; within a format, the later position wins).
_PRIORITY = {"start": 10, "end": 9, "phrase": 7, "parentheses": 6, "period": 5, "colon": 4,
             "right_paren": 3, "space": 2, "fallback": 0}
_PHRASES = ("the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
            "best answer is", "the correct option is", "correct option is", "the best option is",
            "best option is", "the choice is", "choice is", "the correct choice is", "correct choice is",
            "i choose", "i select", "i pick", "my answer is", "my choice is")


def extract_letter(response: str, choices: Sequence[str]) -> str:
    """The chosen letter of a free-form answer, or "" when none: the rules of lmms-eval 0.7's
    ``extract_mcq_answer`` (its non-English phrases aside), so the harness parses as lmms-eval does."""
    if not response or not response.strip():
        return ""
    text = response.strip()
    for char in ",.!?;:'\"":
        text = text.strip(char)
    text = f" {text} "
    found: list[tuple[str, int, str]] = []  # (letter, position, format)
    for fmt, pattern in (("parentheses", "({})"), ("period", "{}."), ("colon", "{}:"), ("right_paren", "{})"),
                         ("space", "{} ")):
        found += [(c, text.rfind(pattern.format(c)), fmt) for c in choices if pattern.format(c) in text]
    lower = text.lower()
    for phrase in _PHRASES:
        at = lower.find(phrase)
        if at != -1:
            found += [(c, text.find(c, at + len(phrase)), "phrase") for c in choices
                      if text.find(c, at + len(phrase)) != -1]
    bare = text.strip()
    found += [(c, 0, "start") for c in choices if bare.startswith(c) and (len(bare) == 1 or not bare[1].isalpha())]
    found += [(c, len(text) - 1, "end") for c in choices
              if bare.endswith(c) and (len(bare) == 1 or not bare[-2].isalpha())]
    if not found:
        found = [(c, text.rfind(c), "fallback") for c in choices if c in text]
    if not found:
        return ""
    return max(found, key=lambda f: (_PRIORITY[f[2]], f[1]))[0]


def answer_index(item: EvalItem) -> int:
    from videollama.eval.metrics import choose_option

    return choose_option(item.answer, item.options)


def _likelihood_choices(run: Any, ready: list[EvalItem], loaded: Mapping[str, Any], batch_size: int
                        ) -> dict[int, list[float]]:
    """Per ready item, the summed log-probability of each option; rows (one per option) go through
    the model ``batch_size`` at a time, each distinct video's latents shared by its rows."""
    from videollama.data.tokenizer import encode_prompt, videoqa_prompt
    from videollama.eval.likelihood import score_continuations
    from videollama.inference.whole_video import pad_videos

    rows = []  # (item, option position, prompt ids, option ids)
    for it in ready:
        prompt = encode_prompt(run.tokenizer, videoqa_prompt(it.question))
        for k, option in enumerate(it.options):
            rows.append((it, k, prompt, run.tokenizer.encode(option, add_special_tokens=False).ids))
    out = {it.index: [float("-inf")] * len(it.options) for it in ready}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        distinct = list(dict.fromkeys(it.video for it, *_ in chunk))
        latents, mask = pad_videos([loaded[v].encoded for v in distinct])  # [U, L_max, D_v], [U, L_max] or None
        scores = score_continuations(run.model, [p for _, _, p, _ in chunk], [c for *_, c in chunk], latents,
                                     [distinct.index(it.video) for it, *_ in chunk], visual_mask=mask)
        for (it, k, _, _), s in zip(chunk, scores):
            out[it.index][k] = s.logprob
    return out


def _fits(run: Any, it: EvalItem, letter_prompt: list[int]) -> bool:
    """Whether every option fits after the question, and one token after the letter prompt; an item
    that does not is marked skipped (scored wrong both ways)."""
    from videollama.data.tokenizer import encode_prompt, videoqa_prompt

    max_len = run.model.config.decoder.max_seq_len
    prompt = len(encode_prompt(run.tokenizer, videoqa_prompt(it.question)))
    longest = max(len(run.tokenizer.encode(o, add_special_tokens=False).ids) for o in it.options)
    if prompt + max(longest, 1) <= max_len and len(letter_prompt) < max_len:
        return True
    run.skipped[it.index] = (errors.PROMPT_TOO_LONG, f"a question with its options does not fit max_seq_len={max_len}")
    return False


def answer_mc_batch(run: Any, batch: list[EvalItem], loaded: Mapping[str, Any], batch_size: int
                    ) -> dict[int, dict[str, Any]]:
    """Both answers of every item of ``batch`` that is not skipped, by item index."""
    from videollama.data.tokenizer import encode_prompt, videoqa_prompt
    from videollama.inference.generate import generate_batch

    ready, letter_prompts = [], []
    for it in batch:
        if it.index in run.skipped:
            continue
        ids = encode_prompt(run.tokenizer, videoqa_prompt(letter_question(it.question, it.options)))
        if _fits(run, it, ids):
            ready.append(it)
            letter_prompts.append(ids)
    if not ready:
        return {}
    logprobs = _likelihood_choices(run, ready, loaded, batch_size)
    distinct = list(dict.fromkeys(it.video for it in ready))
    texts = generate_batch(run.model, run.tokenizer, letter_prompts, [loaded[v].encoded for v in distinct],
                           [distinct.index(it.video) for it in ready], max_new_tokens=run.max_new_tokens)
    out = {}
    for it, text in zip(ready, texts):
        lp = logprobs[it.index]
        out[it.index] = {"option_logprobs": lp, "choice_likelihood": lp.index(max(lp)), "letter_output": text,
                         "choice_letter": extract_letter(text, LETTERS[: len(it.options)])}
    return out


def mc_record(it: EvalItem, answers: Mapping[str, Any] | None) -> dict[str, Any]:
    """One predictions.jsonl line's answer fields (``answers`` None: a skipped item, wrong both ways)."""
    target = answer_index(it)
    answers = answers or {"option_logprobs": None, "choice_likelihood": None, "letter_output": "",
                          "choice_letter": ""}
    return {"video": it.video, "question": it.question, "options": list(it.options), "answer": it.answer,
            "answer_index": target, "answer_letter": LETTERS[target], "kind": it.kind, **answers,
            "correct_likelihood": answers["choice_likelihood"] == target,
            "correct_letter": answers["choice_letter"] == LETTERS[target]}


def mc_scores(records: Sequence[Mapping]) -> dict[str, Any]:
    """Accuracy by likelihood and by letter, overall and by kind, and how each was scored."""
    def accuracy(field: str, group: Sequence[Mapping]) -> float:
        return sum(bool(r[field]) for r in group) / len(group) if group else 0.0

    kinds = sorted({str(r.get("kind") or "") for r in records})
    by_kind = {k: [r for r in records if str(r.get("kind") or "") == k] for k in kinds}
    report: dict[str, Any] = {"n": len(records), "scoring": SCORING,
                              "options_per_item": _histogram(len(r["options"]) for r in records)}
    for way in ("likelihood", "letter"):
        report[f"accuracy_{way}"] = accuracy(f"correct_{way}", records)
        report[f"accuracy_{way}_by_kind"] = {k: accuracy(f"correct_{way}", g) for k, g in by_kind.items()}
    report["chance"] = sum(1 / len(r["options"]) for r in records) / len(records) if records else 0.0
    return report


def _histogram(values) -> dict[str, int]:
    counts: dict[int, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return {str(k): counts[k] for k in sorted(counts)}


__all__ = ["LETTERS", "answer_mc_batch", "extract_letter", "letter_question", "mc_items", "mc_record", "mc_scores"]
