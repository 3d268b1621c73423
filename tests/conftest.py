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
