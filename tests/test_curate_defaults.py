"""What ``videollama curate`` does by default, end to end on raw videos the tests build:

* without ``--config`` it runs ``configs/curate-default.yaml``'s settings: a slideshow and a
  176x144 upload are dropped (static, low resolution), a scene shorter than the minimum is counted;
* a run where no model scores a text says so, on the console and in stats.json;
* of an original and a hashtag re-upload of it, the original, with its right caption, is kept.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from curate_inputs import scene_caption, shapes_video
from videollama.curate.config import PMI_EXTRA_COLUMNS, load_config
from videollama.curate.output import read_table
from videollama.curate.pipeline import curate

pytestmark = pytest.mark.usefixtures("no_hang")


def _write(folder: Path, name: str, video: bytes, text: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.mp4").write_bytes(video)
    (folder / f"{name}.txt").write_text(text)


def test_curate_without_config_drops_what_curate_default_yaml_drops_and_says_no_text_was_scored(tmp_path, capsys):
    from videollama.cli import main as cli_main

    folder = tmp_path / "raw"
    # (Shapes seeds whose objects all move: 2, 4, 6, 8, 10)
    _write(folder, "moving", shapes_video([(2, 2.4)]), scene_caption(2))
    _write(folder, "slideshow", shapes_video([(3, 2.4)], still=True), "my holiday pictures")
    _write(folder, "small", shapes_video([(4, 2.4)], width=176, height=144), scene_caption(4))
    _write(folder, "twoscenes", shapes_video([(6, 1.0), (8, 2.4)]), scene_caption(8))  # a 1 s scene first
    out = tmp_path / "out"
    assert cli_main(["curate", "--input", str(folder), "--out", str(out), "workers=1"]) == 0
    printed = capsys.readouterr().out
    rows = {r["source_id"]: r for r in read_table(out / "clips.parquet")}
    assert sorted(rows) == ["moving", "slideshow", "small", "twoscenes"]  # one clip each
    # curate-default.yaml: min_motion 0.05, min_width / min_height 224, min_clip_s 2.
    assert rows["slideshow"]["drop_reason"] == "static" and rows["small"]["drop_reason"] == "low_resolution"
    assert rows["moving"]["kept"] and rows["twoscenes"]["kept"] and rows["twoscenes"]["start_s"] == pytest.approx(1.0)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["dropped"] == {"low_resolution": 1, "static": 1}
    assert stats["dropped_scenes"] == {"too_short": 1}
    assert stats["counts"]["scenes"] == 5 and stats["counts"]["clips"] == 4
    # No model: nothing is counted as aligned, and the run says why its captions are unchecked.
    assert stats["metric"] is None and stats["texts_scored"] is False
    assert stats["counts"]["aligned"] == 0 and stats["counts"]["unscored_captions"] == 2
    assert len(stats["warnings"]) == 1 and "no text was scored" in stats["warnings"][0]
    assert f"warning: {stats['warnings'][0]}" in printed
    assert "dropped scenes: too_short=1" in printed and (out / "stats.png").stat().st_size > 0


class KeywordScorer:
    """A stand-in for the PMI scorer (its own tests check it against the model): every text of a
    clip scores 5 in every PMI column, a hashtag text 4 (both above the default threshold 3.5: the
    hashtag text of a re-upload is a caption the filter lets through, only a worse one)."""

    spec = (2, 1.0, 32)

    def reference_latents(self, ids, frames):
        return None

    def score(self, clips, reference=None):
        results = []
        for _frames, texts in clips:
            values = [4.0 if "#" in t else 5.0 for t in texts]
            results.append({"scores": values, "embedding": [1.0], **{c: list(values) for c in PMI_EXTRA_COLUMNS}})
        return results


def test_dedup_keeps_the_original_with_its_right_caption_over_a_hashtag_reupload(tmp_path, monkeypatch):
    """Before, a group kept its first clip id: the re-upload (``a_reupload`` sorts first)."""
    monkeypatch.setattr("videollama.curate.engines.build_stage_model", lambda stage, settings: KeywordScorer())
    monkeypatch.setattr("videollama.curate.pmi.model_spec", lambda model_dir: (KeywordScorer.spec, {}))
    folder = tmp_path / "raw"
    _write(folder, "original", shapes_video([(10, 2.4)]), scene_caption(10))
    _write(folder, "a_reupload", shapes_video([(10, 2.4)], crf=32), "#shapes #satisfying #fyp")
    stats = curate(folder, tmp_path / "out", load_config(None, ["workers=1", "scorer.model=fake"]))
    rows = {r["clip_id"]: r for r in read_table(tmp_path / "out" / "clips.parquet")}
    assert rows["original-0000"]["kept"] and rows["original-0000"]["caption"] == scene_caption(10)
    assert rows["a_reupload-0000"]["drop_reason"] == "duplicate"
    assert rows["a_reupload-0000"]["duplicate_of"] == "original-0000"
    assert stats["counts"]["aligned"] == 2 and stats["metric"] == "pmi_marginal_span"  # both texts passed
