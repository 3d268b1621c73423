"""Where the stages run: a local process pool (the default) or Ray Data (``--engine ray``).

Both engines run the same two functions and nothing else: ``cutting.process_video`` per source
video (then ``records.write_record`` of its result), and ``records.run_batch`` per model batch
(a model built once per worker by ``records.build_stage_model``). Every result goes to a
completion record on disk, and the pipeline reads the records, not the engine's return values:
so both engines give the same table, and a resumed run the same as an uninterrupted one.

Local: a ``forkserver`` process pool of ``workers`` processes for the per-video work (a clip
encode is single-threaded, so one process per core); model batches run in this process, one
after the other, with ``torch_threads`` threads.

Ray: connects to ``RAY_ADDRESS`` when it is set (a cluster; ``OUT`` must then be on storage that
every node sees), else starts a local Ray instance. Per-video work is ``Dataset.map`` (one CPU a
task); each model stage is ``map_batches`` over an actor pool (one batch a call), with
``num_gpus=1`` per actor when the cluster has GPUs (and ``device`` is then ``cuda``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from videollama.curate.records import build_stage_model, run_batch, video_record, write_record


def video_job(source: dict[str, Any], settings: dict[str, Any], work: str) -> str:
    """One source video, start to record (runs in a worker)."""
    import torch

    from videollama.curate.cutting import process_video

    # One thread: a worker per core already fills the machine, and torch's pool on every worker
    # (load_clip's float conversion) costs more in waking threads than the work itself.
    torch.set_num_threads(1)

    result = process_video(source, settings, work)
    write_record(video_record(Path(work), source["source_id"]), result)
    return source["source_id"]


class LocalEngine:
    name = "local"

    def __init__(self, workers: int = 0):
        self.workers = workers or os.cpu_count() or 1

    def map_videos(self, sources: list[dict], settings: dict, work: str, progress: Callable[[], None]) -> None:
        if not sources:
            return
        if self.workers == 1:
            for source in sources:
                video_job(source, settings, work)
                progress()
            return
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        context = multiprocessing.get_context("forkserver")
        # Imported once in the server, not once per worker (torch, PyAV: seconds each).
        context.set_forkserver_preload(["videollama.curate.cutting", "videollama.data.video",
                                        "videollama.curate.scenes", "videollama.curate.probe"])
        with ProcessPoolExecutor(max_workers=min(self.workers, len(sources)), mp_context=context) as pool:
            futures = [pool.submit(video_job, s, settings, work) for s in sources]
            for future in as_completed(futures):
                future.result()
                progress()

    def map_batches(self, stage: str, settings: dict, batches: list[dict], work: str,
                    progress: Callable[[], None]) -> None:
        if not batches:
            return
        model = build_stage_model(stage, settings)
        for batch in batches:
            run_batch(model, batch, work)
            progress()

    def close(self) -> None:
        pass


class _BatchActor:
    """A Ray actor holding one stage's model; each call runs the batches it is handed."""

    def __init__(self, stage: str, settings: dict, work: str):
        self.model = build_stage_model(stage, settings)
        self.work = work

    def __call__(self, rows: dict) -> dict:
        import numpy as np

        for payload in rows["batch"]:
            run_batch(self.model, json.loads(str(payload)), self.work)
        return {"done": np.ones(len(rows["batch"]), dtype=np.int64)}


def _ray_video(row: dict, settings: dict, work: str) -> dict:
    return {"source_id": video_job(json.loads(row["source"]), settings, work)}


class RayEngine:
    name = "ray"

    def __init__(self, workers: int = 0, **init_kwargs):
        import ray

        self.started = False
        if not ray.is_initialized():
            address = os.environ.get("RAY_ADDRESS")
            if address:
                ray.init(address=address, **init_kwargs)
            else:
                ray.init(**({"include_dashboard": False} | init_kwargs))
            self.started = True
        self.workers = workers
        resources = ray.cluster_resources()
        self.cpus = int(resources.get("CPU", 1))
        self.gpus = int(resources.get("GPU", 0))

    def map_videos(self, sources: list[dict], settings: dict, work: str, progress: Callable[[], None]) -> None:
        if not sources:
            return
        import ray.data

        items = [{"source": json.dumps(s, sort_keys=True)} for s in sources]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map(_ray_video, fn_kwargs={"settings": settings, "work": work}, num_cpus=1,
                    compute=ray.data.TaskPoolStrategy(size=self.workers or None))
        for _ in ds.iter_rows():
            progress()

    def map_batches(self, stage: str, settings: dict, batches: list[dict], work: str,
                    progress: Callable[[], None]) -> None:
        if not batches:
            return
        import ray.data

        gpus = 1 if self.gpus and settings["device"].startswith("cuda") else 0
        actors = max(1, min(len(batches), self.gpus if gpus else (self.workers or self.cpus)))
        items = [{"batch": json.dumps(b, sort_keys=True)} for b in batches]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(_BatchActor, batch_size=1, compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=gpus,
                            num_cpus=0 if gpus else int(settings["torch_threads"]),
                            fn_constructor_kwargs={"stage": stage, "settings": settings, "work": work})
        for _ in ds.iter_rows():
            progress()

    def close(self) -> None:
        if self.started:
            import ray

            ray.shutdown()


def make_engine(name: str, workers: int = 0):
    if name == "local":
        return LocalEngine(workers)
    if name == "ray":
        try:
            import ray  # noqa: F401
        except ImportError as e:
            raise ValueError("--engine ray needs Ray Data: pip install 'videollama[ray]'") from e
        return RayEngine(workers)
    raise ValueError(f"unknown engine {name!r}: local or ray")
