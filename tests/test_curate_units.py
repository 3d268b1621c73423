"""Curation pieces one at a time: config, inputs, clip cutting, filters, near-duplicates, table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from videollama.curate.config import CurateConfig, load_config
from videollama.curate.dedup import near_duplicates, pixel_embedding
from videollama.curate.filters import alignment_threshold, best_clip_of_texts, cheap_filter, choose_caption
from videollama.curate.inputs import read_inputs
from videollama.curate.rows import ClipRow, ScoreEntry

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["curate-default.yaml", "curate-web.yaml"])
def test_configs_load_and_override(name):
    cfg = load_config(ROOT / "configs" / name, ["filter.threshold=0.5", "dedup.enabled=false"])
    assert cfg.filter.threshold == 0.5 and cfg.dedup.enabled is False
    assert isinstance(cfg, CurateConfig)


def test_config_refuses_typos_and_bad_values():
    with pytest.raises(ValueError, match="unknown keys"):
        load_config(None, ["filter.treshold=1"])
    with pytest.raises(ValueError, match="keep_fraction"):
        load_config(None, ["filter.keep_fraction=1.5"])
    with pytest.raises(ValueError, match="engine"):
        load_config(None, ["engine=spark"])
    assert load_config(None, ["scorer.model=m"]).metric == "pmi"
    assert load_config(None, ["clip.model=c"]).metric == "clip"
    assert load_config(None).metric is None
    with pytest.raises(ValueError, match="pmi_reduce"):
        load_config(None, ["filter.pmi_reduce=median"])
    for reduce, column in (("mean", "pmi"), ("sum", "pmi_sum"), ("max_span", "pmi_span")):
        assert load_config(None, ["scorer.model=m", f"filter.pmi_reduce={reduce}"]).score_column == column
    for reduce, column in (("mean", "pmi_marginal"), ("sum", "pmi_marginal_sum"), ("max_span", "pmi_marginal_span")):
        assert load_config(None, ["scorer.model=m", "scorer.reference_clips=8", "filter.pmi_prior=marginal",
                                  f"filter.pmi_reduce={reduce}"]).score_column == column
    with pytest.raises(ValueError, match="reference_clips"):
        load_config(None, ["scorer.model=m", "filter.pmi_prior=marginal"])
    with pytest.raises(ValueError, match="pmi_prior"):
        load_config(None, ["filter.pmi_prior=uniform"])
    assert load_config(None, ["clip.model=c", "filter.pmi_reduce=sum"]).score_column == "clip"


def test_refilter_by_another_pmi_reduction():
    """The filter thresholds the column filter.pmi_reduce names: a decorated caption with a low mean
    but a high best span wins under max_span and loses under mean, from the same stored scores."""
    row = _row(clip_id="v/0", source_id="v", texts=["watch: a red square lol", "a blue circle"],
               scores=[ScoreEntry("watch: a red square lol", clip=None, pmi=1.0, pmi_sum=9.0, pmi_span=11.0),
                       ScoreEntry("a blue circle", clip=None, pmi=2.0, pmi_sum=4.0, pmi_span=4.5)])
    assert choose_caption(row, "pmi", 1.5) == "a blue circle"
    assert choose_caption(row, "pmi_span", 10.0) == "watch: a red square lol"
    assert choose_caption(row, "pmi_sum", 5.0) == "watch: a red square lol"
    assert choose_caption(row, "pmi_span", 12.0) is None


def test_manifest_and_folder_inputs(tmp_path):
    from helpers import good_video

    (tmp_path / "m" / "videos").mkdir(parents=True)
    (tmp_path / "m" / "videos" / "a.mp4").write_bytes(good_video(0))
    lines = [{"id": "a", "video": "videos/a.mp4", "texts": ["one", " two "], "source": "web"},
             {"id": "b", "video": "../outside.mp4", "texts": []},
             "not json",
             {"id": "c", "video": "videos/a.mp4", "texts": "a single text"},
             {"id": "d", "video": "videos/a.mp4", "texts": [1, 2]}]
    (tmp_path / "m" / "manifest.jsonl").write_text(
        "".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines))
    sources, skips = read_inputs(tmp_path / "m" / "manifest.jsonl")
    assert [s["source_id"] for s in sources] == ["a", "c"]
    assert sources[0]["texts"] == ["one", "two"] and sources[0]["meta"] == {"video": "videos/a.mp4", "source": "web"}
    assert sources[1]["texts"] == ["a single text"]
    assert sorted(r for r, _, _ in skips) == ["invalid_json", "invalid_json", "outside_root"]

    folder = tmp_path / "f"
    folder.mkdir()
    for name in ("x", "y", "z"):
        (folder / f"{name}.mp4").write_bytes(good_video(1))
    (folder / "x.txt").write_text("a red square\n")
    (folder / "y.json").write_text(json.dumps({"texts": ["t1", "t2"], "lang": "en"}))
    sources, skips = read_inputs(folder)
    assert [(s["source_id"], s["texts"]) for s in sources] == [("x", ["a red square"]), ("y", ["t1", "t2"]), ("z", [])]
    assert sources[1]["meta"] == {"video": "y.mp4", "lang": "en"} and not skips


def test_cut_clips_reencodes_exactly_the_frames_of_each_span(tmp_path):
    import av

    from badvideos import encode_video
    from curate_reference import cut_clips, sample_frames

    # 50 frames at 25 FPS, frame k a uniform gray level 5 k: each clip's frames are recognisable.
    data = encode_video(width=64, height=48, num_frames=50, frame_fn=lambda i, w, h: np.full((h, w, 3), 5 * i, np.uint8))
    path = tmp_path / "v.mp4"
    path.write_bytes(data)
    clips = cut_clips(str(path), [(0.4, 1.0), (1.2, 2.0), (5.0, 6.0)])
    assert clips[2] is None  # past the end: no frame
    for mp4, (first, last) in zip(clips[:2], [(10, 24), (30, 49)]):
        with av.open(__import__("io").BytesIO(mp4)) as c:
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        assert len(frames) == last - first + 1
        levels = [int(round(f.mean() / 5)) for f in frames]
        assert levels == list(range(first, last + 1))
    frames = sample_frames(clips[0], (3, 5.0, 16), "clip")
    assert frames.shape == (3, 16, 16, 3) and frames.dtype == np.uint8
    # centred 0.6 s window in a 0.6 s clip: samples at 0, 0.2, 0.4 s -> clip frames 0, 5, 10
    assert [int(round(f.mean() / 5)) for f in frames] == [10, 15, 20]


def _row(**kw):
    row = {"clip_id": "v-0000", "source_id": "v", "start_s": 0.0, "end_s": 3.0, "duration_s": 3.0, "width": 320,
           "height": 240, "motion": 1.0, "texts": ["a", "b"],
           "scores": [ScoreEntry("a", clip=None, pmi=0.5), ScoreEntry("b", clip=None, pmi=1.5)]}
    row.update(kw)
    return ClipRow(**row)


def test_filters_and_caption_choice():
    from videollama.curate.config import FilterSection

    cfg = FilterSection(min_duration_s=2.0, min_width=100, min_height=100, min_motion=0.1)
    assert cheap_filter(_row(), cfg) is None
    assert cheap_filter(_row(duration_s=1.0), cfg) == "too_short"
    assert cheap_filter(_row(height=90), cfg) == "low_resolution"
    assert cheap_filter(_row(motion=0.0), cfg) == "static"
    assert choose_caption(_row(), "pmi", 0.0) == "b"
    assert choose_caption(_row(), "pmi", 1.0) == "b"
    assert choose_caption(_row(), "pmi", 2.0) is None
    assert choose_caption(_row(), None, 0.0) == "a"  # no model: the first text as it is
    rows = [_row(), _row(scores=[ScoreEntry("c", clip=None, pmi=-1.0), ScoreEntry("d", clip=None, pmi=3.0)])]
    # scores 3.0, 1.5, 0.5, -1.0: the top half are 3.0 and 1.5
    assert alignment_threshold(rows, "pmi", FilterSection(keep_fraction=0.5)) == 1.5
    assert alignment_threshold(rows, "pmi", FilterSection(keep_fraction=0.1)) == 3.0
    assert alignment_threshold(rows, "pmi", FilterSection(threshold=0.7)) == 0.7


def test_a_text_is_assigned_to_the_clip_it_fits_best():
    a = _row(clip_id="v-0", source_id="v", texts=["x", "y"],
             scores=[ScoreEntry("x", clip=None, pmi=4.0), ScoreEntry("y", clip=None, pmi=3.0)])
    b = _row(clip_id="v-1", source_id="v", texts=["x", "y"],
             scores=[ScoreEntry("x", clip=None, pmi=4.5), ScoreEntry("y", clip=None, pmi=1.0)])
    assigned = best_clip_of_texts([a, b], "pmi")
    assert assigned == {("v", "x"): "v-1", ("v", "y"): "v-0"}
    assert choose_caption(a, "pmi", 0.0) == "x" and choose_caption(a, "pmi", 0.0, assigned) == "y"
    assert choose_caption(b, "pmi", 0.0, assigned) == "x"
    assert choose_caption(a, "pmi", 3.5, assigned) is None  # y is a's, but below the threshold


def test_near_duplicates_group_transitively_and_keep_the_first():
    e = np.array([[1, 0, 0], [0.99, 0.141, 0], [0.96, 0.28, 0], [0, 0, 1], [0, 0.1, 0.995]], dtype=float)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    ids = ["a", "b", "c", "d", "e"]
    # a~b, b~c (a, c only 0.96 apart: above 0.95 too); d~e
    assert near_duplicates(ids, e, 0.95) == {"b": "a", "c": "a", "e": "d"}
    assert near_duplicates(ids, e, 0.98) == {"b": "a", "c": "a", "e": "d"}  # c joins through b
    assert near_duplicates(ids, e, 0.999) == {}
    assert near_duplicates(ids, e, 0.95, block=2) == near_duplicates(ids, e, 0.95)


def test_pixel_embedding_sees_through_brightness_not_content():
    rng = np.random.default_rng(0)
    frames = rng.integers(40, 200, (4, 16, 16, 3)).astype(np.uint8)
    brighter = np.clip(frames.astype(int) + 20, 0, 255).astype(np.uint8)
    other = rng.integers(40, 200, (4, 16, 16, 3)).astype(np.uint8)
    a, b, c = (pixel_embedding(f) for f in (frames, brighter, other))
    assert abs(np.linalg.norm(a) - 1) < 1e-9
    assert a @ b > 0.999 and abs(a @ c) < 0.3


def test_table_round_trip(tmp_path):
    from videollama.curate.output import COLUMNS, read_table, write_table

    rows = [{"clip_id": "v-0000", "source_id": "v", "start_s": 0.0, "end_s": 2.0, "duration_s": 2.0, "width": 64,
             "height": 48, "motion": 0.5, "texts": ["x"], "scores": [{"text": "x", "clip": None, "pmi": 0.25, "pmi_sum": 1.5,
                                                                     "pmi_span": 1.75, "pmi_marginal": 0.5,
                                                                     "pmi_marginal_sum": 2.5,
                                                                     "pmi_marginal_span": None}],
             "kept": True, "drop_reason": None, "caption": "x", "caption_source": "input", "duplicate_of": None}]
    write_table(rows, tmp_path / "clips.parquet")
    assert read_table(tmp_path / "clips.parquet") == rows
    assert set(COLUMNS) >= {"clip_id", "source_id", "start_s", "end_s", "scores", "kept", "drop_reason", "caption",
                            "caption_source", "duplicate_of"}


def test_cli_errors_are_one_line(tmp_path, capsys):
    from videollama.cli import main as cli_main

    assert cli_main(["curate", "--input", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("videollama: error: ") and "missing: no such folder or manifest" in err
    (tmp_path / "m.jsonl").write_text("")
    assert cli_main(["curate", "--input", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "o"),
                     "filter.treshold=1"]) == 2
    assert "unknown keys ['treshold']" in capsys.readouterr().err
    assert cli_main(["curate", "--input", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "o"),
                     "--config", str(ROOT / "configs" / "curate-web.yaml")]) == 2
    assert "filter.metric pmi needs --scorer" in capsys.readouterr().err


def test_quality_figures_against_a_hand_made_truth(tmp_path):
    """videollama.curate.quality on a table whose right answers are counted by hand: one video of
    three scenes (the first with its caption, the second with a wrong text only, the third with
    none), a re-upload of scene 0, and a corrupt file."""
    from videollama.curate.output import write_table
    from videollama.curate.quality import evaluate

    scenes = [{"start_s": 0.0, "end_s": 2.0, "caption": "a red circle moves up.", "static": False},
              {"start_s": 2.0, "end_s": 4.0, "caption": "a blue square stays still.", "static": False},
              {"start_s": 4.0, "end_s": 6.0, "caption": "a green triangle moves left.", "static": False}]
    truth = {"videos": {
        "v": {"corrupt": None, "scenes": scenes, "texts": [
            {"text": "watch: a red circle moves up lol", "correct": True, "scene": 0},
            {"text": "a white circle moves down.", "correct": False, "scene": None}]},
        "r": {"corrupt": None, "scenes": [dict(scenes[0])], "texts": []},
        "bad": {"corrupt": {"kind": "empty", "reason": "empty_file"}, "scenes": [], "texts": []}},
        "duplicate_groups": [[{"video": "v", "scene": 0}, {"video": "r", "scene": 0}]],
        "corrupt": {"bad": "empty_file"}}
    (tmp_path / "truth.json").write_text(json.dumps(truth))

    def row(source, j, caption, source_kind, scores, duplicate_of=None):
        s = scenes[j]
        return {"clip_id": f"{source}-{j:04d}", "source_id": source, "start_s": s["start_s"], "end_s": s["end_s"],
                "duration_s": 2.0, "width": 64, "height": 64, "motion": 0.5, "texts": [t for t, _ in scores],
                "scores": [{"text": t, "clip": None, "pmi": p} for t, p in scores],
                "kept": duplicate_of is None, "drop_reason": "duplicate" if duplicate_of else None,
                "caption": caption, "caption_source": source_kind, "duplicate_of": duplicate_of}

    texts = [t["text"] for t in truth["videos"]["v"]["texts"]]
    rows = [row("v", 0, texts[0], "input", [(texts[0], 2.0), (texts[1], 1.5)]),   # right
            row("v", 1, texts[1], "input", [(texts[0], 0.1), (texts[1], 1.8)]),   # wrong: scene 1 has no right text
            row("v", 2, "a green triangle moves left", "generated", [(texts[0], 0.0), (texts[1], 0.0)]),
            row("r", 0, "a red circle moves up", "generated", [], duplicate_of="v-0000")]
    write_table(rows, tmp_path / "clips.parquet")
    stats = {"threshold": 1.0, "metric": "pmi", "corrupt": {"empty_file": 1}, "skipped_sources": {"bad": ["empty_file", "x"]},
             "counts": {"kept": 3}, "dropped": {"duplicate": 1}}
    (tmp_path / "stats.json").write_text(json.dumps(stats))
    q = evaluate(tmp_path, tmp_path)
    assert q["caption_choice"] == {"precision": 0.5, "recall": 1.0, "right": 1, "wrong": 1, "good_text_missed": 0}
    # pairs over the threshold: (v-0000, right), (v-0000, wrong), (v-0001, wrong); the right text below on none
    assert q["text_pairs"]["passed_right"] == 1 and q["text_pairs"]["passed_wrong"] == 2
    # removal per pair: kept (v-0000, right) and (v-0001, wrong); removed the other 4, all misaligned
    # (scene 0's text is misaligned on v-0001 and v-0002, other scenes)
    assert q["misaligned_removal"] == {"precision": 1.0, "recall": 0.8, "removed_misaligned": 4,
                                       "removed_aligned": 0, "kept_misaligned": 1}
    # Without a right text: v-0001 (an input caption, so not generated), v-0002 (generated, right), r-0000 (right).
    assert q["generated"] == {"clips_without_good_text": 3, "generated": 2, "equal_to_truth": 2, "share_equal": 2 / 3}
    assert q["duplicates"]["recall"] == 1.0 and q["duplicates"]["false_merges"] == 0
    assert q["corrupt_all_counted"] is True and q["clips_matching_a_scene"] == 4
    # A generated caption that happens to equal the right text does not make the right text chosen.
    rows[0] = {**rows[0], "caption": "watch: a red circle moves up lol", "caption_source": "generated"}
    write_table(rows, tmp_path / "clips.parquet")
    choice = evaluate(tmp_path, tmp_path)["caption_choice"]
    assert choice["right"] == 0 and choice["good_text_missed"] == 1 and choice["recall"] == 0.0
    write_table([{**rows[0], "caption": texts[0], "caption_source": "input"}, *rows[1:]], tmp_path / "clips.parquet")
    # A run without a model (no metric) is scored too: its captions are the first texts, taken as they are.
    (tmp_path / "stats.json").write_text(json.dumps({**stats, "metric": None, "threshold": None}))
    assert evaluate(tmp_path, tmp_path)["text_pairs"]["passed_right"] == 0


def test_drop_reasons_and_score_columns_keep_their_names():
    """The drop reasons are stats.json keys and clips.parquet values: their strings must not change;
    a ScoreEntry has exactly the score columns of the table's struct, in its order."""
    import dataclasses

    from videollama.curate.output import table_schema
    from videollama.curate.rows import SCORE_COLUMNS, DropReason

    assert sorted(r.value for r in DropReason) == sorted(["too_short", "low_resolution", "static", "misaligned",
                                                          "no_text", "empty_caption", "duplicate"])
    assert DropReason("static") is DropReason.STATIC and str(DropReason.STATIC) == "static"
    entry_fields = [f.name for f in dataclasses.fields(ScoreEntry)]
    struct = table_schema().field("scores").type.value_type
    assert entry_fields == ["text", *SCORE_COLUMNS] == [struct.field(i).name for i in range(struct.num_fields)]
    with pytest.raises(KeyError, match="no score column"):
        ScoreEntry("x").value("pmi_median")


