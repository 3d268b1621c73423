"""Fixtures shared by several test modules, and the builders of tiny inputs and models that
several modules share (``from conftest import token_ids, ...``); other plain helpers live in
tests/helpers.py, the serve tests' in tests/serving.py."""

from __future__ import annotations

import random
import signal

import pytest
import torch

TINY_VOCAB = 1024  # the tiny preset's vocabulary


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


# ---- builders of tiny inputs and models --------------------------------------------------------

def token_ids(b: int, t: int, seed: int) -> torch.Tensor:
    """[b, t] random ids of the tiny vocabulary, above its three lowest (special) ids."""
    return torch.randint(3, TINY_VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def video_frames(b: int, f: int, seed: int) -> torch.Tensor:
    """[b, f, 3, 64, 64] random frames at the tiny preset's image size."""
    return torch.randn(b, f, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def sharpened_tiny_model(num_latents: int):
    """The tiny preset (seed 0, ``num_latents`` resampler latents; 0: the decoder reads every frame
    token) with every gate open and the logits and self-attention sharpened, so that the video,
    the positions and the cache slots all change the greedy tokens (a fresh lm_head gives nearly
    flat logits, whose greedy choices would be near-ties)."""
    from videollama.config import VideoLlamaConfig
    from videollama.model import VideoLlama

    torch.manual_seed(0)
    m = VideoLlama(VideoLlamaConfig.from_name("tiny").with_overrides({"resampler.num_latents": num_latents})).eval()
    with torch.no_grad():
        for block in m.vision.temporal:
            block.gate.fill_(0.5)
        m.vision.frame_diff.gate.fill_(0.5)
        for block in m.decoder.cross_attn_layers:
            block.attn_gate.fill_(1.0)
            block.ff_gate.fill_(1.0)
        m.lm_head.weight.mul_(20.0)
        for layer in m.decoder.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    return m


def shapes_clip(seed: int) -> bytes:
    """One Shapes clip (MP4 bytes) drawn from ``random.Random(seed)``."""
    from videollama.data import shapes

    return shapes.encode_mp4(shapes.render_frames(shapes.sample_clip_spec(random.Random(seed))))
