"""What hostile inputs cost ``load_clip``: seconds and peak memory, per input, each in a fresh process.

The inputs are the ones tests/test_hostile_video.py builds (tests/badvideos.py): small files
that declare enormous work (a raw H.264 stream of 4000 skip frames at 8192x4880 with no
keyframe; an mp4 whose sample tables claim 60 million frames; a fragmented mp4 whose 'trun'
claims as many; an mp4 whose 'stco' claims 50 million chunks; a raw H.264 SPS declaring
16000x16000; one allowing 16 reference frames of 240 MB each), and paths that are no regular files (FIFO, /dev/zero, a directory, a symlink loop).

Each input is loaded by ``load_clip`` with its default arguments (and the flood once more with
``time_budget_s=2``) in a child process under a 6 GiB address-space limit and a 300 s timeout,
which reports the outcome, the seconds ``load_clip`` took (imports excluded) and its peak RSS
(``ru_maxrss``; the imports alone take about 240 MB). One run per input: these are outcomes
and orders of magnitude, not medians.

Usage: python bench/bench_hostile_video.py [--before REF] [--only TEXT]
    --before REF: also measure the loader as it is at git revision REF (its src/ is extracted
    to a temporary directory), side by side.
    --only TEXT: only the inputs whose description contains TEXT (e.g. "skip frames": the flood);
    their table replaces the "Subset" section of the results file, the full table stays.
Writes bench/results/hostile_video.md and prints it. Seconds are wall-clock; "CPU s" is the
child's own CPU time, the figure to compare on a shared, loaded machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))

import badvideos  # noqa: E402

LIMIT_BYTES = 6 << 30
TIMEOUT_S = 300

CHILD = r"""
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[3]), int(sys.argv[3])))
from videollama.data.video import load_clip
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start, cpu = time.monotonic(), time.process_time()
try:
    load_clip(sys.argv[1], **json.loads(sys.argv[2]))
    outcome = "loaded"
except Exception as error:
    outcome = getattr(error, "reason", type(error).__name__)
