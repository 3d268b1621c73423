"""Grounding parsing and scores against hand-computed IoUs; long-video QA breakdowns; the V-NIAH table."""

from __future__ import annotations

import math

import pytest

from videollama.eval.grounding import (
    grounding_iou,
    grounding_metrics,
    grounding_report,
    parse_time_range,
    temporal_iou,
)
from videollama.eval.long_video import is_needle_question, niah_table, plot_niah_heatmap, qa_report


@pytest.mark.parametrize(
    "text, expected",
    [
        ("from 12.0 to 16.5 seconds", (12.0, 16.5)),
        ("12 to 16", (12.0, 16.0)),
        ("12 - 16", (12.0, 16.0)),
        ("12-16s", (12.0, 16.0)),
        ("12s - 16s", (12.0, 16.0)),
        ("12.5s\u201314.5s", (12.5, 14.5)),  # an en dash
        ("From 3.0 sec to 7.5 sec.", (3.0, 7.5)),
        ("it moves from 2 seconds to 6 seconds, then from 30 to 34", (2.0, 6.0)),  # the first range
        ("from 16.5 to 12.0 seconds", (12.0, 16.5)),  # reversed: the same interval
        ("the blue circle moves at 12 seconds", None),
        ("it moves", None),
        ("", None),
    ],
)
def test_parse_time_range(text, expected):
    assert parse_time_range(text) == expected


def test_temporal_iou_by_hand():
    assert temporal_iou((12.0, 16.5), (12.0, 16.5)) == 1.0
    assert temporal_iou((10, 14), (12, 16)) == pytest.approx(2 / 6)  # overlap 2, union 4 + 4 - 2
    assert temporal_iou((13, 15), (12, 16)) == 0.5  # inside: 2 / 4
    assert temporal_iou((20, 25), (12, 16)) == 0.0
    assert temporal_iou((16, 20), (12, 16)) == 0.0  # touching ends share no time
    assert temporal_iou((5, 5), (12, 16)) == 0.0  # a point


def test_grounding_iou_takes_the_best_segment_and_counts_no_range_as_none():
    segments = [[2.0, 6.0], [20.0, 24.0]]
    assert grounding_iou("from 21 to 25 seconds", segments) == pytest.approx(3 / 5)  # 0 against [2, 6]
    assert grounding_iou("2 to 6", segments) == 1.0
    assert grounding_iou("i do not know", segments) is None
    with pytest.raises(ValueError, match="segment"):
        grounding_iou("1 to 2", [])


def test_recall_at_thresholds_and_miou_on_a_hand_made_set():
    predictions = [
        "from 12.0 to 16.5 seconds",  # 1.0
        "10 to 14",                   # 1/3
        "13s - 15s",                  # 0.5 exactly: counted at R@0.5
        "from 20 to 25 seconds",      # 0
        "21 - 25",                    # 0.6, with the line's second segment
        "no idea",                    # no range: IoU 0, a parse failure
    ]  # fmt: skip
    segments = [[[12.0, 16.5]], [[12, 16]], [[12, 16]], [[12, 16]], [[2, 6], [20, 24]], [[12, 16]]]
    m = grounding_metrics(predictions, segments)
    assert m["n"] == 6 and m["parse_failures"] == 1
    assert m["R@0.3"] == pytest.approx(4 / 6)
    assert m["R@0.5"] == pytest.approx(3 / 6)
    assert m["R@0.7"] == pytest.approx(1 / 6)
    assert m["mIoU"] == pytest.approx((1 + 1 / 3 + 0.5 + 0 + 0.6 + 0) / 6)


def test_an_iou_of_one_half_from_decimal_times_counts_at_half():
    # 0.3 - 0.1 is 0.19999999999999998 in floating point: the IoU comes out just under 0.5.
    assert temporal_iou((0.1, 0.3), (0.1, 0.5)) < 0.5
    assert grounding_metrics(["0.1 to 0.3"], [[[0.1, 0.5]]])["R@0.5"] == 1.0


def test_grounding_metrics_edge_cases():
    assert grounding_metrics([], []) == {"R@0.3": 0.0, "R@0.5": 0.0, "R@0.7": 0.0, "mIoU": 0.0,
                                         "parse_failures": 0, "n": 0}
    with pytest.raises(ValueError, match="2 predictions but 1"):
        grounding_metrics(["a", "b"], [[[0, 1]]])


