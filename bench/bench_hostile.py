"""Hostile input: every kind of bad input the tests build, through every path that reads it.

Paths: ``load_clip`` (a call), the shard loader (``VideoTextLoader`` over a tar holding the bad
sample beside a good one), ``videollama eval`` (a JSONL line pointing at it) and ``videollama
generate --video``; plus the bad text inputs (JSONL lines, prompts, FIFOs and devices, paths out
of their root). Each (kind, path) runs in a fresh child process, so its peak RSS is its own
(``ru_maxrss`` from ``wait4``); it is killed after ``HANG_S`` seconds (a hang) and its address
space is capped at ``AS_CAP`` so that a pre-fix blow-up cannot take the machine down (an
allocation failure under the cap counts as a crash). Outcomes: ``rejected`` (the clear error,
or skip, the path promises), ``ok`` (the input was fine for that path), ``crash`` (a traceback or
an unexpected exit code), ``hang``.

Targets (issue 11): crashes 0, hangs 0; every video rejected within its time budget (default
60 s, most well under 1 s) with peak RSS under 1 GB.

The servers' half (bench/hostile_serve.py and hostile_chat.py: hostile clients against a real ``videollama serve``
and ``videollama chat``, /health watched throughout, RSS growth per hostile request) writes
bench/results/hostile_serve.md. ``--only inputs`` or ``--only serve`` runs one half; ``--scale``
shrinks the server cases' sizes (1: the sizes of the issue, 60 MiB bodies).
"""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

HANG_S = 120.0
AS_CAP = 8 * 2**30

CHILD = r"""
import json, os, sys
sys.path.insert(0, {src!r}); sys.path.insert(0, {tests!r})
path, kind, work = sys.argv[1], sys.argv[2], {work!r}
out = {{"path": path, "kind": kind}}
if path == "load_clip":
    from videollama.data.errors import BadSample
    from videollama.data.video import load_clip
    try:
        load_clip(os.path.join(work, "videos", kind + ".mp4"), num_frames=16, fps=4.0, size=64)
        out["outcome"] = "ok"
    except (BadSample, FileNotFoundError) as e:
        out["outcome"], out["reason"] = "rejected", getattr(e, "reason", "missing")
elif path == "loader":
    from videollama.data.loader import VideoTextLoader
    from videollama.data.tokenizer import load_tokenizer
    loader = VideoTextLoader(os.path.join(work, "shards", kind + ".tar"), tokenizer=load_tokenizer(os.path.join(work, "model")),
                             preprocess=__import__("videollama.config", fromlist=["x"]).PreprocessConfig(num_frames=4, fps=1.0, size=64),
                             batch_size=1, max_len=128, epochs=1, skip_budget=1.0, train=False)
    batches = list(loader)
    out["outcome"] = "rejected" if loader.skipped else "ok"
    out["reason"] = ",".join(sorted(loader.skipped))
    out["batches"] = len(batches)
else:
    from videollama.cli import main
    rc = main(json.load(open(sys.argv[3])))  # a file: a 100 MB argument is over the OS's limit
    out["rc"] = rc
    if path == "eval":
        m = json.load(open(os.path.join(work, "eval-" + kind, "metrics.json")))
        out["outcome"] = "rejected" if m["skipped"] else "ok"
        out["reason"] = ",".join(sorted(m["skipped_by_reason"]))
    else:
        out["outcome"] = "rejected" if rc == 2 else "ok" if rc == 0 else "crash"
print("RESULT " + json.dumps(out))
"""


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (AS_CAP, AS_CAP))


