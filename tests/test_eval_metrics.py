"""VideoQA accuracy and caption metrics, checked against pycocoevalcap run directly and by hand."""

from __future__ import annotations

import pytest

from videollama.eval import metrics
from videollama.eval.metrics import (
    caption_scores,
    choose_option,
    is_correct,
    java_available,
    normalize_answer,
    videoqa_accuracy,
)

# A dozen candidate / reference sets in the Shapes style, with case, punctuation, a paraphrase,
# a wrong caption and an empty candidate (what an untrained model often produces).
CANDIDATES = [
    "a red square moves left.",
    "A blue circle stays still.",
    "a green triangle moves up and a white square moves down.",
    "a yellow circle moves right",
    "the purple square is moving left",
    "a red circle moves up, a blue square stays still and a green triangle moves down.",
    "a white triangle moves left.",
    "",
    "a blue square moves right.",
    "a green circle stays still and a red triangle moves left.",
    "yellow triangle goes down",
    "a purple circle moves up.",
]
REFERENCES = [
    ["a red square moves left.", "the red square slides to the left."],
    ["a blue circle stays still."],
    ["a green triangle moves up and a white square moves down.", "a triangle goes up, a square goes down."],
    ["a yellow circle moves right.", "a yellow ball moves to the right."],
    ["a purple square moves left."],
    ["a red circle moves up, a blue square stays still and a green triangle moves down."],
    ["a white triangle moves right."],
    ["a green square stays still."],
    ["a blue square moves right.", "a blue square moves right."],
    ["a green circle stays still and a red triangle moves left."],
    ["a yellow triangle moves down."],
    ["a purple circle moves down.", "a purple circle goes down."],
]


