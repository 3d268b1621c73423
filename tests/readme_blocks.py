"""The README's shell blocks and a folder to run them in: a tiny model where the README expects
`make demo`'s, a 10-question data set where it expects the user's, the repository's configs.

Shared by tests/test_readme.py (every block runs or is listed as not runnable) and
tests/test_own_data.py (the fine-tuning blocks move the model; their commands print no noise).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHELL_LANGS = ("bash", "sh", "console")
FIRST_SPECS = 10   # clips (and questions) of the user's data set


@dataclass(frozen=True)
class Block:
    source: str      # README.md or docs/NAME.md
    line: int        # the line of its opening fence
    text: str

    @property
    def first_line(self) -> str:
        return self.text.splitlines()[0].strip()


def shell_blocks() -> list[Block]:
    """Every ```bash / ```sh / ```console block of README.md and docs/*.md, in order."""
    blocks = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        fence = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
        for match in fence.finditer(text):
            if match.group(1) in SHELL_LANGS:
                line = text.count("\n", 0, match.start()) + 1
                blocks.append(Block(str(path.relative_to(ROOT)), line, match.group(2)))
    return blocks


def block_starting(first_line_prefix: str) -> Block:
    found = [b for b in shell_blocks() if b.first_line.startswith(first_line_prefix)]
    assert len(found) == 1, f"README.md: {len(found)} shell blocks start with {first_line_prefix!r}"
    return found[0]


# ---- the folder ------------------------------------------------------------------------------------


def _specs():
    from videollama.data import shapes

    return [shapes.sample_clip_spec(random.Random(seed)) for seed in range(FIRST_SPECS)]


def small_mp4(spec) -> bytes:
    """A Shapes clip at a quarter of its size (80x60, 5 s): what the tiny model sees, decoded fast."""
    from videollama.data import shapes

    frames = shapes.render_frames(spec)[:, ::4, ::4]   # [T, 240, 320, 3] -> [T, 60, 80, 3]
    return shapes.encode_mp4(frames)


def write_tiny_model(path: Path, texts: list[str]) -> None:
    """The `shapes` preset shrunk to one narrow layer per part, 32 px: a few ms a step."""
    import torch

    from videollama import VideoLlama, VideoLlamaConfig
    from videollama.data.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(texts * 4, vocab_size=400)
    small = {"vision.image_size": 32, "preprocess.size": 32, "vision.hidden_size": 32, "vision.num_layers": 1,
             "vision.num_heads": 2, "vision.intermediate_size": 64, "decoder.hidden_size": 32,
             "decoder.num_layers": 1, "decoder.num_heads": 2, "decoder.num_kv_heads": 1,
             "decoder.intermediate_size": 64, "decoder.vocab_size": tokenizer.get_vocab_size()}
    cfg = VideoLlamaConfig.from_name("shapes").with_overrides(small)
    torch.manual_seed(0)
    VideoLlama(cfg).save_pretrained(path, tokenizer=tokenizer)


def write_user_data(root: Path) -> None:
    """my-data/: 10 clips, one question each (train.jsonl = eval.jsonl = test.jsonl: the 10-question
    set), their captions (captions.jsonl, captions-test.jsonl), and the demo's evaluation clip."""
    from videollama.data import shapes

    specs = _specs()
    videos = root / "my-data" / "videos"
    videos.mkdir(parents=True)
    qa, captions = [], []
    for i, spec in enumerate(specs):
        (videos / f"v{i}.mp4").write_bytes(small_mp4(spec))
        question = shapes.questions(spec)[i % 2]   # half about colour, half about shape
        qa.append({"video": f"videos/v{i}.mp4", **question})
        captions.append({"video": f"videos/v{i}.mp4", "captions": [shapes.caption(spec)]})
    for name, lines in [("train", qa), ("eval", qa), ("test", qa), ("captions", captions), ("captions-test", captions)]:
        (root / "my-data" / f"{name}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def user_texts() -> list[str]:
    from videollama.data import shapes

    specs = _specs()
    return ([shapes.caption(s) for s in specs]
            + [f"{q['question']} {q['answer']}" for s in specs for q in shapes.questions(s)])


def make_workdir(root: Path) -> Path:
    """A folder as after `make demo`, at toy size: configs/, runs/demo/model, my-data/, the demo's
    first evaluation clip (data/shapes/eval/videos/eval-0000000.mp4)."""
    from videollama.data import shapes
    from videollama.data.shapes_synth import _spec_for

    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "configs", root / "configs")
    write_tiny_model(root / "runs" / "demo" / "model", user_texts())
    write_user_data(root)
    eval_videos = root / "data" / "shapes" / "eval" / "videos"
    eval_videos.mkdir(parents=True)
    (eval_videos / "eval-0000000.mp4").write_bytes(small_mp4(_spec_for(0, "eval", 0)))
    # The demo's own clip answers the README's generate line.
    assert "yellow triangle moves right" in shapes.caption(_spec_for(0, "eval", 0))
    return root


# ---- running a block ----------------------------------------------------------------------------------


def block_env() -> dict[str, str]:
    """`videollama` and `python` resolve to this environment's, importing this tree's src/."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONWARNINGS"] = ""   # what a user's shell has: our own filters only
    # One thread: the test machine is shared, and two spinning threads per process on a loaded
    # machine made each step several times slower. Nothing printed depends on it.
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_block(block: Block, cwd: Path, *, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the block as printed with bash, stopping at its first failing command."""
    script = f"set -euo pipefail\n{block.text}"
    return subprocess.run(["bash", "-c", script], cwd=cwd, env=block_env(), capture_output=True, text=True,
                          timeout=timeout)


def check(result: subprocess.CompletedProcess, block: Block) -> subprocess.CompletedProcess:
    assert result.returncode == 0, (f"{block.source}:{block.line} ({block.first_line}) exited {result.returncode}:\n"
                                    f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def run_videollama(cwd: Path, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(["videollama", *argv], cwd=cwd, env=block_env(), capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"videollama {' '.join(argv)}: {result.stderr[-3000:]}"
    return result
