"""The web chat UI's pieces without a browser (tests/test_ui_browser.py drives the page itself):
the messages it sends the engine, its bounds and errors, and `videollama chat` as a process."""

from __future__ import annotations

import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from videollama.cli import main
from videollama.serve import examples, ui

ROOT = Path(__file__).resolve().parents[1]


def test_engine_messages_put_the_video_on_the_first_user_turn():
    history = [{"role": "user", "content": "what color?"}, {"role": "assistant", "content": "red"},
               {"role": "user", "content": [{"type": "text", "text": "which way?"}]},
               {"role": "assistant", "content": "left"}]
    got = ui.engine_messages(history, b"VIDEO", "how many?")
    assert got == [
        {"role": "user", "content": [{"type": "video", "video": b"VIDEO"}, {"type": "text", "text": "what color?"}]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "which way?"},
        {"role": "assistant", "content": "left"},
        {"role": "user", "content": "how many?"},
    ]
    # The first question of a chat carries the video; without one, text only.
    assert ui.engine_messages([], b"V", "q") == [ui.video_message(b"V", "q")]
    assert ui.engine_messages([], None, "q") == [{"role": "user", "content": "q"}]


def test_frame_caption():
    assert ui.frame_caption(0, 0.5) == "frame 1 · 0.50 s"
    assert ui.frame_caption(3, 3.4999) == "frame 4 · 3.50 s"


def test_read_video_refuses_an_oversized_file(tmp_path):
    path = tmp_path / "big.mp4"
    path.write_bytes(b"x" * 101)
    with pytest.raises(ValueError, match=r"big\.mp4: 101 bytes, over the server's 100-byte cap .*--max-video-bytes"):
        ui.read_video(path, 100)
    path.write_bytes(b"x" * 100)
    assert ui.read_video(path, 100) == b"x" * 100


def test_example_videos_are_copied_into_the_served_folder(tmp_path):
    folder, scratch = tmp_path / "videos", tmp_path / "scratch"
    scratch.mkdir()
    with pytest.raises(NotADirectoryError, match="not a folder"):
        examples.example_videos(folder, scratch, 100)
    folder.mkdir()
    (folder / "notes.txt").write_text("not a video")
    with pytest.raises(ValueError, match="no video files"):
        examples.example_videos(folder, scratch, 100)
    (folder / "b.mp4").write_bytes(b"B")
    (folder / "a.MOV").write_bytes(b"A")
    got = examples.example_videos(folder, scratch, 100)
    assert got == [scratch / "a.MOV", scratch / "b.mp4"] and got[0].read_bytes() == b"A"
    assert not (scratch / "notes.txt").exists()
    (folder / "c.mp4").write_bytes(b"C" * 101)
    with pytest.raises(ValueError, match=r"c\.mp4: 101 bytes, over the server's 100-byte cap"):
        examples.example_videos(folder, scratch, 100)


def test_shapes_examples_decode(tmp_path):
    from videollama.data import load_clip

    paths = examples.shapes_examples(tmp_path, n=2, seed=1)
    assert [p.name for p in paths] == ["shapes-0.mp4", "shapes-1.mp4"]
    frames, times = load_clip(paths[0], num_frames=4, fps=1.0, size=32)
    assert frames.shape == (4, 3, 32, 32) and times.tolist() == [0.5, 1.5, 2.5, 3.5]
    assert paths[0].read_bytes() != paths[1].read_bytes()


def test_chat_command_user_errors(tmp_path, capsys):
    assert main(["chat", "--model", str(tmp_path), "--port", "70000"]) == 2
    assert "--port must be 0 to 65535, got 70000" in capsys.readouterr().err
    assert main(["chat", "--model", str(tmp_path / "nothing")]) == 2
    assert "is not a model directory (no config.json)" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    assert main(["chat", "--model", str(tmp_path), "--examples", str(tmp_path / "none")]) == 2
    assert "--examples" in capsys.readouterr().err


@pytest.mark.slow
def test_chat_command_serves_the_page_and_the_api(tmp_path):
    """`videollama chat` as a user runs it: page and API on one port, stopped by Ctrl-C (exit 0)."""
    import httpx
    import torch

    from videollama.config import VideoLlamaConfig
    from videollama.data import shapes
    from videollama.data.tokenizer import train_tokenizer
    from videollama.model import VideoLlama

    specs = [shapes.sample_clip_spec(random.Random(i)) for i in range(8)]
    tok = train_tokenizer([shapes.caption(s) for s in specs] * 4, vocab_size=300)
    torch.manual_seed(0)
    cfg = VideoLlamaConfig.from_name("tiny").with_overrides({"decoder.vocab_size": tok.get_vocab_size()})
    VideoLlama(cfg).save_pretrained(tmp_path / "model", tokenizer=tok)

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "GRADIO_TEMP_DIR": str(tmp_path / "gradio")}
    proc = subprocess.Popen([sys.executable, "-m", "videollama.cli", "chat", "--model", str(tmp_path / "model"),
                             "--port", "0", "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        deadline, url, seen = time.monotonic() + 90, None, []
        while url is None and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                if proc.poll() is not None:
                    break
                continue
            seen.append(line)
            if line.startswith("videollama chat: serving"):
                url = line.split(" at ", 1)[1].split()[0]
        assert url and url.startswith("http://127.0.0.1:"), "".join(seen)
        page = httpx.get(url, timeout=30)
        assert page.status_code == 200 and "gradio" in page.text
        assert httpx.get(url + "config", timeout=30).json()["title"] == "VideoLlama chat"
        models = httpx.get(url + "v1/models", timeout=30).json()
        assert models["data"][0]["id"] == "model"
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            code = None
        time.sleep(0.5)  # the reader thread drains what the process printed last
        while not lines.empty():
            seen.append(lines.get())
        assert code == 0, "".join(seen)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