def run_child(work: Path, path: str, kind: str, argv: list[str] | None = None) -> dict:
    code = CHILD.format(src=str(ROOT / "src"), tests=str(ROOT / "tests"), work=str(work))
    argv_file = work / f"argv-{path}-{kind}.json"
    argv_file.write_text(json.dumps(argv or []))
    cmd = [sys.executable, "-c", code, path, kind, str(argv_file)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=_limit_memory, start_new_session=True)
    chunks: dict[str, list[str]] = {"out": [], "err": []}
    readers = [threading.Thread(target=lambda f=f, k=k: chunks[k].append(f.read()), daemon=True)
               for f, k in ((proc.stdout, "out"), (proc.stderr, "err"))]
    for t in readers:
        t.start()
    hung, usage = False, None
    while True:  # wait4: this child's own peak RSS, whatever other children did
        pid, _status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() - t0 > HANG_S:
            hung = True
            os.killpg(proc.pid, signal.SIGKILL)
            _, _status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.01)
    proc.returncode = 0  # reaped above
    for t in readers:
        t.join()
    seconds = time.perf_counter() - t0
    stdout, stderr = "".join(chunks["out"]), "".join(chunks["err"])
    line = next((ln for ln in stdout.splitlines() if ln.startswith("RESULT ")), None)
    result = json.loads(line[7:]) if line else {"path": path, "kind": kind}
    if hung:
        result["outcome"] = "hang"
    elif line is None or "Traceback" in stderr:
        result["outcome"] = "crash"
        result["stderr"] = stderr[-600:]
    errors = [ln for ln in stderr.splitlines() if ln.startswith("videollama: error: ")]
    if errors and not result.get("reason"):  # the CLI's one line ends with the BadSample's [reason]
        found = re.search(r"\[(\w+)\]$", errors[-1].strip())
        result["reason"] = found.group(1) if found else "one-line error"
    result["seconds"] = seconds
    result["peak_rss_mb"] = usage.ru_maxrss / 1024  # kilobytes on Linux
    return result


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("all", "inputs", "serve"), default="all")
    parser.add_argument("--scale", type=float, default=1.0, help="size of the server cases (1: the issue's)")
    args = parser.parse_args()
    if args.only in ("all", "serve"):
        import hostile_serve

        hostile_serve.main(args.scale, ROOT / "bench" / "results" / "hostile_serve.md", _build_model, _serve_media)
    return run_inputs() if args.only in ("all", "inputs") else 0


def _serve_media(folder: Path) -> None:
    import badvideos

    folder.joinpath("good.mp4").write_bytes(
        badvideos.encode_video(num_frames=25, frame_fn=lambda i, w, h: badvideos.pattern_frame(i, w, h)))
    if hasattr(badvideos, "skip_frame_flood"):
        folder.joinpath("skip_frame_flood.mp4").write_bytes(badvideos.skip_frame_flood())


def run_inputs() -> int:
    import badvideos  # tests/badvideos.py: the builders the tests use
    from videollama.data.writer import write_shards

    work = Path(tempfile.mkdtemp(prefix="videollama-hostile-"))
    (work / "videos").mkdir()
    (work / "shards").mkdir()
    _build_model(work / "model")
    good = badvideos.encode_video(num_frames=25, frame_fn=lambda i, w, h: badvideos.pattern_frame(i, w, h))
    (work / "videos" / "good.mp4").write_bytes(good)

    video_kinds = {name: builder for name, (builder, _) in badvideos.BAD_VIDEOS.items()}
    video_kinds.update({name: getattr(badvideos, name) for name in
                        ("skip_frame_flood", "reference_flood", "huge_sps_stream", "mp4_claiming_frames",
                         "mp4_with_overlong_table",
                         "fragmented_mp4_claiming_frames") if hasattr(badvideos, name)})
    for name, build in video_kinds.items():
        data = build()
        (work / "videos" / f"{name}.mp4").write_bytes(data)
        write_shards([("good", good, {"caption": "a good clip."}), ("bad", data, {"caption": "a bad clip."})],
                     work / "shards" / name, prefix="x")
        os.replace(work / "shards" / name / "x-000000.tar", work / "shards" / f"{name}.tar")
    # Not regular files where a video should be.
    os.mkfifo(work / "videos" / "fifo.mp4")
    os.symlink("/dev/zero", work / "videos" / "dev_zero.mp4")
    os.mkdir(work / "videos" / "directory.mp4")
    os.symlink(work / "videos" / "loop_b.mp4", work / "videos" / "loop_a.mp4")
    os.symlink(work / "videos" / "loop_a.mp4", work / "videos" / "loop_b.mp4")
    special = ["fifo", "dev_zero", "directory", "loop_a"]

    results = []
    model = str(work / "model")
    for kind in [*video_kinds, *special]:
        results.append(run_child(work, "load_clip", kind))
        if kind in video_kinds:
            results.append(run_child(work, "loader", kind))
        line = {"video": f"videos/{kind}.mp4", "question": "what moves?", "answer": "x"}
        (work / f"{kind}.jsonl").write_text(json.dumps(line) + "\n")
        results.append(run_child(work, "eval", kind, ["eval", "--model", model, "--task", "videoqa", "--data",
                                                      str(work / f"{kind}.jsonl"), "--out", str(work / f"eval-{kind}")]))
        results.append(run_child(work, "generate", kind, ["generate", "--model", model, "--prompt", "what moves?",
                                                          "--video", str(work / "videos" / f"{kind}.mp4")]))
    results += _text_cases(work, model)
    write_results(results)
    return 0


