"""Fixtures shared by several test modules (plain helpers live in tests/helpers.py)."""

from __future__ import annotations

import signal

import pytest


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped, with the reason shown, when no CUDA device is present."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def no_hang():
    """Fail (instead of hanging the suite) if a test runs past 90 s.

    Modules whose pipelines could hang use it with ``pytestmark = pytest.mark.usefixtures("no_hang")``.
    """

    def on_alarm(signum, frame):
        raise TimeoutError("test exceeded 90 s: the pipeline hangs")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(90)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Measurements and kernels go to a cache directory of this test session (VIDEOLLAMA_CACHE, which
    subprocesses inherit), never the user's; inductor's compiled graphs stay where torch keeps them
    by default, so that compile-heavy tests keep their cache across sessions."""
    import os

    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    mp = pytest.MonkeyPatch()
    mp.setenv("VIDEOLLAMA_CACHE", str(tmp_path_factory.mktemp("videollama-cache")))
    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        mp.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    yield
    mp.undo()
