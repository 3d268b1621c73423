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
every node sees), else starts a local Ray instance listening on 127.0.0.1 only (``start_local_ray``). Per-video work is ``Dataset.map`` (one CPU a
task); each model stage is ``map_batches`` over an actor pool (one batch a call), with
``num_gpus=1`` per actor when the cluster has GPUs (and ``device`` is then ``cuda``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from videollama.curate.records import build_stage_model, read_record, run_batch, video_record, write_record

log = logging.getLogger(__name__)

# The skip reason (stats.json's ``corrupt``) of a video whose worker process died on it twice.
WORKER_DIED = "worker_died"
MAX_IDLE_DEATHS = 3  # pool breaks in a row with no video in flight, before the run gives up


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


def _started_marker(work: str, source_id: str) -> Path:
    return video_record(Path(work), source_id).with_name(f".{source_id}.started")


def _pool_job(job: Callable[[dict, dict, str], str], source: dict[str, Any], settings: dict[str, Any],
              work: str) -> str:
    """``job`` in a pool worker, between a started marker and its removal: when a worker dies, the
    markers left without a record name the videos it may have been working on."""
    marker = _started_marker(work, source["source_id"])
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    result = job(source, settings, work)
    marker.unlink(missing_ok=True)
    return result


class LocalEngine:
    """``job`` (default :func:`video_job`) per source in a process pool. A worker that dies (kill -9,
    a crash in a native library) breaks the pool: it is rebuilt for the videos not done, and each
    video that was in flight is retried alone, once; one that breaks its pool again gets a record
    with the ``WORKER_DIED`` error (a counted skip), so the run goes on."""

    name = "local"

    def __init__(self, workers: int = 0, job: Callable[[dict, dict, str], str] = video_job):
        self.workers = workers or os.cpu_count() or 1
        self.job = job

    def map_videos(self, sources: list[dict], settings: dict, work: str, progress: Callable[[], None]) -> None:
        if not sources:
            return
        if self.workers == 1:
            for source in sources:
                self.job(source, settings, work)
                progress()
            return
        pending, idle_deaths = list(sources), 0
        while pending:
            for source in pending:  # markers of an earlier, killed run
                _started_marker(work, source["source_id"]).unlink(missing_ok=True)
            if not self._pool(pending, settings, work, progress, self.workers):
                return
            unfinished = [s for s in pending if read_record(video_record(Path(work), s["source_id"])) is None]
            suspects = [s for s in unfinished if _started_marker(work, s["source_id"]).exists()]
            if not suspects:  # a worker died between videos: nothing to blame, rebuild the pool
                idle_deaths += 1
                if idle_deaths > MAX_IDLE_DEATHS:
                    raise RuntimeError(f"curate's worker processes died {idle_deaths} times in a row before "
                                       "starting a video")
                log.warning("a curate worker process died between videos; the pool is rebuilt")
                pending = unfinished
                continue
            idle_deaths = 0
            log.warning("a curate worker process died (killed, or a crash in a native library) during %s; "
                        "the pool is rebuilt and each of them retried alone", ", ".join(s["source_id"] for s in suspects))
            for source in suspects:
                _started_marker(work, source["source_id"]).unlink(missing_ok=True)
                if self._pool([source], settings, work, progress, 1):
                    write_record(video_record(Path(work), source["source_id"]), {
                        "source_id": source["source_id"], "rows": [], "seconds": {},
                        "error": [WORKER_DIED, f"{source['path']}: the worker process died twice while processing "
                                               "it (killed, or a crash in a native library)"]})
                    progress()
            pending = [s for s in unfinished if s not in suspects]

    def _pool(self, sources: list[dict], settings: dict, work: str, progress: Callable[[], None],
              workers: int) -> bool:
        """Run ``sources`` in a fresh process pool; True when a worker died (the pool broke)."""
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed
        from concurrent.futures.process import BrokenProcessPool

        context = multiprocessing.get_context("forkserver")
        # Imported once in the server, not once per worker (torch, PyAV: seconds each).
        context.set_forkserver_preload(["videollama.curate.cutting", "videollama.data.video",
                                        "videollama.curate.scenes", "videollama.curate.probe"])
        with ProcessPoolExecutor(max_workers=min(workers, len(sources)), mp_context=context) as pool:
            futures = [pool.submit(_pool_job, self.job, s, settings, work) for s in sources]
            try:
                for future in as_completed(futures):
                    future.result()
                    progress()
            except BrokenProcessPool:
                return True
        return False

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
                start_local_ray(**init_kwargs)
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


def start_local_ray(**init_kwargs) -> None:
    """A local Ray instance whose every server listens on 127.0.0.1 only, no dashboard.

    Ray binds its servers (GCS, raylet, object manager, workers, the runtime-env agent) to the
    loopback address only when the node's IP is 127.0.0.1, and ``ray.init`` turns a loopback
    ``_node_ip_address`` into the machine's reachable address unless Ray's single-machine mode is
    on (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, the mode Ray uses on laptops; read when ray is
    imported, so it is set in the environment for Ray's own processes and on the already imported
    constants). The node's address is checked after the start: a Ray that would not bind to
    loopback is shut down and refused."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(**({"include_dashboard": False, "_node_ip_address": "127.0.0.1"} | init_kwargs))
    node_ip = ray.util.get_node_ip_address()
    if node_ip != "127.0.0.1":
        ray.shutdown()
        raise RuntimeError(f"the local Ray instance took the address {node_ip}, not 127.0.0.1: refusing to run "
                           "with Ray's unauthenticated ports open beyond this machine (set RAY_ADDRESS to a cluster)")


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
