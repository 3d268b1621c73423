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


# ---- files that never end or never open: /dev/zero and FIFOs where a file is read ------------------

# Each command is run in a child process with a 6 GiB address-space limit (reading /dev/zero to
# the end would otherwise take the machine's memory) and killed if it has not answered in 300 s
# (a FIFO without a writer blocks an open() forever). Both must give one line and exit 2.
SPECIAL_TIMEOUT_S = 300


def _special_cases(tmp_path: Path, special: Path) -> dict[str, list[str]]:
    """name -> argv, each reading ``special`` (a path, or a folder holding a link to it) as a file."""
    from videollama import VideoLlama, VideoLlamaConfig
    from videollama.data.tokenizer import train_tokenizer

    good = tmp_path / "good"
    if not good.exists():
        VideoLlama(VideoLlamaConfig.from_name("tiny")).save_pretrained(
            good, tokenizer=train_tokenizer(["a red square"] * 4, vocab_size=300))

    def holding(name: str, *files: str) -> Path:
        folder = tmp_path / f"{special.name}-{name}"
        for file in files:
            (folder / file).parent.mkdir(parents=True, exist_ok=True)
            (folder / file).symlink_to(special)
        return folder

    model = holding("model", "config.json")
    if not (model / "tokenizer.json").exists():  # generate and eval read the tokenizer first
        (model / "tokenizer.json").write_bytes((good / "tokenizer.json").read_bytes())
    adapter = holding("adapter", "adapter_config.json")
    run, plot_run = holding("run", "checkpoints/latest"), holding("plot", "metrics.jsonl")
    out = str(tmp_path / f"{special.name}-out")
    return {
        "plan --config": ["plan", "--config", str(special)],
        "plan --model": ["plan", "--model", str(model)],
        "train --config": ["train", "--config", str(special), "--run-dir", out],
        "generate --model": ["generate", "--model", str(model), "--prompt", "hi"],
        "eval --model": ["eval", "--model", str(model), "--task", "videoqa", "--data", str(special), "--out", out],
        "eval --data": ["eval", "--model", str(good), "--task", "videoqa", "--data", str(special), "--out", out,
                        "--device", "cpu"],
        "merge --adapter": ["merge", "--model", str(good), "--adapter", str(adapter), "--out", out],
        "export": ["export", str(run), "--out", out],
        "plot": ["plot", str(plot_run)],
        "data shards": ["data", "shards", "--input", str(special), "--out", out],
        "tokenizer train": ["tokenizer", "train", "--data", str(special), "--out", out],
    }


def _limited():
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))


def _run_cli(argv: list[str]) -> tuple[int | str, str]:
    try:
        done = subprocess.run([sys.executable, "-m", "videollama.cli", *argv], capture_output=True, text=True,
                              timeout=SPECIAL_TIMEOUT_S, preexec_fn=_limited, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return "hung", ""
    return done.returncode, done.stderr


def test_every_file_read_is_bounded_dev_zero_and_fifo_are_one_line_errors(tmp_path: Path):
    from concurrent.futures import ThreadPoolExecutor

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    cases = {f"{name} on {special}": argv for special in (Path("/dev/zero"), fifo)
             for name, argv in _special_cases(tmp_path, special).items()}
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = dict(zip(cases, pool.map(_run_cli, cases.values())))
    for case, (rc, err) in results.items():
        lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("INFO", "WARNING"))]
        assert rc == 2, (case, rc, err[-2000:])
        assert len(lines) == 1 and lines[0].startswith("videollama: error: "), (case, err[-2000:])
        assert "Traceback" not in err, case


# ---- numbers on the command line ----------------------------------------------------------------

RECIPE = str(ROOT / "configs/pretrain-tiny.yaml")


@pytest.mark.parametrize("argv, says", [
    (["plan", "--preset", "tiny", "--gpu-memory", "inf"], "--gpu-memory must be a finite number of GiB > 0, got inf"),
    (["plan", "--preset", "tiny", "--gpu-memory", "1e400"], "--gpu-memory must be a finite number"),
    (["plan", "--preset", "tiny", "--gpu-memory=-inf"], "--gpu-memory must be a finite number"),
    (["plan", "--preset", "tiny", "--gpu-memory", "nan"], "--gpu-memory must be"),
    (["plan", "--preset", "tiny", "--micro-batch", "0"], "--micro-batch must be an integer >= 1"),
    (["plan", "--preset", "tiny", "--simulate", "--budget-days", "nan"], "--budget-days must be a finite number"),
    (["plan", "--preset", "tiny", "--simulate", "--budget-days=-1"], "--budget-days must be a finite number of days > 0"),
    (["train", "--config", RECIPE, "optimizer.lr=.nan"], "optimizer.lr: expected a finite number, got nan"),
    (["train", "--config", RECIPE, "guards.timeout_s=1e400"], "guards.timeout_s: expected a finite number"),
    (["train", "--config", RECIPE, "max_steps=.inf"], "max_steps: expected int, got inf"),
    (["train", "--config", RECIPE, "--max-steps", "-5"], "max_steps >= 0"),
    (["train", "--config", RECIPE, "micro_batch=0"], "micro_batch and global_batch must be >= 1"),
])
def test_bad_numbers_are_one_line_errors(argv, says, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert says in one_line_error(capsys)


def test_generate_and_eval_refuse_numbers_they_cannot_use_before_loading(tmp_path, capsys, monkeypatch):
    from videollama import VideoLlama, VideoLlamaConfig
    from videollama.data.tokenizer import train_tokenizer

    model_dir = tmp_path / "m"
    VideoLlama(VideoLlamaConfig.from_name("tiny")).save_pretrained(
        model_dir, tokenizer=train_tokenizer(["a red square"] * 4, vocab_size=300))
    monkeypatch.setattr(VideoLlama, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    for argv, says in [
        (["--temperature", "nan"], "--temperature >= 0 (finite)"),  # was: a RuntimeError from the sampler
        (["--temperature", "inf"], "--temperature >= 0 (finite)"),
        (["--temperature", "1e-39"], "too small to sample with"),  # was: NaN probabilities, a RuntimeError
        (["--top-p", "nan"], "0 < --top-p <= 1"),
        (["--seed", str(2**70)], "--seed must be in [-2**63, 2**64)"),  # was: "Overflow when unpacking long long"
    ]:
        assert main(["generate", "--model", str(model_dir), "--prompt", "hi", *argv]) == 2
        assert says in one_line_error(capsys), argv
    (tmp_path / "d.jsonl").write_text('{"video": "x.mp4", "question": "q?", "answer": "a"}\n')
    for argv, says in [(["--batch-size", "0"], "--batch-size must be >= 1"), (["--limit", "-1"], "--limit must be >= 1"),
                       (["--frames", "0"], "--frames must be 1")]:
        assert main(["eval", "--model", str(model_dir), "--task", "videoqa", "--data", str(tmp_path / "d.jsonl"),
                     "--out", str(tmp_path / "o"), *argv]) == 2
        assert says in one_line_error(capsys), argv