def test_grounding_report_by_duration_and_depth():
    records = [
        {"prediction": "from 2 to 6 seconds", "segments": [[2, 6]], "duration_s": 30, "depth": 0.0},
        {"prediction": "from 4 to 8 seconds", "segments": [[2, 6]], "duration_s": 30, "depth": 1.0},  # 1/3
        {"prediction": "nothing", "segments": [[50, 55]], "duration_s": 120, "depth": 0.0},
    ]
    report = grounding_report(records)
    assert report["n"] == 3 and report["parse_failures"] == 1
    assert report["mIoU"] == pytest.approx((1 + 1 / 3) / 3)
    assert list(report["by_duration_s"]) == ["30", "120"]  # numeric order
    assert report["by_duration_s"]["30"]["mIoU"] == pytest.approx(2 / 3)
    assert report["by_duration_s"]["120"]["parse_failures"] == 1
    assert report["by_depth"]["0"]["R@0.5"] == 0.5 and report["by_depth"]["1"]["R@0.3"] == 1.0
    assert "by_depth" not in grounding_report([{"prediction": "1 to 2", "segments": [[1, 2]]}])


def _qa(question, answer, prediction, kind="needle", **tags):
    return {"question": question, "answer": answer, "prediction": prediction, "kind": kind, **tags}


def test_qa_report_by_kind_duration_and_depth():
    records = [
        _qa("which way does the red circle move?", "left", "left", duration_s=60, depth=0.5),
        _qa("which object moves left?", "the red circle", "the blue square.", duration_s=60, depth=0.5),
        _qa("how many objects move?", "two", "Two.", kind="count", duration_s=600),
        _qa("which object moves first?", "the red circle", "the red circle", kind="order"),  # no tags
    ]
    report = qa_report(records)
    assert report["n"] == 4 and report["accuracy"] == 0.75
    assert report["accuracy_by_kind"] == {"count": 1.0, "needle": 0.5, "order": 1.0}
    assert report["by_duration_s"] == {
        "60": {"accuracy": 0.5, "accuracy_by_kind": {"needle": 0.5}, "n": 2},
        "600": {"accuracy": 1.0, "accuracy_by_kind": {"count": 1.0}, "n": 1},
    }
    assert report["by_depth"] == {"0.5": {"accuracy": 0.5, "accuracy_by_kind": {"needle": 0.5}, "n": 2}}


def test_which_needle_questions_the_niah_score_counts():
    assert is_needle_question(_qa("which way does the red circle move?", "left", ""))
    assert is_needle_question(_qa("which object moves up?", "the red circle", ""))
    assert not is_needle_question(_qa("which way does the blue square move?", "still", ""))  # not the mover
    assert not is_needle_question(_qa("how many objects move?", "one", "", kind="count"))


def _needle_video(duration, depth, mover_right, which_right, still_right):
    """One needle video's three questions; the booleans say which predictions are right."""
    tags = {"duration_s": duration, "depth": depth}
    return [
        _qa("which way does the red circle move?", "up", "up" if mover_right else "down", **tags),
        _qa("which object moves up?", "the red circle", "the red circle" if which_right else "the blue square",
            **tags),
        _qa("which way does the blue square move?", "still", "still" if still_right else "left", **tags),
        _qa("how many objects move?", "one", "one", kind="count", **tags),
    ]


def test_niah_table_on_hand_made_predictions(tmp_path):
    records = (
        _needle_video(30, 0.0, True, True, True)      # cell (depth 0, 30 s): 2/2
        + _needle_video(30, 1.0, True, False, False)  # (1, 30 s): 1/2
        + _needle_video(60, 0.0, False, False, True)  # (0, 60 s): 0/2
        + _needle_video(60, 1.0, True, True, False)   # (1, 60 s): 2/2
        + [_qa("which object moves first?", "the red circle", "x", kind="order")]  # not in the grid
    )  # fmt: skip
    table = niah_table(records)
    assert table["durations"] == ["30", "60"] and table["depths"] == ["0", "1"]
    assert table["accuracy"] == [[1.0, 0.0], [0.5, 1.0]]  # rows: depths; columns: durations
    assert table["n"] == [[2, 2], [2, 2]]
    assert table["mean"] == pytest.approx(0.625) and table["min"] == 0.0
    assert table["cells"] == 4 and table["questions"] == 8
    # Beside it: the still objects' "which way" (2 of 4 right) and the counts (4 of 4).
    assert table["other"]["n"] == 8
    assert table["other"]["accuracy_by_kind"] == {"count": 1.0, "needle": 0.5}

    png = plot_niah_heatmap(table, tmp_path / "niah.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(png)
    assert image.shape[0] > 100 and image.shape[1] > 100


def test_niah_table_leaves_an_empty_cell_out_of_the_mean(tmp_path):
    records = _needle_video(30, 0.0, True, True, True) + _needle_video(60, 0.5, False, True, True)
    # A cell whose video has only "other" questions: it exists in the grid but holds no needle question.
    records += [_qa("how many objects move?", "one", "one", kind="count", duration_s=30, depth=0.5)]
    table = niah_table(records)
    assert table["accuracy"] == [[1.0, None], [None, 0.5]]
    assert table["mean"] == 0.75 and table["cells"] == 2
    assert plot_niah_heatmap(table, tmp_path / "h.png").stat().st_size > 1000
    assert niah_table([])["mean"] is None and not math.isnan(niah_table(records)["min"])
