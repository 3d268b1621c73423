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


# ---- every shell block of README.md and docs/ -------------------------------------------------------

# Blocks that cannot run here, by their first line, and why. A block neither run below nor listed
# here fails test_every_shell_block_is_run_or_listed: a new block must be classified.
NOT_RUNNABLE = {
    "make demo   # sets everything up, then: raw web pool -> curate -> pre-train -> fine-tune -> eval -> generate":
        "the whole demo takes about 19 minutes and installs .venv; tests/test_demo_chain.py runs its chain at toy size",
    "videollama convert --llama HF_LLAMA_DIR --vision HF_CLIP_DIR --preset videollama-13b --out models/init":
        "needs Hugging Face Llama and CLIP checkpoints (gigabytes, no network here); tests/test_convert.py converts "
        "tiny ones",
    "videollama data synth --out data/shapes --train 3000 --eval 300 --seed 0 --workers 2":
        "renders 3,300 clips and trains a tokenizer on them: minutes of CPU; tests/test_shapes.py runs data synth small",
    "videollama data web --out data/web --videos 80          # a raw \"web\" Shapes corpus with truth.json":
        "needs the curator `make demo` bootstraps (runs/demo/curator) and its train line is abbreviated (...); "
        "tests/test_demo_chain.py runs this chain at toy size",
    "ray start --head --port 6379                        # on the head node":
        "a Ray cluster of several nodes with shared storage and a 13B model",
    "videollama train --config configs/pretrain-tiny.yaml --run-dir runs/tiny          # CPU, Shapes corpus":
        "1,500 steps of pre-training on data/shapes (tens of minutes on a CPU); tests/test_train_loop.py trains "
        "and exports small runs",
    "# on every node (c10d rendezvous; HEAD is any one of the nodes)": "8 nodes x 8 GPUs, or Slurm",
    "make lmms-eval      # .venv-lmms: about 40-50 s and 84 MB over the main environment":
        "creates a second environment from the package index (network); tests/test_lmms_eval.py covers the model",
    "python -m videollama.eval.lmms_export --data data/shapes/eval/videoqa.jsonl --out runs/lmms_tasks":
        "needs .venv-lmms (make lmms-eval); tests/test_lmms_eval.py runs the export and the tasks",
    "pip install -e '.[serve]'      # fastapi, uvicorn, httpx":
        "installs from the package index, then serves until stopped; tests/test_serve_cli.py starts the server",
    "VIDEO=$(base64 -w0 clip.mp4)": "needs the server of the block above running; tests/test_serve.py posts the "
                                    "same request through the openai client",
    "videollama chat --model runs/demo/model            # http://127.0.0.1:7860/, the API at /v1 beside it":
        "serves until stopped; tests/test_ui.py and tests/test_ui_browser.py drive the page",
    "videollama eval --model runs/demo/model --task mc --data data/shapes/eval/videoqa.jsonl --out eval/mc "
    "--num-options 5":
        "needs the demo's model and two earlier evaluations (eval/qa-a, eval/qa-b) to compare; "
        "tests/test_eval_stats.py runs --task mc, --compare and the two-rank torchrun eval on a tiny model",
    "videollama plan --config configs/pretrain-13b.yaml --gpus 64 --simulate          # 8 nodes x 8: 2-3 min of CPU":
        "three full-size 13B simulations, 2-3 minutes of CPU each; tests/test_plan_simulate.py runs plan --simulate "
        "at tiny size, bench/bench_simulate.py these jobs",
    "# once, with network: the questions into the datasets cache, the videos unpacked where the task looks":
        "downloads Video-MME from the Hugging Face Hub (network, about 100 GB of video)",
}
# Blocks run by another test, in the same way (as printed, in a folder made by readme_blocks).
RUN_ELSEWHERE = {
    "videollama train --config configs/finetune-videoqa.yaml --run-dir runs/ft-qa \\": "tests/test_own_data.py",
    "videollama train --config configs/lora-videoqa.yaml --run-dir runs/lora-qa \\": "tests/test_own_data.py",
}
# Blocks run here, in README order, in one folder (a later block may read what an earlier wrote).
RUN_HERE = [
    "videollama info --preset videollama-13b",
    "videollama generate --model runs/demo/model --template videoqa",
    "videollama data shards --input videos/",
    "videollama eval --model models/ft-qa --task videoqa",
    "videollama plan --config configs/pretrain-13b.yaml --gpus 64 --gpu-memory 80",
]
FIGURE = re.compile(r"\d+\.\d+ GiB")