def test_clip_row_from_a_record_to_the_table_and_back(tmp_path):
    """A row of a per-video record (the format process_video writes and old runs left on disk) goes
    into clips.parquet as plain values and reads back as the same typed row."""
    from videollama.curate.output import COLUMNS, read_rows, read_table, write_table
    from videollama.curate.rows import DropReason

    record = {"clip_id": "v-0001", "source_id": "v", "start_s": 2.0, "end_s": 4.04, "duration_s": 2.04,
              "width": 320, "height": 240, "fps": 25.0, "texts": ["a red circle", "hello"], "motion": 0.75,
              "mp4_bytes": 1234}
    row = ClipRow.from_record(record)
    assert [s.text for s in row.scores] == record["texts"] and row.scores[0].pmi is None
    assert (row.fps, row.mp4_bytes, row.kept, row.drop_reason) == (25.0, 1234, False, None)
    row.scores[1].set("pmi_marginal_span", 3.5)
    row.drop_reason, row.duplicate_of = DropReason.DUPLICATE, "u-0000"
    table_row = row.table_row()
    assert list(table_row) == list(COLUMNS) and type(table_row["drop_reason"]) is str
    assert table_row["scores"][1] == {"text": "hello", "clip": None, "pmi": None, "pmi_sum": None, "pmi_span": None,
                                      "pmi_marginal": None, "pmi_marginal_sum": None, "pmi_marginal_span": 3.5}
    write_table([table_row], tmp_path / "clips.parquet")
    assert read_table(tmp_path / "clips.parquet") == [table_row]
    back = read_rows(tmp_path / "clips.parquet")
    row.fps = row.mp4_bytes = None  # not columns of the table
    assert back == [row] and back[0].drop_reason is DropReason.DUPLICATE


def test_run_stats_sum_stage_seconds_and_report_every_key():
    from videollama.curate.run_stats import RunStats

    stats = RunStats("local")
    stats.add_seconds("decode", 1.5)
    stats.add_seconds("decode", 2.0)
    with stats.timed("dedup"):
        pass
    stats.count("clips", 3)
    stats.skip_source("b", "empty_file", "b: zero bytes")
    stats.skip_source("a", "empty_file", "a: zero bytes")
    stats.note(metric="pmi", threshold=0.5)
    report = stats.report(dropped={"static": 1, "duplicate": 2}, shards=1)
    assert report["seconds"]["decode"] == 3.5 and report["seconds"]["dedup"] >= 0
    assert report["seconds"]["total_wall"] >= report["seconds"]["dedup"]
    assert report["corrupt"] == {"empty_file": 2} and list(report["skipped_sources"]) == ["a", "b"]
    assert list(report["dropped"]) == ["duplicate", "static"]
    assert set(report) == {"engine", "resumed_videos", "resumed_batches", "seconds", "metric", "threshold", "counts",
                           "dropped", "corrupt", "skipped_sources", "shards"}
