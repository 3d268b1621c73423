"""Compile cost paid once: the first and the second start of `generate --compile` and `serve --compile`.

A random ``small``-preset model directory (bench_serve.build) and an empty cache directory
(``VIDEOLLAMA_CACHE``; inductor's caches go under it too). Each command then starts twice, as
separate processes, one after the other:

* ``videollama generate --compile --quantize int8`` (a question without a video, 32 new tokens):
  the warm-up it reports on stderr (choosing the step and compiling it, or reading the choice
  and loading the compiled graph) and the command's wall time;
* ``videollama serve --compile --max-batch MAX_BATCH``: the warm-up it logs before serving (every
  batch bucket, with and without a video row) and the time until ``/health`` answers.

The first start measures and compiles; the second reads the choices from the cache directory and
loads the compiled graphs from inductor's caches (only dynamo's tracing is paid again). Results:
bench/results/compile_cache.md.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import machine  # noqa: E402
from bench_serve import QUESTION, build  # noqa: E402

MAX_BATCH = 2
NEW = 32
TIMEOUT_S = 3600
WARM = re.compile(r"warm-up ([0-9.]+) s")


def env(cache: Path) -> dict:
    out = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "VIDEOLLAMA_CACHE": str(cache)}
    out.pop("TORCHINDUCTOR_CACHE_DIR", None)  # ours, under the cache directory
    out.pop("VIDEOLLAMA_STEP", None)
    return out


def generate_once(model: Path, cache: Path) -> dict:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "videollama.cli", "generate", "--model", str(model), "--compile",
                           "--quantize", "int8", "--template", "videoqa", "--prompt", QUESTION,
                           "--max-new-tokens", str(NEW)], env=env(cache), capture_output=True, text=True,
                          timeout=TIMEOUT_S, check=True)
    warm = [float(m.group(1)) for m in WARM.finditer(done.stderr)]
    steps = [line for line in done.stderr.splitlines() if line.startswith("decode step:")]
    return {"wall": time.perf_counter() - start, "warm": sum(warm), "steps": steps}


def serve_once(model: Path, cache: Path, log: Path) -> dict:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "videollama.cli", "serve", "--model", str(model), "--port",
                                 str(port), "--compile", "--max-batch", str(MAX_BATCH), "--max-model-len", "128",
                                 "--device", "cpu"], env=env(cache), stdout=subprocess.DEVNULL, stderr=err)
    try:
        while time.perf_counter() - start < TIMEOUT_S:
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited ({proc.returncode}): {log.read_text()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        ready = time.perf_counter() - start
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    text = log.read_text()
    warm = [float(m.group(1)) for m in re.finditer(r"warm-up ([0-9.]+) s: ", text)]
    choices = [line.split("generate: ", 1)[-1] for line in text.splitlines() if "decode step at" in line]
    return {"ready": ready, "warm": warm[-1] if warm else float("nan"), "steps": choices}


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="bench_compile_cache_"))
    build(tmp / "model")
    runs = {"generate": [], "serve": []}
    cache = tmp / "cache-generate"
    for _ in range(2):
        runs["generate"].append(generate_once(tmp / "model", cache))
        print(runs["generate"][-1], flush=True)
    cache = tmp / "cache-serve"
    for i in range(2):
        runs["serve"].append(serve_once(tmp / "model", cache, tmp / f"serve-{i}.log"))
        print(runs["serve"][-1], flush=True)
    g, s = runs["generate"], runs["serve"]
    lines = [
        "## Compile cost paid once (`--compile`, first and second start)",
        "",
        "`bench/bench_compile_cache.py`: a random `small`-preset model directory and an empty cache directory "
        "(`VIDEOLLAMA_CACHE`, inductor's FX-graph and AOT caches under it); each command started twice, one "
        "process after the other. The first start measures (int8 implementation per weight shape, compiled vs "
        "eager step per shape) and compiles; the second reads those choices and loads the compiled graphs "
        "(dynamo's tracing is paid again). torch single-threaded (`OMP_NUM_THREADS=1`).",
        "",
        "| command | warm-up, first start (s) | warm-up, second start (s) | second / first | first start, total "
        "(s) | second start, total (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        f"| `generate --compile --quantize int8` (32 new tokens, no video) | {g[0]['warm']:.1f} | {g[1]['warm']:.1f} | "
        f"**{g[1]['warm'] / g[0]['warm']:.2f}** | {g[0]['wall']:.1f} (command) | {g[1]['wall']:.1f} |",
        f"| `serve --compile --max-batch {MAX_BATCH}` (buckets 1..{MAX_BATCH}, with and without video) | "
        f"{s[0]['warm']:.1f} | {s[1]['warm']:.1f} | **{s[1]['warm'] / s[0]['warm']:.2f}** | {s[0]['ready']:.1f} "
        f"(to /health) | {s[1]['ready']:.1f} |",
        "",
        "Target: second start's warm-up at most a tenth of the first's (second / first <= 0.10).",
        "",
        "What the first start chose (the second start reads the same):",
        "",
        *(f"- generate: {line}" for line in g[0]["steps"]),
        *(f"- serve: {line}" for line in s[0]["steps"]),
    ]
    machine.write_result("compile_cache", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
