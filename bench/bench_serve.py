"""`videollama serve` throughput and latency, against `generate()` called directly.

A random ``small``-preset model (about 40M parameters, 16 frames of 96x96, decoder 8 x 384) is
saved with a tokenizer; its end-of-sequence id is set to one the model never emits, so that every
request generates exactly ``NEW`` tokens. The server runs as ``videollama serve`` in its own
process (as deployed); clients are threads of this process using the official ``openai`` client,
each sending the same question about one video (a data URL: after the first request the video
cache serves its encoder output and cross-attention K/V, so the figures are decoding's).

* direct: ``generate()`` at batch 1 on the same prompt, with the video's latents precomputed;
* HTTP batch-1: one client, requests back to back, on a server with ``--max-batch 1`` and on the
  ``--max-batch 16`` server (whose static-shape step always runs 16 rows);
* concurrency C in 1, 4, 8, 16: C clients, each sending ``PER_CLIENT`` requests back to back, on the
  ``--max-batch 16`` server: generated tokens per second over the wall time, p50/p99 latency.

torch runs single-threaded in every process (``OMP_NUM_THREADS=1``): on this shared 2-core
machine two OpenMP threads per process under oversubscription made a decode step about 15x slower
(measured: 32 tokens of direct ``generate`` in 15 s against 1.0 s), which would measure the
machine's load, not the server.

Results: bench/results/serve.md.
"""

from __future__ import annotations

import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from videollama.config import VideoLlamaConfig  # noqa: E402
from videollama.data import load_clip, shapes  # noqa: E402
from videollama.data.tokenizer import encode_prompt, train_tokenizer, videoqa_prompt  # noqa: E402
from videollama.model.generate import generate  # noqa: E402
from videollama.model.videollama import VideoLlama  # noqa: E402

NEW = 32
MAX_MODEL_LEN = 128  # the servers' KV-cache rows: prompt (~20) + 32 new fit
REPEATS = 8
PER_CLIENT = 4
CONCURRENCY = (1, 4, 8, 16)
QUESTION = "which way does the red square move?"
WORDS = "a red green blue square circle triangle moves left right up down what color shape is the which way"


def build(directory: Path) -> tuple[VideoLlama, object]:
    torch.manual_seed(0)
    config = VideoLlamaConfig.from_name("small")
    never = config.decoder.vocab_size - 1
    config = VideoLlamaConfig.from_dict({**config.to_dict(),
                                         "decoder": {**config.to_dict()["decoder"], "eos_token_id": never}})
    model = VideoLlama(config).eval()
    tok = train_tokenizer([WORDS] * 20, vocab_size=config.decoder.vocab_size)
    with torch.no_grad():  # real words only, and never the (unused) end-of-sequence id
        model.lm_head.weight[tok.get_vocab_size():] = 0
    model.save_pretrained(directory)
    tok.save(str(directory / "tokenizer.json"))
    return model, tok


def start_server(model_dir: Path, port: int, max_batch: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "videollama.cli", "serve", "--model", str(model_dir), "--port",
                             str(port), "--max-batch", str(max_batch), "--max-queue", "64", "--device", "cpu",
                             "--max-model-len", str(MAX_MODEL_LEN)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not start")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def ask(client, messages) -> float:
    start = time.perf_counter()
    r = client.chat.completions.create(model="model", messages=messages, max_tokens=NEW, temperature=0)
    if r.usage.completion_tokens != NEW:
        raise RuntimeError(f"expected {NEW} tokens, got {r.usage.completion_tokens}")
    return time.perf_counter() - start


def load(port: int, messages, concurrency: int, per_client: int) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)

    def one_client(_):
        return [ask(client, messages) for _ in range(per_client)]

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = [t for ts in pool.map(one_client, range(concurrency)) for t in ts]
    wall = time.perf_counter() - start
    latencies.sort()
    return {"tps": len(latencies) * NEW / wall, "p50": statistics.median(latencies),
            "p99": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))], "n": len(latencies)}


