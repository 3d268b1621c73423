"""``videollama data inspect``: sample listing, the exact --json summary, the contact sheet."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import FUZZ_PRE, build_fuzz_shard, good_meta, good_video
from videollama.cli import main
from videollama.data.video import load_clip
from videollama.data.writer import write_shards

pytestmark = pytest.mark.usefixtures("no_hang")  # fail instead of hanging the suite (conftest.py)

FUZZ_ARGS = ["--num-frames", str(FUZZ_PRE.num_frames), "--fps", str(FUZZ_PRE.fps), "--size", str(FUZZ_PRE.size)]


def test_inspect_json_on_the_fuzz_shard(tmp_path, capsys):
    good, expected = build_fuzz_shard(tmp_path / "fuzz.tar")
    assert main(["data", "inspect", str(tmp_path / "fuzz.tar"), "--json", *FUZZ_ARGS]) == 0
    out = capsys.readouterr().out
    assert json.loads(out) == {"samples": len(good), "skipped": expected}
    assert out.strip().splitlines() == [out.strip()]  # nothing but the one JSON line

    assert main(["data", "inspect", str(tmp_path / "fuzz.tar"), "--json", "--limit", "2", *FUZZ_ARGS]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 2


def test_inspect_prints_samples_and_sheet(tmp_path, capsys):
    videos = [good_video(i) for i in range(2)]
    write_shards([(f"clip{i}", videos[i], good_meta(i)) for i in range(2)], tmp_path / "shards")
    sheet = tmp_path / "sheet.png"
    args = ["data", "inspect", str(tmp_path / "shards"), "--sheet", str(sheet), "--size", "16", "--fps", "16"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "clip0" in out and "clip1" in out
    assert repr(good_meta(0)["caption"]) in out
    assert "'which way does the red square move?' -> 'left'" in out
    # 16 frames at 16 FPS centred in a 1 s video: the window starts at 0.0 s.
    assert "timestamps: " + " ".join(f"{i / 16:.2f}" for i in range(16)) in out
    assert "2 samples; skipped: none" in out

    # A 4x4 grid of 16x16 tiles (too small for time labels), each showing its frame's pixels.
    image = np.asarray(Image.open(sheet).convert("RGB"))
    assert image.shape == (64, 64, 3)
    frames, _ = load_clip(videos[0], num_frames=16, fps=16, size=16, normalize=False)
    expected = (frames * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # [F, S, S, 3]
    for i in range(16):
        tile = image[(i // 4) * 16:(i // 4 + 1) * 16, (i % 4) * 16:(i % 4 + 1) * 16]
        assert np.abs(tile.astype(int) - expected[i].astype(int)).max() <= 1, i  # normalise + un-normalise rounding


def test_inspect_loose_video_and_missing_path(tmp_path, capsys):
    (tmp_path / "v.mp4").write_bytes(good_video(3))
    (tmp_path / "v.txt").write_text("a sidecar caption")
    assert main(["data", "inspect", str(tmp_path / "v.mp4"), "--size", "16", "--num-frames", "2"]) == 0
    out = capsys.readouterr().out
    assert "'a sidecar caption'" in out and "1 samples" in out
    assert main(["data", "inspect", str(tmp_path / "nope.tar"), "--json"]) == 2
    assert "nope.tar: no such file" in capsys.readouterr().err
