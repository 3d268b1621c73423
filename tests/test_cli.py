"""The command line: user errors are one line `videollama: error: ...` with exit 2, `--debug` shows
the traceback, `key=value` overrides may stand anywhere, `--version` answers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from videollama import __version__
from videollama.cli import main

ROOT = Path(__file__).resolve().parents[1]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("videollama: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("argv, says", [
    (["info", "--preset", "nope"], "unknown preset 'nope'"),
    (["train", "--config", "missing.yaml"], "missing.yaml: cannot read recipe"),
    (["train", "--config", str(ROOT / "configs/pretrain-tiny.yaml"), "optimizer.lrr=1"], "unknown keys ['lrr']"),
    (["generate", "--model", "no/such/dir", "--prompt", "hi"], "no/such/dir"),
    (["export", "no/such/run", "--out", "x"], "no/such/run"),
    (["data", "shards", "--input", "no/such/folder", "--out", "x"], "no/such/folder"),
    (["tokenizer", "train", "--data", "missing.tar", "--out", "x"], "missing.tar"),
])
def test_user_errors_are_one_line_and_exit_2(argv, says, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert says in one_line_error(capsys)


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        main(["info", "--preset", "nope", "--debug"])
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        main(["--debug", "info", "--preset", "nope"])


def test_overrides_are_accepted_anywhere_on_the_line(tmp_path, capsys):
    recipe = str(ROOT / "configs/pretrain-tiny.yaml")
    # Both overrides reach the recipe (the second one, after an option, used to be refused).
    assert main(["train", "--config", recipe, "optimizer.lrr=1", "--max-steps", "5", "schedule.bogus=2",
                 "--run-dir", str(tmp_path / "r")]) == 2
    assert "unknown keys ['lrr']" in one_line_error(capsys)
    assert main(["train", "--config", recipe, "max_steps=3", "--run-dir", str(tmp_path / "r"),
                 "schedule.bogus=2"]) == 2
    assert "schedule: unknown keys ['bogus']" in one_line_error(capsys)
    assert main(["train", "--config", recipe, "stray"]) == 2  # a word that is no override
    assert "override 'stray' is not key=value" in one_line_error(capsys)
    with pytest.raises(SystemExit) as e:  # an unknown option stays argparse's usage error
        main(["train", "--config", recipe, "--bogus-flag"])
    assert e.value.code == 2


def test_version():
    out = subprocess.run([sys.executable, "-m", "videollama.cli", "--version"], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == f"videollama {__version__}"


def test_generate_refuses_bad_input_in_one_line_before_loading_the_model(tmp_path, capsys, monkeypatch):
    from videollama import VideoLlama, VideoLlamaConfig
    from videollama.data.tokenizer import train_tokenizer

    model_dir = tmp_path / "m"
    VideoLlama(VideoLlamaConfig.from_name("tiny")).save_pretrained(
        model_dir, tokenizer=train_tokenizer(["a red square"] * 4, vocab_size=300))
    monkeypatch.setattr(VideoLlama, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    os.mkfifo(tmp_path / "fifo.mp4")  # opening it would block forever
    for argv, says in [
        (["--prompt", "q" * 100_000_000], "over the 16384-character cap"),  # 100 MB: never tokenized
        (["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens >= 1"),
        (["--prompt", "hi", "--video", str(tmp_path / "missing.mp4")], "missing.mp4"),
        (["--prompt", "hi", "--video", str(tmp_path / "fifo.mp4")], "is a FIFO, not a regular file"),
    ]:
        assert main(["generate", "--model", str(model_dir), *argv]) == 2
        assert says in one_line_error(capsys)
