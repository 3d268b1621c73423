"""What a curate run leaves in ``OUT``: the shards of kept clips, ``clips.parquet`` (every clip,
every score, every decision), ``stats.json`` and ``stats.png``.

* ``OUT/shards/shard-NNNNNN.tar``: the training format (``data/writer.py``), one sample per
  kept clip in ``clip_id`` order: ``KEY.mp4`` the clip, ``KEY.json`` with ``caption``,
  ``caption_source``, ``texts`` (every candidate text with its scores), ``source``
  (source id), ``start_s``, ``end_s`` and the source's metadata (``meta``).
* ``OUT/clips.parquet``: one row per clip, sorted by ``clip_id``, with a fixed schema.
Everything is written to a temp name and renamed, so an interrupted run leaves no half file.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from videollama.curate.clipfiles import atomic_write, clip_path
from videollama.curate.rows import ClipRow

COLUMNS = ("clip_id", "source_id", "start_s", "end_s", "duration_s", "width", "height", "motion",
           "texts", "scores", "kept", "drop_reason", "caption", "caption_source", "duplicate_of")


def table_schema():
    """clips.parquet's fixed schema (one column a ``COLUMNS`` name, the scores a list of structs)."""
    import pyarrow as pa

    score = pa.struct([("text", pa.string()), ("clip", pa.float64()), ("pmi", pa.float64()),
                       ("pmi_sum", pa.float64()), ("pmi_span", pa.float64()), ("pmi_marginal", pa.float64()),
                       ("pmi_marginal_sum", pa.float64()), ("pmi_marginal_span", pa.float64())])
    return pa.schema([
        ("clip_id", pa.string()), ("source_id", pa.string()), ("start_s", pa.float64()), ("end_s", pa.float64()),
        ("duration_s", pa.float64()), ("width", pa.int64()), ("height", pa.int64()), ("motion", pa.float64()),
        ("texts", pa.list_(pa.string())), ("scores", pa.list_(score)), ("kept", pa.bool_()),
        ("drop_reason", pa.string()), ("caption", pa.string()), ("caption_source", pa.string()),
        ("duplicate_of", pa.string()),
    ])


def write_table(rows: list[dict[str, Any]], path: Path) -> None:
    """``rows`` (``ClipRow.table_row()`` each, sorted by clip_id) -> a Parquet file with the fixed
    schema above."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = table_schema()
    table = pa.Table.from_pylist([{c: r.get(c) for c in COLUMNS} for r in rows], schema=schema)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def read_table(path: str | Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def read_rows(path: str | Path) -> list[ClipRow]:
    """clips.parquet as typed rows (what the filters take)."""
    return [ClipRow.from_table(row) for row in read_table(path)]


def shard_meta(row: ClipRow, source_meta: dict[str, Any]) -> dict[str, Any]:
    return {"caption": row.caption, "caption_source": row.caption_source, "texts": row.scores_table(),
            "source": row.source_id, "clip_id": row.clip_id, "start_s": row.start_s,
            "end_s": row.end_s, "meta": source_meta}


def write_shards_of(rows: list[ClipRow], metas: dict[str, dict], out: Path, work: Path, *,
                    max_bytes: int, max_count: int | None, prefix: str) -> list[Path]:
    """The kept rows' clips as WebDataset shards in ``out/shards`` (replaced whole)."""
    from videollama.data.writer import write_shards

    def samples():
        for row in rows:
            if row.kept:
                yield row.clip_id, clip_path(work, row.clip_id).read_bytes(), shard_meta(
                    row, metas.get(row.source_id, {}))

    staging = out / f".shards.writing-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    paths = write_shards(samples(), staging, prefix=prefix, max_bytes=max_bytes, max_count=max_count)
    final = out / "shards"
    if final.exists():
        retired = out / f".shards.old-{os.getpid()}"
        os.replace(final, retired)
        os.replace(staging, final)
        shutil.rmtree(retired)
    else:
        os.replace(staging, final)
    return [final / p.name for p in paths]


def write_stats(stats: dict[str, Any], path: Path) -> None:
    atomic_write(path, (json.dumps(stats, indent=2, sort_keys=True) + "\n").encode())


def plot_stats(rows: list[ClipRow], stats: dict[str, Any], path: Path) -> None:
    """Score histograms (one per metric, the threshold marked) and counts per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in dict.fromkeys(("pmi", "clip", stats.get("metric") or "pmi"))
               if any(s.value(m) is not None for r in rows for s in r.scores)]
    fig, axes = plt.subplots(1, len(metrics) + 1, figsize=(5 * (len(metrics) + 1), 3.6))
    axes = list(axes) if len(metrics) else [axes]
    for ax, metric in zip(axes, metrics):
        values = [s.value(metric) for r in rows for s in r.scores if s.value(metric) is not None]
        ax.hist(values, bins=40, color="#4477aa")
        if stats.get("metric") == metric:
            ax.axvline(stats["threshold"], color="#cc3311", label=f"threshold {stats['threshold']:.3g}")
            ax.legend()
        ax.set_title(f"{metric} scores of candidate texts")
        ax.set_xlabel(metric)
    counts = stats["counts"]
    names = ["sources", "sources_ok", "clips", "after_filters", "aligned", "captioned", "kept"]
    axes[-1].barh(names[::-1], [counts.get(n, 0) for n in names[::-1]], color="#228833")
    axes[-1].set_title("counts per stage")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
