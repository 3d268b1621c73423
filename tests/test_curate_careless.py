"""Careless and hostile use of ``videollama curate``, each case built by its test:

* ``--out`` follows ``data shards``' rule: a non-empty folder that is not a curate output is
  refused (even with ``--overwrite``), an ``--out`` inside the input folder is refused, and
  ``--overwrite`` replaces a previous curate output whole, only once the new run is complete;
* a NUL byte in a manifest's video path is a counted skip, a 300-character id a bounded file name
  (and the run resumes);
* a config that is a device or a FIFO is refused at once;
* a pool worker that dies is rebuilt around: the video is retried alone, then counted as a skip;
  a ``kill -9`` of a worker of the real command does not end the run;
* a local Ray instance listens on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from curate_inputs import scene_caption, shapes_video
from videollama.curate.config import load_config
from videollama.curate.output import read_table
from videollama.curate.pipeline import curate

pytestmark = pytest.mark.usefixtures("no_hang")
ROOT = Path(__file__).resolve().parent.parent
FAST = ["workers=1", "dedup.enabled=false", "output.plot=false"]


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """A folder of two moving 2.4 s uploads with their captions."""
    folder = tmp_path_factory.mktemp("raw")
    for name, seed in (("a", 2), ("b", 4)):
        (folder / f"{name}.mp4").write_bytes(shapes_video([(seed, 2.4)]))
        (folder / f"{name}.txt").write_text(scene_caption(seed))
    return folder


def _cli(*args: str) -> int:
    from videollama.cli import main as cli_main

    return cli_main(["curate", *args])


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_out_holding_other_files_is_refused_even_with_overwrite(raw, tmp_path, capsys):
    """Before, curate deleted and replaced the folder's shards/ and clips.parquet (exit 0)."""
    out = tmp_path / "dataset"
    (out / "shards").mkdir(parents=True)
    (out / "shards" / "shard-000000.tar").write_bytes(b"someone's shard")
    (out / "clips.parquet").write_bytes(b"someone's table")
    before = _snapshot(out)
    assert _cli("--input", str(raw), "--out", str(out), *FAST) == 2
    assert "is not empty" in capsys.readouterr().err
    assert _cli("--input", str(raw), "--out", str(out), "--overwrite", *FAST) == 2
    assert "holds more than a curate output" in capsys.readouterr().err
    assert _snapshot(out) == before


def test_an_out_inside_the_input_folder_is_refused(raw, tmp_path, capsys):
    """Before, the run wrote its clips into the input folder, and the next run curated them."""
    import shutil

    folder = tmp_path / "raw"
    shutil.copytree(raw, folder)
    assert _cli("--input", str(folder), "--out", str(folder / "curated"), *FAST) == 2
    assert "inside the input folder" in capsys.readouterr().err
    assert not (folder / "curated").exists()


