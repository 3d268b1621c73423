"""Helpers of the serve tests: a tiny saved model directory with a trained tokenizer, a live
uvicorn server on 127.0.0.1 in a thread, and video data URLs."""

from __future__ import annotations

import base64
import socket
import threading
import time
from pathlib import Path

import torch

from videollama.config import VideoLlamaConfig
from videollama.data.tokenizer import train_tokenizer
from videollama.model.videollama import VideoLlama

WORDS = ("a red green blue yellow square circle triangle moves left right up down stays still what color "
         "shape is the which way does object how many objects are there one two three in video")


def build_model_dir(path: Path) -> Path:
    """A random tiny model saved with save_pretrained, plus tokenizer.json. Its logits for unused
    ids and for specials other than EOS are zeroed so that it speaks (random) words."""
    torch.manual_seed(0)
    config = VideoLlamaConfig.from_name("tiny")
    model = VideoLlama(config).eval()
    tokenizer = train_tokenizer([WORDS] * 20, vocab_size=config.decoder.vocab_size)
    with torch.no_grad():
        model.lm_head.weight[tokenizer.get_vocab_size():] = 0
        model.lm_head.weight[[0, 1, 3, 4, 5, 6]] = 0
    model.save_pretrained(path)
    tokenizer.save(str(path / "tokenizer.json"))
    return path


def data_url(data: bytes) -> str:
    return "data:video/mp4;base64," + base64.b64encode(data).decode()


def video_message(data: bytes, question: str) -> dict:
    return {"role": "user", "content": [{"type": "video_url", "video_url": {"url": data_url(data)}},
                                        {"type": "text", "text": question}]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """``create_app(engine)`` under uvicorn on 127.0.0.1:free port, in a thread; a context manager
    that starts the engine and stops both."""

    def __init__(self, engine, api_key: str | None = None, **app_options) -> None:
        import uvicorn

        from videollama.serve.app import create_app

        self.engine, self.api_key, self.port = engine, api_key, free_port()
        config = uvicorn.Config(create_app(engine, api_key=api_key, **app_options), host="127.0.0.1", port=self.port,
                                log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kwargs):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=kwargs.pop("api_key", self.api_key or "none"),
                      max_retries=0, timeout=kwargs.pop("timeout", 60), **kwargs)

    def __enter__(self) -> LiveServer:
        self.engine.start()
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.engine.close()
