"""``python bench/curate_quality.py --corpus data/web --out curated [--sweep]``: the curation
quality figures against the web corpus's truth.json (``videollama.curate.quality``, which ``make
demo`` uses too)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from videollama.curate.quality import evaluate, main, sweep_table, threshold_sweep  # noqa: E402

__all__ = ["evaluate", "sweep_table", "threshold_sweep"]

if __name__ == "__main__":
    main()
