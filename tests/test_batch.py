"""Continuous batching (inference/batch.py) against generate() run alone on each request."""

from __future__ import annotations

import pytest
import torch

from conftest import sharpened_tiny_model, video_frames
from videollama.inference.batch import BatchDecoder, bucket, buckets
from videollama.inference.generate import generate
from videollama.model import VideoLlama

V = 1024


@pytest.fixture(scope="module", params=[16, 0], ids=["resampler", "no-resampler"])
def model(request) -> VideoLlama:
    return sharpened_tiny_model(request.param)  # as test_generate's: the video, positions and slots matter


def video(seed: int) -> torch.Tensor:
    return video_frames(1, 4, seed)


def prompt(t: int, seed: int) -> list[int]:
    return torch.randint(3, V, (t,), generator=torch.Generator().manual_seed(seed)).tolist()


def media(model, v):
    with torch.no_grad():
        return model.decoder.project_media(model.encode_video(v))


def alone(model, p, v, n, **kw):
    return generate(model, torch.tensor([p]), v, max_new_tokens=n, **kw)[0].tolist()


def run_schedule(model, requests, *, max_batch, max_len, compile=False):
    """requests: (join_step, prompt, video or None, n_new, sampling kwargs). Returns tokens per request."""
    dec = BatchDecoder(model, max_batch=max_batch, max_len=max_len, compile=compile)
    out: dict[int, list[int]] = {}
    slot_of: dict[int, int] = {}
    pending = list(enumerate(requests))
    step = 0
    while pending or slot_of:
        for i, (join, p, v, n, kw) in list(pending):
            if join <= step and dec.free_slots:
                slot, first = dec.add(p, media_kv=media(model, v) if v is not None else None, **kw)
                slot_of[i], out[i] = slot, [first]
                pending.remove((i, (join, p, v, n, kw)))
        for i in [i for i, s in slot_of.items() if len(out[i]) == requests[i][3]]:
            dec.remove(slot_of.pop(i))
        if slot_of:
            got = dec.step()
            assert set(got) == set(slot_of.values())
            for i, s in slot_of.items():
                out[i].append(got[s])
        step += 1
    return [out[i] for i in range(len(requests))]


def test_mixed_rows_equal_generate_alone(model):
    v1, v2 = video(1), video(2)
    requests = [
        (0, prompt(5, 10), v1, 10, {}),
        (0, prompt(8, 11), None, 12, {}),
        (2, prompt(3, 12), v2, 9, {}),
        (3, prompt(6, 13), None, 7, {}),
        # joins once a slot frees (3 rows max): a recycled row, a video seen before
        (4, prompt(4, 14), v1, 11, {}),
    ]
    got = run_schedule(model, requests, max_batch=3, max_len=32)
    for i, (_, p, v, n, _) in enumerate(requests):
        assert got[i] == alone(model, p, v, n), f"request {i}"
    # The videos matter: without them rows 0 and 2 would differ.
    assert got[0] != alone(model, requests[0][1], None, 10)
    assert got[2] != alone(model, requests[2][1], None, 9)


def test_seeded_sampling_is_reproducible_and_matches_generate(model):
    p, v = prompt(5, 20), video(3)
    kw = {"temperature": 1.0, "top_p": 0.9, "seed": 7}
    with_company = run_schedule(model, [(0, prompt(7, 21), None, 10, {}), (1, p, v, 10, kw),
                                        (0, prompt(4, 22), video(4), 10, {"temperature": 0.8, "seed": 1})],
                                max_batch=3, max_len=24)[1]
    by_itself = run_schedule(model, [(0, p, v, 10, kw)], max_batch=2, max_len=16)[0]
    assert with_company == by_itself
    expected = alone(model, p, v, 10, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(7))
    assert by_itself == expected
    other_seed = run_schedule(model, [(0, p, v, 10, {**kw, "seed": 8})], max_batch=1, max_len=16)[0]
    assert other_seed != by_itself


