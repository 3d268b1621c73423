"""VideoQA accuracy and the standard caption metrics (BLEU, METEOR, ROUGE-L, CIDEr).

VideoQA follows the Shapes scoring rule (SHAPES.md): an answer is correct when it equals the
reference after lower-casing, trimming white space and dropping a final period
(``videollama.data.tokenizer.normalize_answer``, re-exported here). Multiple-choice
items first map the prediction to one of the options (by its text or by its letter).

Caption metrics are pycocoevalcap's own scorers behind pycocoevalcap's PTB tokenizer, called
exactly as the COCO caption evaluation (``pycocoevalcap/eval.py``) calls them, so the numbers
are comparable with published MSR-VTT / COCO results. pycocoevalcap is imported lazily: it is
an optional dependency (``pip install videollama[eval]``) and its tokenizer needs Java.
"""

from __future__ import annotations

import re
import shutil
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

# The scoring rule has one definition, beside the prompt templates (and cheap to import).
from videollama.data.tokenizer import normalize_answer

OPTION_LETTERS = "abcdefghijklmnopqrstuvwxyz"


# "b", "(b)", "b)", "b.", "b:" and the same forms followed by the option text, e.g. "b. blue".
_LETTER = re.compile(r"^\(?([a-z])\s*(?:[).:]\s*(.*))?\)?$")


def choose_option(text: str, options: Sequence[str]) -> int | None:
    """Map a free-text prediction (or answer) to the index of a multiple-choice option.

    The option whose normalised text equals the normalised prediction wins; otherwise a
    leading option letter ("B", "(b)", "b) blue") picks it, provided any text after the letter
    agrees with that option. Returns None when the prediction names no option.
    """
    norm = normalize_answer(text)
    norm_options = [normalize_answer(o) for o in options]
    if norm in norm_options:
        return norm_options.index(norm)
    m = _LETTER.match(norm)
    if m is None:
        return None
    index = OPTION_LETTERS.index(m.group(1))
    rest = normalize_answer(m.group(2) or "")
    if index >= len(options) or (rest and rest != norm_options[index]):
        return None
    return index


def is_correct(prediction: str, answer: str, options: Sequence[str] | None = None) -> bool:
    """Whether one VideoQA prediction is right.

    Open-ended: normalised strings equal. Multiple choice: the prediction maps to an option
    and that option is the answer (the answer may itself be given as option text or letter).
    """
    if not options:
        return normalize_answer(prediction) == normalize_answer(answer)
    chosen = choose_option(prediction, options)
    target = choose_option(answer, options)
    if target is None:
        raise ValueError(f"answer {answer!r} is not one of the options {list(options)}")
    return chosen == target


def videoqa_accuracy(
    predictions: Sequence[str],
    references: Sequence[str],
    kinds: Sequence[str],
    *,
    options: Sequence[Sequence[str] | None] | None = None,
) -> dict[str, Any]:
    """Accuracy overall and by question kind.

    Args:
        predictions, references, kinds: one string per question (``kind`` e.g. "static",
            "temporal"); ``options``: per question, the multiple-choice options or None.
    Returns:
        ``{"accuracy": float, "accuracy_by_kind": {kind: float}, "n": int}``; accuracy is 0.0
        for an empty set (with n = 0) rather than a division error.
    """
    n = len(predictions)
    if len(references) != n or len(kinds) != n or (options is not None and len(options) != n):
        raise ValueError(
            f"videoqa_accuracy: {n} predictions but {len(references)} references, {len(kinds)} kinds"
            + ("" if options is None else f", {len(options)} option lists")
        )
    per_kind: dict[str, list[bool]] = defaultdict(list)
    correct = 0
    for i in range(n):
        ok = is_correct(predictions[i], references[i], None if options is None else options[i])
        correct += ok
        per_kind[kinds[i]].append(ok)
    return {
        "accuracy": correct / n if n else 0.0,
        "accuracy_by_kind": {k: sum(v) / len(v) for k, v in sorted(per_kind.items())},
        "n": n,
    }


class JavaMissing(RuntimeError):
    """Caption metrics need a Java runtime (pycocoevalcap's PTB tokenizer is a Java program)."""


def require_java() -> None:
    if not java_available():
        raise JavaMissing("caption metrics need Java (pycocoevalcap's PTB tokenizer); install a JRE")


def java_available() -> bool:
    """pycocoevalcap's PTB tokenizer and METEOR are Java programs."""
    return shutil.which("java") is not None


@contextmanager
def _meteor_scorer() -> Iterator[Any]:
    """pycocoevalcap's Meteor, whose Java process is always shut down on exit.

    Meteor only stops its process in ``__del__``, i.e. whenever the garbage collector gets to
    it; a long evaluation loop would accumulate 2 GB Java heaps. We close it deterministically
    the same way ``__del__`` does (which stays harmless when it runs later).
    """
    from pycocoevalcap.meteor import meteor

    scorer = meteor.Meteor()
    try:
        yield scorer
    finally:
        proc = scorer.meteor_p
        with scorer.lock:
            proc.stdin.close()
            proc.kill()
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()


def caption_scores(
    candidates: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    meteor: bool | None = None,
) -> dict[str, float]:
    """Corpus-level COCO caption metrics.

    Args:
        candidates: one generated caption per video.
        references: per video, one or more reference captions.
        meteor: compute METEOR (starts a Java process, several seconds); default: whenever
            Java is installed.
    Returns:
        ``{"BLEU-1".."BLEU-4", "ROUGE-L", "CIDEr"}`` and ``"METEOR"`` when computed, as floats.
        CIDEr is the pycocoevalcap CIDEr-D, whose document frequencies come from the
        references of this very set (as in the COCO evaluation).
    """
    if len(candidates) != len(references):
        raise ValueError(f"caption_scores: {len(candidates)} candidates but {len(references)} reference lists")
    if not candidates:
        raise ValueError("caption_scores: no captions to score")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or not refs:
            raise ValueError(f"caption_scores: item {i} needs a non-empty list of reference captions")
    require_java()
    if meteor is None:
        meteor = True

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # The COCO layout: {id: [{"caption": str}, ...]}, tokenised (lower-cased, punctuation
    # removed) into {id: [str, ...]}; one candidate per id.
    gts = {i: [{"caption": r} for r in refs] for i, refs in enumerate(references)}
    res = {i: [{"caption": c}] for i, c in enumerate(candidates)}
    tokenizer = PTBTokenizer()
    gts_tok = tokenizer.tokenize(gts)
    res_tok = tokenizer.tokenize(res)

    scores: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts_tok, res_tok, verbose=0)
    for n, value in enumerate(bleu, start=1):
        scores[f"BLEU-{n}"] = float(value)
    if meteor:
        with _meteor_scorer() as scorer:
            scores["METEOR"] = float(scorer.compute_score(gts_tok, res_tok)[0])
    scores["ROUGE-L"] = float(Rouge().compute_score(gts_tok, res_tok)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts_tok, res_tok)[0])
    return scores


__all__ = [
    "caption_scores",
    "choose_option",
    "is_correct",
    "java_available",
    "normalize_answer",
    "videoqa_accuracy",
]
