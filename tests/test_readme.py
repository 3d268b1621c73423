"""The README's Python quick start runs as written, and the public API imports cheaply."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def quick_start_block() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Python quick start"):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README.md: the quick start has no ```python block"
    return match.group(1)


def test_readme_quick_start_runs_verbatim(tmp_path, monkeypatch, capsys):
    """A model directory written by save_pretrained (with its tokenizer) where the README expects
    one, a Shapes clip where it expects one; the block runs unchanged and answers."""
    from videollama import VideoLlama, VideoLlamaConfig
    from videollama.data import shapes
    from videollama.data.tokenizer import train_tokenizer

    specs = [shapes.sample_clip_spec(random.Random(i)) for i in range(4)]
    texts = [shapes.caption(s) for s in specs] + [q["question"] for s in specs for q in shapes.questions(s)]
    tokenizer = train_tokenizer(texts * 4, vocab_size=400)
    cfg = VideoLlamaConfig.from_name("shapes").with_overrides({"decoder.vocab_size": tokenizer.get_vocab_size()})
    torch.manual_seed(0)
    VideoLlama(cfg).save_pretrained(tmp_path / "runs/demo/model", tokenizer=tokenizer)
    videos = tmp_path / "data/shapes/eval/videos"
    videos.mkdir(parents=True)
    (videos / "eval-0000000.mp4").write_bytes(shapes.encode_mp4(shapes.iter_frames(specs[0])))

    monkeypatch.chdir(tmp_path)
    exec(compile(quick_start_block(), "README.md quick start", "exec"), {"__name__": "__readme__"})
    printed = capsys.readouterr().out.strip()
    # The whole 5 s clip under the model's policy (issue 21; it was one centred window before): two
    # windows of 4 frames at 1 FPS, at 0 s and 1 s, exactly the frames load_windows gives.
    from videollama.data.windows import load_windows

    _, times = load_windows(videos / "eval-0000000.mp4", cfg.preprocess)
    assert times.tolist() == [[0.0, 1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]]
    assert printed.startswith(f"frames at {times.tolist()} s -> "), printed


def test_public_api_is_importable_and_lazy():
    code = ("import sys, videollama; assert 'torch' not in sys.modules, 'import videollama pulled torch'; "
            "from videollama import VideoLlama, VideoLlamaConfig, encode_whole_video, generate, load_clip, load_tokenizer; "
            "from videollama.model.videollama import VideoLlama as V; assert VideoLlama is V; "
            "print(sorted(videollama.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "VideoLlama" in out and "load_tokenizer" in out


def test_saved_directory_works_with_generate_and_eval(tmp_path):
    """save_pretrained(dir, tokenizer=...) is a complete model directory for the CLI."""
    from videollama import VideoLlama, VideoLlamaConfig
    from videollama.cli import main
    from videollama.data import shapes
    from videollama.data.tokenizer import train_tokenizer

    spec = shapes.sample_clip_spec(random.Random(3))
    tokenizer = train_tokenizer([shapes.caption(spec)] * 8 + [q["question"] for q in shapes.questions(spec)] * 8,
                                vocab_size=320)
    cfg = VideoLlamaConfig.from_name("shapes").with_overrides({"decoder.vocab_size": tokenizer.get_vocab_size()})
    model_dir = tmp_path / "model"
    VideoLlama(cfg).save_pretrained(model_dir, tokenizer=tokenizer)
    assert (model_dir / "tokenizer.json").is_file() and (model_dir / "preprocessor.json").is_file()
    _, again = VideoLlama.from_pretrained(model_dir, return_tokenizer=True)
    assert again.get_vocab() == tokenizer.get_vocab()

    (tmp_path / "v.mp4").write_bytes(shapes.encode_mp4(shapes.iter_frames(spec)))
    assert main(["generate", "--model", str(model_dir), "--prompt", "what moves?", "--template", "videoqa",
                 "--video", str(tmp_path / "v.mp4"), "--max-new-tokens", "4"]) == 0
    qa = shapes.questions(spec)[0]
    line = {"video": "v.mp4", "question": qa["question"], "answer": qa["answer"], "kind": qa["kind"]}
    (tmp_path / "qa.jsonl").write_text(json.dumps(line) + "\n")
    assert main(["eval", "--model", str(model_dir), "--task", "videoqa", "--data", str(tmp_path / "qa.jsonl"),
                 "--out", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["n"] == 1 and metrics["skipped"] == 0
