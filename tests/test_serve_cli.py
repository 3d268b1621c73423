"""`videollama serve` as a command: its options, its one-line errors, a real start on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from serving import build_model_dir, free_port
from videollama.cli import main

pytestmark = pytest.mark.usefixtures("no_hang")
SRC = str(Path(__file__).resolve().parents[1] / "src")


def test_help_lists_every_limit(capsys):
    from dataclasses import fields

    from videollama.serve.limits import ServeLimits

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for f in fields(ServeLimits):
        assert "--" + f.name.replace("_", "-") in out
    assert "127.0.0.1" in out


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path)]) == 2
    assert "not a model directory" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path), "--max-queue", "0"]) == 2
    assert "max_queue must be > 0" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["serve", "chat"])
@pytest.mark.parametrize("option, value, message", [
    ("--max-batch", "1000000", "max_batch must be at most 1024"),
    ("--request-timeout-s", "nan", "request_timeout_s must be a finite number"),
    ("--fetch-timeout-s", "-1", "fetch_timeout_s must be > 0"),
    ("--decode-timeout-s", "inf", "decode_timeout_s must be a finite number"),
    ("--body-timeout-s", "1e9", "body_timeout_s must be at most"),
    ("--device", "cuda", "CUDA is not available"),
    ("--device", "tpu", "--device tpu"),
    ("--allowed-hosts", "a b", "is not a host name"),
])
def test_numbers_and_devices_that_cannot_serve_are_one_line_errors(tmp_path, capsys, command, option, value, message):
    """Before the model loads: no traceback, no server with no deadline, no million-row KV cache."""
    import torch

    if value == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    model = build_model_dir(tmp_path / "model") if option == "--device" else tmp_path
    (model / "config.json").write_text((model / "config.json").read_text() if option == "--device" else "{}")
    assert main([command, "--model", str(model), option, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith("videollama: error: ") and message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_serve_starts_on_loopback_and_checks_the_key(tmp_path):
    model_dir = build_model_dir(tmp_path / "model")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": SRC, "VIDEOLLAMA_API_KEY": "sekrit"}
    proc = subprocess.Popen([sys.executable, "-m", "videollama.cli", "serve", "--model", str(model_dir),
                             "--port", str(port), "--device", "cpu"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
        assert httpx.get(url + "/v1/models").status_code == 401  # the key from the environment
        models = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer sekrit"}).json()
        assert [m["id"] for m in models["data"]] == ["model"]
        r = httpx.post(url + "/v1/chat/completions", headers={"Authorization": "Bearer sekrit"},
                       json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert f"http://127.0.0.1:{port}" in out  # bound to loopback