def main() -> None:
    import base64
    import socket

    torch.set_num_threads(1)  # as the server (OMP_NUM_THREADS=1): see the module docstring
    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    model, tok = build(tmp / "model")
    mp4 = shapes.encode_mp4(shapes.iter_frames(shapes.sample_clip_spec(random.Random(7))))
    url = "data:video/mp4;base64," + base64.b64encode(mp4).decode()
    messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                             {"type": "text", "text": QUESTION}]}]

    # Direct generate at batch 1, the video's latents computed once (as the server's cache does).
    pre = model.config.preprocess
    frames, _ = load_clip(mp4, num_frames=pre.num_frames, fps=pre.fps, size=pre.size, mean=pre.mean, std=pre.std)
    ids = torch.tensor([encode_prompt(tok, videoqa_prompt(QUESTION))])
    with torch.inference_mode():
        latents = model.encode_video(frames[None])

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rows = {}
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
    # Batch 1, direct and over HTTP, interleaved (the server idles while generate runs), so that
    # the shared machine's load varies alike for both.
    proc = start_server(tmp / "model", port, 1)
    try:
        load(port, messages, 1, 2)  # warm-up: decode worker, video cache
        direct, http1 = [], []
        for _ in range(REPEATS + 1):
            start = time.perf_counter()
            out = generate(model, ids, max_new_tokens=NEW, eos_token_id=model.config.decoder.eos_token_id,
                           visual_latents=latents)
            direct.append(time.perf_counter() - start)
            assert out.shape[1] == NEW
            http1.append(ask(client, messages))
    finally:
        stop(proc)
    direct, http1 = sorted(direct[1:]), sorted(http1[1:])
    direct_tps = NEW / statistics.median(direct)
    rows[("batch1", 1)] = {"tps": NEW / statistics.median(http1), "p50": statistics.median(http1),
                           "p99": http1[-1], "n": len(http1)}
    del model
    proc = start_server(tmp / "model", port, 16)
    try:
        load(port, messages, 1, 2)
        for c in CONCURRENCY:
            rows[("conc", c)] = load(port, messages, c, PER_CLIENT)
        rows[("batch1", 16)] = rows[("conc", 1)]
    finally:
        stop(proc)

    b1, b16 = rows[("batch1", 1)]["tps"], rows[("batch1", 16)]["tps"]
    c1, c8 = rows[("conc", 1)]["tps"], rows[("conc", 8)]["tps"]
    lines = [
        "## Serving (`videollama serve`)",
        "",
        f"`bench/bench_serve.py`: a random `small`-preset model (16 frames of {pre.size}x{pre.size}, decoder 8 x 384), "
        f"{NEW} new tokens per request, one question about one video (data URL; video cache warm), server in its own "
        f"process with `--max-model-len {MAX_MODEL_LEN}`, clients = threads with the `openai` client. {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs (shared), torch {torch.__version__}, CPU, torch single-threaded.",
        "",
        "| setting | tokens/s | p50 latency (s) | p99 latency (s) | requests |",
        "|---|---:|---:|---:|---:|",
        f"| direct `generate()`, batch 1 | {direct_tps:.1f} | {statistics.median(direct):.3f} | {direct[-1]:.3f} | "
        f"{len(direct)} |",
        *(f"| HTTP, 1 client, `--max-batch {mb}` | {r['tps']:.1f} | {r['p50']:.3f} | {r['p99']:.3f} | {r['n']} |"
          for (kind, mb), r in rows.items() if kind == "batch1" and mb == 1),
        *(f"| HTTP, {c} concurrent clients, `--max-batch 16` | {r['tps']:.1f} | {r['p50']:.3f} | {r['p99']:.3f} | "
          f"{r['n']} |" for (kind, c), r in rows.items() if kind == "conc"),
        "",
        f"- HTTP batch-1 vs direct generate (tokens/s of medians, interleaved): **{b1 / direct_tps:.0%}** with "
        f"`--max-batch 1`; {b16 / direct_tps:.0%} for one client on the `--max-batch 16` server (target >= 80%).",
        f"- Concurrency 8 vs 1 throughput on one `--max-batch 16` server: **{c8 / c1:.1f}x** (target >= 4x); "
        f"8 clients on it vs 1 client on the `--max-batch 1` server: **{c8 / b1:.1f}x**.",
        "- The static-shape decode step always runs all `--max-batch` rows (so that a compiled step never "
        "recompiles): on this CPU one client pays for 16 rows on the `--max-batch 16` server; on a GPU a step's "
        "cost should depend far less on the row count (not measured: no GPU here). Both servers are in the table.",
    ]
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "serve.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
