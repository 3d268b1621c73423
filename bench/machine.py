"""The machine a benchmark ran on, measured, for the line every results table ends with.

:func:`describe` measures, once per process and with one thread: the fp32 peak (the best of a
few 1024 x 1024 x 1024 float32 matmuls, GFLOP/s) and the read bandwidth (the best of a few sums
of a 512 MiB tensor, GB/s); with the CPU model, the instruction set our int8 kernel is built for
and ATen's (:mod:`videollama.inference.host`), the core count and the load average. Every
benchmark that writes a table writes it through :func:`write_result`, which appends
:func:`stamp`: the CPU, the ISA in use, those two figures, and which instruction sets could not
be run here (this host's best ISA is the highest one measurable; a lower one can be forced with
``VIDEOLLAMA_ISA`` and ``ATEN_CPU_CAPABILITY``, a higher one cannot be emulated).
"""

from __future__ import annotations

import os
import platform
import sys
import time
from functools import cache
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from videollama.inference import host  # noqa: E402

RESULTS = ROOT / "bench" / "results"
MARK = "_Machine:"  # how bench/run.py knows a section carries its machine line


def _one_thread(fn):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def peak_gflops(n: int = 1024, reps: int = 5) -> float:
    """fp32 GFLOP/s of the best of ``reps`` n x n x n matmuls on one thread."""
    a, b = torch.randn(n, n), torch.randn(n, n)

    def run() -> float:
        a @ b  # warm
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
        return 2 * n ** 3 / best / 1e9

    return _one_thread(run)


def read_bandwidth(nbytes: int = 512 * 2**20, reps: int = 5) -> float:
    """GB/s of the best of ``reps`` sums of an ``nbytes`` float32 tensor on one thread."""
    a = torch.ones(nbytes // 4)

    def run() -> float:
        a.sum()
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            a.sum()
            best = min(best, time.perf_counter() - t)
        return nbytes / best / 1e9

    return _one_thread(run)


@cache
def describe() -> dict:
    """The machine, measured once per process."""
    return {"cpu": host.cpu_model(), "arch": platform.machine(), "cores": os.cpu_count(), "isa": host.isa(),
            "aten_isa": host.aten_isa(), "has_avx512": "avx512f" in host.cpu_flags(),
            "gflops": peak_gflops(), "read_gbs": read_bandwidth(), "load": os.getloadavg()[0],
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}


def not_run(m: dict) -> str:
    """Which instruction sets' code paths this machine could not run, in words."""
    if not m["has_avx512"]:
        return ("AVX-512 code paths not run: this CPU has no AVX-512 and it cannot be emulated here "
                "(the AVX-512 figures elsewhere in BENCHMARKS.md come from another machine)")
    if m["isa"] != "avx512":
        return f"AVX-512 CPU run with its paths lowered to {m['isa']} (VIDEOLLAMA_ISA / ATEN_CPU_CAPABILITY)"
    return "AVX2 paths can be measured here by lowering VIDEOLLAMA_ISA and ATEN_CPU_CAPABILITY to avx2"


def stamp() -> str:
    """The machine line that ends a results section."""
    m = describe()
    return (f"{MARK} {m['cpu']} ({m['arch']}, {m['cores']} cores); ISA in use: {m['isa']} (our int8 kernel), "
            f"{m['aten_isa']} (ATen); one thread: **{m['gflops']:.1f} GFLOP/s** fp32 peak (1024^3 matmul), "
            f"**{m['read_gbs']:.1f} GB/s** read (sum of 512 MiB), both measured in this run (load average "
            f"{m['load']:.1f}); {not_run(m)}; torch {m['torch']}, {m['date']}._")


def stamped(text: str) -> str:
    """``text`` (a results section) ending with the machine line."""
    return text.rstrip("\n") + "\n\n" + stamp() + "\n"


# Heading of a section kept by hand below a benchmark's own tables: an earlier run on another kind
# of machine (the side-by-side the CPU issue asks for, where that machine is not at hand).
EARLIER = "### The earlier run, on "


def write_result(name: str, text: str) -> Path:
    """bench/results/<name>.md: ``text`` and the machine line, then any EARLIER section the file
    held (measured elsewhere, kept by hand)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.md"
    before = out.read_text() if out.exists() else ""
    kept = before[before.index(EARLIER):] if EARLIER in before else ""
    out.write_text(stamped(text).rstrip("\n") + "\n" + (f"\n{kept.rstrip()}\n" if kept else ""))
    return out


if __name__ == "__main__":
    print(stamp())