def _pycocoevalcap_directly(candidates, references, *, meteor):
    """The COCO evaluation recipe (pycocoevalcap/eval.py), written out independently."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({f"v{i}": [{"caption": r} for r in refs] for i, refs in enumerate(references)})
    res = tok.tokenize({f"v{i}": [{"caption": c}] for i, c in enumerate(candidates)})
    out = {}
    bleu, _ = Bleu(4).compute_score(gts, res)
    out["BLEU-1"], out["BLEU-4"] = bleu[0], bleu[3]
    out["ROUGE-L"] = Rouge().compute_score(gts, res)[0]
    out["CIDEr"] = Cider().compute_score(gts, res)[0]
    if meteor:
        m = Meteor()
        out["METEOR"] = m.compute_score(gts, res)[0]
        del m
    return out


def _assert_same(got, expected):
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
        assert isinstance(got[key], float)


def test_caption_scores_match_pycocoevalcap():
    if not java_available():
        with pytest.raises(RuntimeError, match="Java"):
            caption_scores(CANDIDATES, REFERENCES)
        return
    got = caption_scores(CANDIDATES, REFERENCES, meteor=False)
    assert set(got) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"}
    _assert_same(got, _pycocoevalcap_directly(CANDIDATES, REFERENCES, meteor=False))
    # The numbers are not trivial: a mix of right, wrong and empty captions.
    assert 0.2 < got["BLEU-4"] < 0.95 and 0.3 < got["ROUGE-L"] < 0.98 and got["CIDEr"] > 1.0


@pytest.mark.slow  # two METEOR runs: each Java process loads its paraphrase table (~8 s)
def test_caption_scores_with_meteor_match_pycocoevalcap(monkeypatch):
    if not java_available():
        with pytest.raises(RuntimeError, match="Java"):
            caption_scores(CANDIDATES, REFERENCES)
        return
    # Record every Meteor that caption_scores starts, to check its Java process is closed.
    from pycocoevalcap.meteor import meteor as meteor_module

    started = []

    class RecordingMeteor(meteor_module.Meteor):
        def __init__(self):
            super().__init__()
            started.append(self)

    expected = _pycocoevalcap_directly(CANDIDATES, REFERENCES, meteor=True)
    monkeypatch.setattr(meteor_module, "Meteor", RecordingMeteor)
    got = caption_scores(CANDIDATES, REFERENCES)  # METEOR by default when Java is present
    assert "METEOR" in got and 0.2 < got["METEOR"] < 0.95
    _assert_same(got, expected)
    assert len(started) == 1 and started[0].meteor_p.poll() is not None, "METEOR's Java process left running"


def test_caption_scores_by_hand():
    # ROUGE-L by hand: LCS("a red square moves left", "a square moves left quickly") = 4 tokens,
    # P = R = 4/5, so F_beta = 0.8 for any beta.
    s = caption_scores(["a red square moves left"], [["a square moves left quickly"]], meteor=False)
    assert s["ROUGE-L"] == pytest.approx(0.8)
    # BLEU-1 by hand: 4 of 5 unigrams match, equal lengths (no brevity penalty).
    assert s["BLEU-1"] == pytest.approx(0.8, abs=1e-6)
    # Identical captions: perfect BLEU and ROUGE-L whatever the case and punctuation (PTB tokenizer).
    same = caption_scores(["A Red Square, moves left!"], [["a red square moves left"]], meteor=False)
    assert same["BLEU-4"] == pytest.approx(1.0, abs=1e-6) and same["ROUGE-L"] == pytest.approx(1.0)
    assert "METEOR" not in same


def test_caption_scores_bad_input():
    with pytest.raises(ValueError, match="2 candidates but 1"):
        caption_scores(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="item 1 needs a non-empty list"):
        caption_scores(["a", "b"], [["a"], []])
    with pytest.raises(ValueError, match="item 0 needs a non-empty list"):
        caption_scores(["a"], ["a red square"])  # a bare string, not a list of references
    with pytest.raises(ValueError, match="no captions"):
        caption_scores([], [])


def test_caption_scores_without_java_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="need Java"):
        caption_scores(["a"], [["a"]])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Red", "red"),
        ("  red.  ", "red"),
        ("The Red Square.", "the red square"),
        ("red..", "red."),  # only one final period goes
        ("red!", "red!"),
        ("", ""),
        ("\tleft\n", "left"),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_videoqa_accuracy_normalisation_and_kinds():
    preds = ["Red.", " two ", "left", "the blue circle", "up", "squares"]
    refs = ["red", "two", "right", "The blue circle.", "up", "square"]
    kinds = ["static", "static", "temporal", "temporal", "temporal", "static"]
    out = videoqa_accuracy(preds, refs, kinds)
    assert out["n"] == 6
    assert out["accuracy"] == pytest.approx(4 / 6)
    assert out["accuracy_by_kind"] == {"static": pytest.approx(2 / 3), "temporal": pytest.approx(2 / 3)}
    empty = videoqa_accuracy([], [], [])
    assert empty == {"accuracy": 0.0, "accuracy_by_kind": {}, "n": 0}
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        videoqa_accuracy(["a", "b"], ["a"], ["static", "static"])


def test_multiple_choice():
    options = ["left", "right", "up", "down"]
    assert choose_option("Right.", options) == 1
    assert choose_option("B", options) == 1
    assert choose_option("(c)", options) == 2
    assert choose_option("d) down", options) == 3
    assert choose_option("d. up", options) is None  # the letter and the text disagree
    assert choose_option("e", options) is None  # no fifth option
    assert choose_option("sideways", options) is None
    assert choose_option("a red square", options) is None  # "a" followed by words is not a letter
    assert is_correct("b", "right", options)
    assert is_correct("right", "B", options)  # the answer may be given by letter, too
    assert not is_correct("a", "right", options)
    assert not is_correct("sideways", "right", options)
    with pytest.raises(ValueError, match="not one of the options"):
        is_correct("left", "north", options)

    out = videoqa_accuracy(
        ["b", "red", "(a)", "left"],
        ["right", "red", "blue", "left"],
        ["temporal", "static", "static", "temporal"],
        options=[options, None, ["red", "blue"], options],
    )
    assert out["accuracy"] == pytest.approx(3 / 4)
    assert out["accuracy_by_kind"] == {"static": pytest.approx(0.5), "temporal": pytest.approx(1.0)}


def test_package_exports_are_lazy():
    import subprocess
    import sys

    code = ("import sys, videollama.eval as e; assert 'torch' not in sys.modules; "
            "assert 'pycocoevalcap' not in sys.modules; "
            "from videollama.eval import metrics; assert e.caption_scores is metrics.caption_scores; "
            "assert e.videoqa_accuracy is metrics.videoqa_accuracy; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    import videollama.eval

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        videollama.eval.nope  # noqa: B018