def test_every_shell_block_is_run_or_listed():
    from readme_blocks import shell_blocks

    blocks = shell_blocks()
    unclassified = []
    for block in blocks:
        first = block.first_line
        if first in NOT_RUNNABLE or first in RUN_ELSEWHERE or any(first.startswith(p) for p in RUN_HERE):
            continue
        unclassified.append(f"{block.source}:{block.line}: {first}")
    assert not unclassified, "shell blocks neither run nor listed in NOT_RUNNABLE:\n" + "\n".join(unclassified)
    firsts = [b.first_line for b in blocks]
    stale = [k for k in [*NOT_RUNNABLE, *RUN_ELSEWHERE] if k not in firsts]
    assert not stale, f"listed blocks no longer in README.md: {stale}"
    for test_file in RUN_ELSEWHERE.values():
        assert (ROOT / test_file).is_file()


def _readme_folder(root: Path) -> Path:
    """What the blocks run here read besides make_workdir's: a videos/ folder with a sidecar caption
    and a manifest (data shards), the two fine-tuned models (eval; test_own_data trains them) and
    a grounding set (eval --task grounding)."""
    import shutil

    from readme_blocks import make_workdir

    make_workdir(root)
    (root / "videos").mkdir()
    shutil.copy(root / "my-data/videos/v0.mp4", root / "videos/clip0.mp4")
    (root / "videos/clip0.txt").write_text("a red square moves left.\n")
    qa = json.loads((root / "my-data/train.jsonl").read_text().splitlines()[1])
    manifest = {"video": "my-data/videos/v1.mp4", "caption": "a clip", "qa": [{k: qa[k] for k in ("question", "answer")}]}
    (root / "manifest.jsonl").write_text(json.dumps(manifest) + "\n")
    for name in ("ft-qa", "ft-cap"):
        shutil.copytree(root / "runs/demo/model", root / "models" / name)
    whole = root / "data/shapes-long/eval/whole"
    (whole / "videos").mkdir(parents=True)
    shutil.copy(root / "my-data/videos/v2.mp4", whole / "videos/g0.mp4")
    line = {"video": "videos/g0.mp4", "question": "when does the square move?", "segments": [[1.0, 3.0]]}
    (whole / "grounding.jsonl").write_text(json.dumps(line) + "\n")
    return root


def test_the_runnable_shell_blocks_run_as_printed(tmp_path):
    from readme_blocks import block_starting, check, run_block

    root = _readme_folder(tmp_path / "work")
    outputs = {}
    for prefix in RUN_HERE:
        block = block_starting(prefix)
        outputs[prefix] = check(run_block(block, root, timeout=300), block).stdout
    assert "total 12.933 B" in outputs[RUN_HERE[0]] and "6.8 GiB" in outputs[RUN_HERE[0]]
    assert json.loads((root / "eval/qa/metrics.json").read_text())["n"] == 10
    assert (root / "eval/cap/metrics.json").is_file() and (root / "eval/ground/metrics.json").is_file()
    assert json.loads(outputs[RUN_HERE[2]].strip().splitlines()[-1])["samples"] == 1  # shards/: the videos/ clip
    # Every figure a plan line's comment states is what the command prints.
    plan = block_starting(RUN_HERE[4])
    for line in plan.text.splitlines():
        stated = FIGURE.findall(line.partition("#")[2])
        assert all(figure in outputs[RUN_HERE[4]] for figure in stated[:1]), (line, stated)