def test_bad_requests(model):
    dec = BatchDecoder(model, max_batch=1, max_len=10)
    with pytest.raises(ValueError, match="does not fit"):
        dec.add(prompt(8, 0), media_kv=None, max_new_tokens=3)
    with pytest.raises(ValueError, match="does not fit"):
        dec.add([], media_kv=None)
    with pytest.raises(ValueError, match="token ids must be in"):
        dec.add([5, V + 3], media_kv=None)
    good = media(model, video(1))
    with pytest.raises(ValueError, match="cross-attention blocks"):
        dec.add([5, 6], media_kv=good[:1])
    slot, _ = dec.add(prompt(8, 0), media_kv=good, max_new_tokens=2)
    assert dec.free_slots == 0
    with pytest.raises(ValueError, match="no free slot"):
        dec.add([5], media_kv=None)
    dec.step()
    dec.step()  # the cache now holds 10 positions
    with pytest.raises(ValueError, match="max_len 10"):
        dec.step()
    dec.remove(slot)
    assert dec.free_slots == 1 and dec.step() == {}
    with pytest.raises(ValueError, match="not active"):
        dec.remove(slot)
    with pytest.raises(ValueError, match="max_len must be"):
        BatchDecoder(model, max_batch=2, max_len=model.config.decoder.max_seq_len + 1)


@pytest.mark.slow
def test_compiled_steps_compile_once_and_match_eager(model):
    from torch._dynamo.utils import counters

    from videollama.inference.generate import COMPILED

    torch._dynamo.reset()
    counters.clear()
    requests = [(0, prompt(5, 30), video(5), 8, {}), (1, prompt(3, 31), None, 8, {}),
                (3, prompt(6, 32), None, 6, {})]
    eager = run_schedule(model, requests, max_batch=2, max_len=20)
    compiled = run_schedule(model, requests, max_batch=2, max_len=20, compile=True)
    assert "failed" not in COMPILED, COMPILED.get("failed")
    assert compiled == eager
    # Over ~20 steps of changing lengths and rows: at most one graph per row bucket (1, 2), with
    # and without a video row; not one per length.
    assert counters["stats"]["unique_graphs"] <= 2 * len(buckets(2)), dict(counters["stats"])


def test_buckets():
    assert buckets(16) == [1, 2, 4, 8, 16] and buckets(12) == [1, 2, 4, 8, 12] and buckets(1) == [1]
    assert [bucket(n, 12) for n in (1, 2, 3, 5, 8, 9, 12)] == [1, 2, 4, 8, 8, 12, 12]


def test_rows_leaving_mid_batch_are_compacted(model):
    """Rows leave from the front and the middle while others decode: the last active row moves
    into the freed row (the caller's slot ids stay), the step runs on exactly the active rows,
    and every request's tokens still equal generate() alone."""
    v1, v2 = video(1), video(2)
    reqs = [(prompt(5, 40), v1, 4), (prompt(7, 41), None, 12), (prompt(3, 42), v2, 6),
            (prompt(6, 43), None, 12), (prompt(4, 44), v1, 12)]
    dec = BatchDecoder(model, max_batch=5, max_len=32)
    slots, out = [], []
    for p, v, _ in reqs:
        s, first = dec.add(p, media_kv=media(model, v) if v is not None else None)
        slots.append(s)
        out.append([first])
    assert slots == [0, 1, 2, 3, 4]
    live = set(range(5))
    steps_rows = []
    while live:
        for i in [i for i in live if len(out[i]) == reqs[i][2]]:
            dec.remove(slots[i])
            live.discard(i)
        if not live:
            break
        got = dec.step()
        steps_rows.append(len(got))
        assert set(got) == {slots[i] for i in live}
        assert sorted(r.index for r in dec.rows.values()) == list(range(len(live)))  # compacted
        for i in live:
            out[i].append(got[slots[i]])
        if len(out[1]) == 7 and 1 in live:  # a middle row leaves early, others keep going
            dec.remove(slots[1])
            live.discard(1)
    # Request 0 (row 0) left after 4 tokens: request 4 (the last row) moved into row 0; request 2
    # left next, then 1: the later rows moved again.
    assert steps_rows[0] == 5 and steps_rows[-1] == 2
    for i, (p, v, n) in enumerate(reqs):
        want = 7 if i == 1 else n
        assert out[i] == alone(model, p, v, want), f"request {i}"
    # A new request reuses the lowest free slot id and the first idle row.
    s, _ = dec.add(prompt(4, 45), media_kv=None)
    assert s == 0 and dec.rows[s].index == 0
