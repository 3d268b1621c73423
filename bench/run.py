"""Run every benchmark (bench/bench_*.py) and rebuild BENCHMARKS.md from their results.

Each benchmark is a script that prints nothing required and writes its section, in
Markdown, to bench/results/<name>.md, ending with bench/machine.py's line (the CPU, the ISA in
use, the measured one-thread peak and read bandwidth, what could not be run there). BENCHMARKS.md is the header below plus every
section in file-name order, so a partial run keeps the other sections as they were.
Usage: python bench/run.py [NAME ...]   (NAME: e.g. loader, train, curate)
       python bench/run.py --collect      (only rebuild BENCHMARKS.md from bench/results/)
"""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MARK = "_Machine:"  # bench/machine.py's line ends every section measured since

HEADER = """# Benchmarks

Produced by `make bench` (`python bench/run.py`); every figure below was measured by the
script named in its section, on the machine it names, and is a median of repeated runs
unless the section says otherwise. Ratios compare numbers measured side by side in one run.
"""


def with_machine(section: str) -> str:
    """A section as written, and where it names no machine (written before bench/machine.py), says so."""
    if MARK in section:
        return section
    return section + ("\n\n_Machine: not recorded with this table (measured before the benchmarks named their "
                      "CPU, ISA, peak and bandwidth); rerun its benchmark to record them._")


def main(argv: list[str]) -> int:
    RESULTS.mkdir(parents=True, exist_ok=True)
    scripts = sorted((ROOT / "bench").glob("bench_*.py"))
    if argv == ["--collect"]:
        scripts = []
    elif argv:
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in argv]
    failed = []
    for script in scripts:
        print(f"== {script.name}", flush=True)
        if subprocess.run([sys.executable, str(script)], cwd=ROOT).returncode != 0:
            failed.append(script.name)
    sections = [with_machine(p.read_text().strip()) for p in sorted(RESULTS.glob("*.md"))]
    machine = f"_Last run on {platform.machine()}, Python {platform.python_version()}._\n"
    (ROOT / "BENCHMARKS.md").write_text(HEADER + "\n" + machine + "\n" + "\n\n".join(sections) + "\n")
    if failed:
        print("failed:", ", ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
