"""Continuous batching of rows whose videos have different numbers of windows
(inference/media_rows.py in inference/batch.py), against generate() run alone on each request."""

from __future__ import annotations

import pytest
import torch

from videollama.config import VideoLlamaConfig
from videollama.inference.batch import BatchDecoder
from videollama.inference.generate import generate
from videollama.inference.media_rows import MediaRows, max_media_latents
from videollama.model import VideoLlama

V = 1024


@pytest.fixture(scope="module")
def model() -> VideoLlama:
    torch.manual_seed(0)
    m = VideoLlama(VideoLlamaConfig.from_name("tiny").with_overrides({"preprocess.max_windows": 4})).eval()
    with torch.no_grad():  # open gates and sharp logits (as test_batch): the video changes the tokens
        for block in m.decoder.cross_attn_layers:
            block.attn_gate.fill_(1.0)
            block.ff_gate.fill_(1.0)
        m.decoder.media_time.proj.weight.normal_()  # the windows' times matter too
        m.lm_head.weight.mul_(20.0)
        for layer in m.decoder.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    return m


def latents(model, windows: int, seed: int) -> torch.Tensor:
    """A whole video of ``windows`` windows (4 s apart), encoded: [1, W * L, D_v]."""
    pre = model.config.preprocess
    frames = torch.randn(windows, pre.num_frames, 3, pre.size, pre.size, generator=torch.Generator().manual_seed(seed))
    times = torch.arange(windows, dtype=torch.float64)[:, None] * pre.window_s + torch.arange(pre.num_frames) / pre.fps
    with torch.no_grad():
        return model.encode_video(frames, times).flatten(0, 1)[None]


def prompt(t: int, seed: int) -> list[int]:
    return torch.randint(3, V, (t,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_rows_with_videos_of_different_lengths_equal_generate_alone(model):
    videos = {1: latents(model, 1, 1), 3: latents(model, 3, 2), 2: latents(model, 2, 3), 4: latents(model, 4, 4)}
    # (prompt, windows of its video or None, new tokens); later ones join as rows leave
    requests = [(prompt(5, 10), 1, 9), (prompt(6, 11), 3, 12), (prompt(4, 12), None, 7), (prompt(7, 13), 2, 10),
                (prompt(3, 14), 4, 8)]
    dec = BatchDecoder(model, max_batch=3, max_len=32)
    out, slot_of, pending = {}, {}, list(range(len(requests)))
    while pending or slot_of:
        while pending and dec.free_slots:
            i = pending.pop(0)
            p, w, _ = requests[i]
            kv = model.decoder.project_media(videos[w]) if w else None
            slot_of[i], first = dec.add(p, media_kv=kv)
            out[i] = [first]
        for i in [i for i, s in slot_of.items() if len(out[i]) == requests[i][2]]:
            dec.remove(slot_of.pop(i))
        if slot_of:
            got = dec.step()
            for i, s in slot_of.items():
                out[i].append(got[s])
    assert dec.media.length >= videos[4].shape[1] and dec.media.rows <= 3
    for i, (p, w, n) in enumerate(requests):
        alone = generate(model, torch.tensor([p]), visual_latents=videos[w] if w else None, max_new_tokens=n)
        assert out[i] == alone[0].tolist(), f"request {i}"
    # The windows matter: a row reading only its video's first window answers otherwise.
    first_window = videos[3][:, : videos[1].shape[1]]
    assert out[1] != generate(model, torch.tensor([requests[1][0]]), visual_latents=first_window,
                              max_new_tokens=12)[0].tolist()


def test_media_rows_refuses_a_video_past_the_policy_and_grows_by_doubling(model):
    per_window = model.config.resampler.num_latents
    rows = MediaRows(len(model.decoder.cross_attn_layers), max_media_latents(model.config))
    assert rows.max_latents == 4 * per_window
    with pytest.raises(ValueError, match="longer than this model's policy"):
        rows.check(model.decoder.project_media(torch.zeros(1, 5 * per_window, model.config.vision.hidden_size)))
    one = model.decoder.project_media(latents(model, 1, 0))
    rows.reserve(1, rows.check(one), like=one)
    assert rows.length == per_window and rows.nbytes > 0
    rows.reserve(2, 2 * per_window + 1)  # 33 latents: doubled until they fit (64), never past the policy
    assert rows.length == 4 * per_window and rows.rows == 2
    rows.put(1, one)
    assert rows.mask[1].sum() == per_window and rows.mask[0].tolist() == [True] + [False] * (rows.length - 1)