print(json.dumps({"outcome": outcome, "seconds": time.monotonic() - start, "cpu_seconds": time.process_time() - cpu,
                  "base_mb": before / 1024,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def inputs(tmp: Path) -> list[tuple[str, Path, dict]]:
    """(description, path, load_clip arguments) of every hostile input, written under ``tmp``."""
    files = [
        ("raw H.264: SPS 8192x4880, 4000 skip frames, no keyframe", "flood.h264", badvideos.skip_frame_flood),
        ("mp4: sample tables claim 60M frames", "claims.mp4", badvideos.mp4_claiming_frames),
        ("fragmented mp4: a trun claims 60M samples", "fragment.mp4", badvideos.fragmented_mp4_claiming_frames),
        ("mp4: stco claims 50M chunk offsets", "stco.mp4", badvideos.mp4_with_overlong_table),
        ("raw H.264: SPS declares 16000x16000", "huge.h264", badvideos.huge_sps_stream),
        ("raw H.264: SPS 8192x4880 4:4:4 10-bit, 16 reference frames, 300 reference skip frames", "refs.h264",
         badvideos.reference_flood),
    ]
    found = []
    for description, filename, make in files:
        path = tmp / filename
        path.write_bytes(make())
        found.append((f"{description} ({_size(path.stat().st_size)})", path, {}))
        if filename == "flood.h264":
            found.append((f"{description}, time_budget_s=2", path, {"time_budget_s": 2.0}))
    os.mkfifo(tmp / "fifo.mp4")
    (tmp / "folder.mp4").mkdir()
    (tmp / "loop.mp4").symlink_to(tmp / "loop2.mp4")
    (tmp / "loop2.mp4").symlink_to(tmp / "loop.mp4")
    found += [("FIFO", tmp / "fifo.mp4", {}), ("/dev/zero", Path("/dev/zero"), {}),
              ("directory", tmp / "folder.mp4", {}), ("symlink loop", tmp / "loop.mp4", {})]
    return found


def _size(n: int) -> str:
    return f"{n} B" if n < 1024 else f"{n / 1024:.1f} KB"


def measure(src: Path, path: Path, kwargs: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    try:
        done = subprocess.run([sys.executable, "-c", CHILD, str(path), json.dumps(kwargs), str(LIMIT_BYTES)],
                              env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"outcome": f"killed at {TIMEOUT_S} s", "seconds": float(TIMEOUT_S), "cpu_seconds": float("nan"),
                "peak_mb": float("nan")}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"outcome": f"died ({done.returncode})", "seconds": float("nan"), "cpu_seconds": float("nan"),
                "peak_mb": float("nan")}
    return json.loads(lines[-1])


def extract_src(ref: str, into: Path) -> Path:
    archive = subprocess.run(["git", "archive", ref, "src"], cwd=ROOT, capture_output=True, check=True).stdout
    with tempfile.TemporaryFile() as handle:
        handle.write(archive)
        handle.seek(0)
        with tarfile.open(fileobj=handle) as tar:
            tar.extractall(into, filter="data")
    return into / "src"


def cell(result: dict) -> list[str]:
    return [f"`{result['outcome']}`", f"{result['seconds']:.2f}", f"{result.get('cpu_seconds', float('nan')):.2f}",
            f"{result['peak_mb']:.0f}"]


def cpu_name() -> str:
    """The CPU's model name (Linux), its logical core count, and the load average at the start."""
    try:
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
    except OSError:
        names = []
    load = f", load average {os.getloadavg()[0]:.1f} at the start" if hasattr(os, "getloadavg") else ""
    return f"{names[0] if names else platform.processor() or platform.machine()} ({os.cpu_count()} logical cores{load})"


def write_results(text: str, subset: bool) -> None:
    """The full table replaces the file; a subset's replaces only the file's "Subset" section."""
    path = ROOT / "bench" / "results" / "hostile_video.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    if subset and path.exists():
        full = path.read_text().split("\n## Subset:")[0].rstrip("\n")
        text = full + "\n\n" + text
    from machine import stamped  # bench/machine.py: the CPU, its ISA, measured peak and bandwidth
    path.write_text(stamped(text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", metavar="REF", help="also measure the loader at this git revision")
    parser.add_argument("--only", metavar="TEXT", help="only the inputs whose description contains TEXT")
    args = parser.parse_args()
    cpu = cpu_name()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cases = [case for case in inputs(tmp) if args.only is None or args.only in case[0]]
        before_src = extract_src(args.before, tmp / "before") if args.before else None
        header = ["input"]
        if before_src:
            header += [f"before ({args.before}): outcome", "s", "CPU s", "peak RSS MB"]
        header += ["outcome", "s", "CPU s", "peak RSS MB"]
        rows = []
        for description, path, kwargs in cases:
            row = [description]
            if before_src:
                row += cell(measure(before_src, path, kwargs))
            row += cell(measure(ROOT / "src", path, kwargs))
            rows.append(row)
            print(" | ".join(row), flush=True)
    title = (f"## Subset: the inputs matching {args.only!r}" if args.only
             else "## Hostile inputs: what they cost `load_clip` (issue: bound the work per video)")
    lines = [
        title,
        "",
        f"Measured by `bench/bench_hostile_video.py{' --only ' + repr(args.only) if args.only else ''}` on {cpu}, "
        f"{platform.machine()}, Python {platform.python_version()}:",
        "one run per input, each in a fresh process (6 GiB address-space limit, 300 s timeout), "
        "`load_clip` with its default arguments (60 s budget, 3000-frame cap) unless the row says "
        "otherwise; seconds exclude imports; peak RSS includes the ~240 MB of the imports.",
        "",
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" for _ in header) + " |",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    text = "\n".join(lines) + "\n"
    write_results(text, subset=args.only is not None)
    print(text)


if __name__ == "__main__":
    main()
