"""The compiled-or-eager choice of the decode step (inference/generate.py step_choice, tuning.choose_step)
and how generate and BatchDecoder follow it."""

from __future__ import annotations

import time

import pytest
import torch

from conftest import token_ids
from videollama.config import VideoLlamaConfig
from videollama.inference import generate as gen
from videollama.inference import tuning
from videollama.inference.batch import BatchDecoder, buckets
from videollama.model import VideoLlama


@pytest.fixture(scope="module")
def model() -> VideoLlama:
    torch.manual_seed(0)
    m = VideoLlama(VideoLlamaConfig.from_name("tiny")).eval()
    with torch.no_grad():
        for block in m.decoder.cross_attn_layers:
            block.attn_gate.fill_(1.0)
        m.lm_head.weight.mul_(20.0)
    return m


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """An empty cache directory and no choice in memory."""
    monkeypatch.setenv("VIDEOLLAMA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(gen.STEP_ENV, raising=False)
    tuning.forget()
    gen.COMPILED.pop("choices", None)
    yield
    tuning.forget()
    gen.COMPILED.pop("choices", None)


def busy(seconds: float):
    def run():
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass
    return run


def test_choose_step_keeps_the_faster_one_and_measures_once(fresh, monkeypatch):
    monkeypatch.setattr(tuning, "_clock", lambda: time.thread_time)  # this thread's time: load-proof
    fast, slow = busy(0.002), busy(0.006)
    got = tuning.choose_step("step/a", eager=slow, compiled=fast)
    assert got["choice"] == "compiled" and got["ms"]["compiled"] < got["ms"]["eager"]
    assert tuning.choose_step("step/b", eager=fast, compiled=slow)["choice"] == "eager"
    # A tie stays eager: compiling must win by a margin to be kept.
    assert tuning.choose_step("step/c", eager=fast, compiled=fast)["choice"] == "eager"
    tuning.forget()  # another process on this host: the records are read, nothing is timed
    monkeypatch.setattr(tuning, "time_calls", lambda *a, **k: pytest.fail("measured again"))
    assert tuning.choose_step("step/a", eager=slow, compiled=fast) == got


def ids(b=2, t=6, seed=0):
    return token_ids(b, t, seed)


def test_eager_policy_never_compiles(fresh, model, monkeypatch):
    from torch._dynamo.utils import counters

    monkeypatch.setenv(gen.STEP_ENV, "eager")
    counters.clear()
    x = ids()
    assert torch.equal(gen.generate(model, x, max_new_tokens=6, compile=True), gen.generate(model, x, max_new_tokens=6))
    assert not counters["stats"]["unique_graphs"]
    (record,) = gen.step_report()
    assert record["choice"] == "eager" and record["rows"] == 2 and not record["media"]


def prompt(n, seed):
    return torch.randint(3, 1024, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_batch_decoder_steps_only_its_rows_when_eager_is_chosen(fresh, model, monkeypatch):
    monkeypatch.setenv(gen.STEP_ENV, "eager")
    rows = []
    step = gen.decode_step

    def spy(model, token, **kwargs):
        rows.append(token.shape[0])
        return step(model, token, **kwargs)

    monkeypatch.setattr(gen, "decode_step", spy)
    plain, chosen = BatchDecoder(model, max_batch=4, max_len=24), BatchDecoder(model, max_batch=4, max_len=24, compile=True)
    outs = []
    for dec in (plain, chosen):
        for i in range(3):
            dec.add(prompt(4 + i, i), media_kv=None)
        outs.append([dec.step() for _ in range(4)])
    assert outs[0] == outs[1]
    assert rows == [3] * 8  # 3 active rows, not the bucket of 4: the eager step runs on n rows


def test_warm_up_chooses_every_bucket_and_leaves_the_decoder_as_new(fresh, model, monkeypatch):
    monkeypatch.setenv(gen.STEP_ENV, "eager")
    video = torch.randn(1, 16, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        media_kv = model.decoder.project_media(model.encode_video(video))

    def run(warm: bool):
        dec = BatchDecoder(model, max_batch=4, max_len=24, compile=True)
        records = dec.warm_up() if warm else []
        a, _ = dec.add(prompt(5, 1), media_kv=media_kv)
        b, _ = dec.add(prompt(3, 2), media_kv=None)
        return records, [dec.step() for _ in range(5)]

    records, warmed = run(True)
    assert sorted((r["rows"], r["media"]) for r in records) == sorted(
        (b, m) for b in buckets(4) for m in (False, True))
    assert all(r["choice"] == "eager" and r["cache_len"] == 24 for r in records)
    assert run(False)[1] == warmed
    with pytest.raises(ValueError, match="idle"):
        dec = BatchDecoder(model, max_batch=2, max_len=24, compile=True)
        dec.add(prompt(3, 3), media_kv=None)
        dec.warm_up()


@pytest.mark.slow
def test_auto_measures_a_shape_once_per_host(fresh, model, monkeypatch):
    x = ids(b=1, t=5, seed=9)
    eager = gen.generate(model, x, max_new_tokens=8)
    assert torch.equal(gen.generate(model, x, max_new_tokens=8, compile=True), eager)
    (record,) = gen.step_report()
    assert record["choice"] in ("compiled", "eager") and record["measured"]
    assert set(record["ms"]) == {"compiled", "eager"} and record["compile_s"] > 0
    # Another process on this host: the choice is read back, not measured.
    gen.COMPILED.pop("choices")
    tuning.forget()
    monkeypatch.setattr(tuning, "time_calls", lambda *a, **k: pytest.fail("measured again"))
    assert torch.equal(gen.generate(model, x, max_new_tokens=8, compile=True), eager)
    assert gen.step_report()[0]["choice"] == record["choice"]