def test_overwrite_replaces_a_previous_curate_output_whole_and_only_once_complete(raw, tmp_path, monkeypatch):
    import videollama.curate.pipeline as pipeline

    out = tmp_path / "curated"
    assert curate(raw, out, load_config(None, FAST))["counts"]["kept"] == 2
    # The same run again resumes (no --overwrite needed): every video's record is reused.
    assert curate(raw, out, load_config(None, FAST))["resumed_videos"] == 2
    before = _snapshot(out)
    other = load_config(None, [*FAST, "filter.min_duration_s=2.45"])  # drops both clips as too short
    with pytest.raises(ValueError, match="other input or settings.*--overwrite"):
        curate(raw, out, other)
    # A replacing run that fails before its end leaves the previous output as it was.
    real_write = pipeline._write_outputs

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(pipeline, "_write_outputs", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        curate(raw, out, other, overwrite=True)
    assert _snapshot(out) == before
    assert json.loads((out / ".work" / "run.json").read_text())["config"]["filter"]["min_duration_s"] == 2.0
    # Completed, it replaces the whole folder: the new settings' record, table and shards only.
    monkeypatch.setattr(pipeline, "_write_outputs", real_write)
    stats = curate(raw, out, other, overwrite=True)
    assert stats["counts"]["kept"] == 0 and stats["dropped"] == {"too_short": 2}
    assert stats["resumed_videos"] == 2  # the failed attempt's records, in the staging folder, were reused
    assert json.loads((out / ".work" / "run.json").read_text())["config"]["filter"]["min_duration_s"] == 2.45
    assert not list((out / "shards").glob("*.tar")) and sorted(p.name for p in tmp_path.iterdir()) == ["curated"]


def test_a_nul_byte_in_a_path_is_a_counted_skip_and_a_300_character_id_a_bounded_name(raw, tmp_path):
    """Before, the NUL byte ended the run ("embedded null byte") and the long id, on every resume,
    with "File name too long"."""
    folder = tmp_path / "web"
    (folder / "v").mkdir(parents=True)
    for name in ("a", "b"):
        (folder / "v" / f"{name}.mp4").write_bytes((raw / f"{name}.mp4").read_bytes())
    long_id = "L" * 300
    lines = [{"id": "nul\x00id", "video": "v/a.mp4", "texts": ["x"]},
             {"id": "bad", "video": "v/a\x00.mp4", "texts": ["x"]},
             {"id": long_id, "video": "v/b.mp4", "texts": ["y"]}]
    (folder / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    for attempt in range(2):  # the second run resumes from the records the first left
        stats = curate(folder / "manifest.jsonl", tmp_path / "out", load_config(None, FAST))
        assert stats["corrupt"] == {"invalid_line": 1} and "manifest.jsonl:2" in stats["skipped_sources"]
        assert stats["resumed_videos"] == 2 * attempt
        ids = sorted(r["clip_id"] for r in read_table(tmp_path / "out" / "clips.parquet"))
        assert len(ids) == 2 and ids[1] == "nul_id-0000"
        from videollama.curate.inputs import MAX_ID_CHARS

        assert ids[0].startswith("L" * 40) and len(ids[0]) == MAX_ID_CHARS + len("-0000")
        assert re.fullmatch(r"L+_[0-9a-f]{16}-0000", ids[0])


def test_source_ids_keep_short_ids_and_give_long_ones_a_hash():
    from videollama.curate.inputs import MAX_ID_CHARS, source_id

    assert source_id("web-000001") == "web-000001" and source_id("a b.c") == "a_b_c"
    assert source_id("x" * MAX_ID_CHARS) == "x" * MAX_ID_CHARS
    a, b = source_id("L" * 300 + "a"), source_id("L" * 300 + "b")
    assert a != b and len(a) == len(b) == MAX_ID_CHARS and a == source_id("L" * 300 + "a")


@pytest.mark.parametrize("kind", ["device", "fifo", "huge"])
def test_a_config_that_is_a_device_a_fifo_or_huge_is_refused_at_once(raw, tmp_path, capsys, kind):
    """Before, /dev/zero was read until memory ran out and a FIFO blocked forever."""
    if kind == "device":
        config = Path("/dev/zero")
    elif kind == "fifo":
        config = tmp_path / "config.yaml"
        os.mkfifo(config)
    else:
        config = tmp_path / "config.yaml"
        config.write_text("# " + "x" * (2 << 20) + "\n")
    t0 = time.monotonic()
    assert _cli("--input", str(raw), "--out", str(tmp_path / "out"), "--config", str(config)) == 2
    err = capsys.readouterr().err
    assert err.startswith("videollama: error: ") and ("not a regular file" in err or "byte cap" in err)
    assert time.monotonic() - t0 < 60 and not (tmp_path / "out").exists()


def test_a_worker_that_dies_is_retried_alone_once_then_counted(raw, tmp_path, monkeypatch):
    """A video whose worker dies once is redone; one that kills its worker every time is skipped as
    ``worker_died``; the other videos are curated as usual."""
    from curate_inputs import killing_job
    from videollama.curate.engines import LocalEngine

    folder = tmp_path / "raw"
    folder.mkdir()
    for name, source in (("die_always", "a"), ("die_once", "b"), ("fine", "a")):
        (folder / f"{name}.mp4").write_bytes((raw / f"{source}.mp4").read_bytes())
    monkeypatch.setattr("videollama.curate.engines.make_engine", lambda name, workers: LocalEngine(2, job=killing_job))
    stats = curate(folder, tmp_path / "out", load_config(None, FAST))
    assert stats["corrupt"] == {"worker_died": 1}
    assert stats["skipped_sources"]["die_always"][0] == "worker_died"
    assert sorted(r["source_id"] for r in read_table(tmp_path / "out" / "clips.parquet")) == ["die_once", "fine"]
    assert (tmp_path / "out" / ".work" / "killed-die_once").exists()  # it did die once


def _processes() -> dict[int, tuple[int, str]]:
    """Every process of the machine: pid -> (parent pid, command line), from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
                command = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, ValueError, IndexError):  # gone meanwhile
                continue
            table[int(entry)] = (ppid, command)
    return table


def _descendants(pid: int, table: dict[int, tuple[int, str]]) -> list[int]:
    children = [p for p, (ppid, _) in table.items() if ppid == pid]
    return children + [d for c in children for d in _descendants(c, table)]


@pytest.mark.slow
def test_kill_9_of_one_pool_worker_does_not_end_the_run(raw, tmp_path):
    """Before, the run ended with a BrokenProcessPool traceback."""
    folder = tmp_path / "raw"
    folder.mkdir()
    for i in range(6):
        (folder / f"v{i}.mp4").write_bytes(shapes_video([(2 * i + 2, 2.4)]))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-m", "videollama.cli", "curate", "--input", str(folder), "--out",
                                str(out), "workers=2", "output.plot=false"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    killed = None
    deadline = time.monotonic() + 80
    while killed is None and time.monotonic() < deadline and process.poll() is None:
        table = _processes()
        servers = [p for p, (ppid, command) in table.items() if ppid == process.pid and "forkserver" in command]
        workers = [w for server in servers for w in _descendants(server, table)]
        if workers:  # the pool's worker processes (children of the fork server)
            time.sleep(0.1)  # into its first video (on an idle machine the whole run takes about a second)
            try:
                os.kill(workers[0], 9)
                killed = workers[0]
            except ProcessLookupError:  # it ended meanwhile (a worker replaced, or the run done): look again
                pass
        time.sleep(0.05)
    stdout, stderr = process.communicate(timeout=85)
    assert killed is not None, "the kill must land while the run is going"
    assert process.returncode == 0, stderr[-3000:]
    assert "a curate worker process died" in stderr and "BrokenProcessPool" not in stderr
    stats = json.loads((out / "stats.json").read_text())
    assert stats["corrupt"] == {} and stats["counts"]["sources_ok"] == 6 and stats["counts"]["clips"] == 6


LISTENERS = re.compile(r"^LISTEN\s+\d+\s+\d+\s+(\S+):(\d+)\s+\S+\s+users:\(\((.*)\)\)$")


@pytest.mark.slow
def test_local_ray_listens_on_loopback_only(raw, tmp_path):
    """``--engine ray`` without RAY_ADDRESS: every port a process of the run listens on, seen with
    ``ss -ltnp`` while it runs, is bound to 127.0.0.1. Before, Ray's servers listened on every
    interface (``*`` / ``0.0.0.0``)."""
    pytest.importorskip("ray")
    if subprocess.run(["ss", "-V"], capture_output=True).returncode != 0:
        pytest.skip("needs ss (iproute2)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)
    process = subprocess.Popen([sys.executable, "-m", "videollama.cli", "curate", "--engine", "ray", "--input",
                                str(raw), "--out", str(tmp_path / "out"), "workers=1", "output.plot=false"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    seen: dict[str, set[str]] = {}  # "address:port" -> process names listening there
    while process.poll() is None:
        ours = {process.pid, *_descendants(process.pid, _processes())}
        for line in subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout.splitlines():
            match = LISTENERS.match(line.strip())
            if match and {int(p) for p in re.findall(r"pid=(\d+)", match[3])} & ours:
                seen.setdefault(f"{match[1]}:{match[2]}", set()).update(re.findall(r'"([^"]+)"', match[3]))
        time.sleep(0.2)
    stdout, stderr = process.communicate()
    assert process.returncode == 0, stderr[-3000:]
    assert seen, "the run must have been seen listening (Ray's servers)"
    loopback = re.compile(r"^(127\.0\.0\.1|\[::ffff:127\.0\.0\.1\]|\[::1\])$")
    exposed = {where: names for where, names in seen.items() if not loopback.match(where.rsplit(":", 1)[0])}
    assert not exposed, f"listening beyond loopback: {exposed}"