def _text_cases(work: Path, model: str) -> list[dict]:
    """Bad JSONL lines, prompts, paths out of their root, special files where a JSONL/tar should be."""
    good = {"video": "videos/good.mp4", "question": "what moves?", "answer": "x"}
    lines = {
        "question_100MB": json.dumps({**good, "question": "q" * 100_000_000}).encode(),
        "nested_json": b"[" * 200_000 + b"]" * 200_000,
        "non_utf8": b'{"video": "videos/good.mp4", "question": "caf\xe9?", "answer": "x"}',
        "dotdot_path": json.dumps({**good, "video": "../../../../etc/passwd"}).encode(),
        "absolute_path": json.dumps({**good, "video": "/etc/passwd"}).encode(),
        "symlink_out": json.dumps({**good, "video": "videos/link_out.mp4"}).encode(),
        "question_over_context": json.dumps({**good, "question": "what " * 3000}).encode(),
    }
    os.symlink("/etc/hostname", work / "videos" / "link_out.mp4")
    out = []
    for kind, line in lines.items():
        (work / f"{kind}.jsonl").write_bytes(line + b"\n" + json.dumps(good).encode() + b"\n")
        out.append(run_child(work, "eval", kind, ["eval", "--model", model, "--task", "videoqa", "--data",
                                                  str(work / f"{kind}.jsonl"), "--out", str(work / f"eval-{kind}")]))
    os.mkfifo(work / "fifo_jsonl.jsonl")
    os.symlink("/dev/zero", work / "dev_zero_jsonl.jsonl")
    for kind in ("fifo_jsonl", "dev_zero_jsonl"):
        out.append(run_child(work, "generate", kind, ["eval", "--model", model, "--task", "videoqa", "--data",
                                                      str(work / f"{kind}.jsonl"), "--out", str(work / f"eval-{kind}")]))
        out[-1]["path"] = "eval"
    out.append(run_child(work, "generate", "prompt_100MB", ["generate", "--model", model, "--prompt", "q" * 100_000_000]))
    return out


def _build_model(directory: Path) -> None:
    from videollama import VideoLlama, VideoLlamaConfig
    from videollama.data.tokenizer import train_tokenizer

    tok = train_tokenizer(["what moves? a red square moves left."] * 8, vocab_size=300)
    cfg = VideoLlamaConfig.from_name("shapes").with_overrides({"decoder.vocab_size": tok.get_vocab_size()})
    VideoLlama(cfg).save_pretrained(directory, tokenizer=tok)


def write_results(results: list[dict]) -> None:
    crashes = [r for r in results if r["outcome"] == "crash"]
    hangs = [r for r in results if r["outcome"] == "hang"]
    lines = [
        "## Hostile input (`bench/bench_hostile.py`)",
        "",
        f"{len({r['kind'] for r in results})} kinds of bad input, {len(results)} (kind, path) runs, each in a fresh "
        f"process on {platform.machine()} ({os.cpu_count()} cores): **crashes {len(crashes)}, hangs {len(hangs)}**. "
        "Peak RSS is the child process's own maximum resident set (it includes the ~300 MB of Python, "
        "torch and PyAV that every run imports); seconds are wall time of the whole child, start-up "
        "included (about 2-3 s of imports for eval and generate, which also load a tiny model). The "
        "loader, eval and generate read the `shapes` preset's 4 frames at 1 FPS, so a file that is only "
        "too long to decode for 16 frames at 4 FPS (`too_many_frames`) is fine for them (`ok`).",
        "",
        "| kind | path | outcome | reason | seconds | peak RSS (MB) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        rss = f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") else "?"
        lines.append(f"| {r['kind']} | {r['path']} | {r['outcome']} | {r.get('reason', '') or ''} | "
                     f"{r['seconds']:.2f} | {rss} |")
    worst = max((r.get("peak_rss_mb") or 0) for r in results)
    slowest = max(results, key=lambda r: r["seconds"])
    lines += ["", f"Largest peak RSS {worst:.0f} MB; slowest run {slowest['kind']} through {slowest['path']} "
                  f"({slowest['seconds']:.1f} s)."]
    for r in crashes:
        lines.append(f"\ncrash: {r['kind']} through {r['path']}: `{r.get('stderr', '')[-300:]}`")
    out = ROOT / "bench" / "results" / "hostile.md"
    from machine import stamped  # bench/machine.py: the CPU, its ISA, measured peak and bandwidth
    out.write_text(stamped("\n".join(lines) + "\n"))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
