"""The VideoLlama model on the tiny preset: gates, time, causality, save/load, input checks.

Parity with Hugging Face Llama and CLIP, through the real import path, is tests/test_convert.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import token_ids, video_frames
from videollama.config import VideoLlamaConfig
from videollama.model import VideoLlama, lm_loss

V = 1024  # tiny vocabulary


def tiny(**overrides) -> VideoLlamaConfig:
    cfg = VideoLlamaConfig.from_name("tiny")
    return cfg.with_overrides(overrides) if overrides else cfg


@pytest.fixture(scope="module")
def model() -> VideoLlama:
    torch.manual_seed(0)
    return VideoLlama(tiny()).eval()


def video(b: int = 2, f: int = 4, seed: int = 1) -> torch.Tensor:
    return video_frames(b, f, seed)


def ids(b: int = 2, t: int = 12, seed: int = 2) -> torch.Tensor:
    return token_ids(b, t, seed)


def open_gates(m: VideoLlama, *, temporal: bool = False, cross: bool = False, frame_diff: bool = False) -> None:
    with torch.no_grad():
        if temporal:
            for block in m.vision.temporal:
                block.gate.fill_(0.5)
        if frame_diff:
            m.vision.frame_diff.gate.fill_(0.5)
        if cross:
            for block in m.decoder.cross_attn_layers:
                block.attn_gate.fill_(0.5)
                block.ff_gate.fill_(0.5)


def test_fresh_model_gates_are_zero_and_no_buffers(model):
    gates = [n for n, _ in model.named_parameters() if n.endswith("gate")]
    # 2 temporal + frame_diff + 2 cross blocks x 2 gates in the tiny preset
    assert len(gates) == 7
    assert all(float(p.detach().abs().sum()) == 0.0 for n, p in model.named_parameters() if n.endswith("gate"))
    assert list(model.named_buffers()) == []


@torch.no_grad()
def test_closed_gates_video_logits_equal_text_only(model):
    x, v = ids(), video()
    text_only = model(x).logits
    with_video = model(x, v).logits
    assert torch.equal(text_only, with_video)

    nudged = VideoLlama(model.config).eval()
    nudged.load_state_dict(model.state_dict())
    with torch.no_grad():
        nudged.decoder.cross_attn_layers[0].attn_gate.fill_(0.1)
    assert torch.equal(nudged(x).logits, text_only)  # text only never reads the gate
    assert not torch.allclose(nudged(x, v).logits, text_only, atol=1e-4)


@torch.no_grad()
def test_temporal_attention_sees_frame_order(model):
    m = VideoLlama(model.config).eval()
    m.load_state_dict(model.state_dict())
    v = video(b=1, f=4)
    reversed_v = v.flip(1)
    # Closed gates: the ViT is per-frame, so reversing frames reverses its output exactly.
    assert torch.allclose(m.vision(reversed_v), m.vision(v).flip(1), atol=1e-6)
    # With closed gates only the resampler's time embedding makes the latents depend on the order.
    latents_closed = m.encode_video(reversed_v) - m.encode_video(v)
    open_gates(m, temporal=True)
    # Open temporal gates: order now changes what each frame sees. At init the attention over
    # frames is nearly uniform, so the effect is small but far above rounding (~1e-7).
    assert (m.vision(reversed_v) - m.vision(v).flip(1)).abs().max() > 1e-4
    # With a time embedding of the size training gives it, the latents follow the order too
    # (weakly: a fresh resampler attends almost uniformly).
    with torch.no_grad():
        m.vision.temporal_embedding.normal_(std=1.0, generator=torch.Generator().manual_seed(5))
    latents_open = m.encode_video(reversed_v) - m.encode_video(v)
    assert (latents_open - latents_closed).abs().max() > 1e-4  # rounding is ~1e-7


@torch.no_grad()
def test_resampler_time_embedding_alone_sees_frame_order(model):
    # Even with every vision gate closed, the resampler's time embedding tells frames apart.
    v = video(b=1, f=4)
    assert not torch.allclose(model.encode_video(v.flip(1)), model.encode_video(v), atol=1e-4)


@torch.no_grad()
def test_closed_gates_vit_is_per_frame(model):
    v = video(b=2, f=3)
    together = model.vision(v)  # [2, 3, 65, 64]
    assert together.shape == (2, 3, 65, 64)
    for b in range(2):
        for f in range(3):
            alone = model.vision(v[b:b + 1, f:f + 1])[0, 0]
            # Batching may change the matmul blocking, so allow rounding; the gates are exactly zero.
            torch.testing.assert_close(together[b, f], alone, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_frame_diff_gate_feeds_motion(model):
    m = VideoLlama(model.config).eval()
    m.load_state_dict(model.state_dict())
    v = video(b=1, f=3)
    still = v[:, :1].expand(-1, 3, -1, -1, -1).contiguous()
    before = m.vision(v)
    open_gates(m, frame_diff=True)
    after = m.vision(v)
    # The first frame has no predecessor: unchanged; later frames see the change.
    torch.testing.assert_close(after[:, 0], before[:, 0], rtol=0, atol=1e-6)
    assert not torch.allclose(after[:, 1:], before[:, 1:], atol=1e-3)
    # A video that does not move has zero difference: the open gate changes nothing.
    torch.testing.assert_close(m.vision(still), model.vision(still), rtol=0, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("with_video", [False, True])
def test_causality(model, with_video):
    m = VideoLlama(model.config).eval()
    m.load_state_dict(model.state_dict())
    open_gates(m, temporal=True, cross=True, frame_diff=True)
    x = ids(b=2, t=16)
    v = video() if with_video else None
    full = m(x, v).logits
    changed = x.clone()
    changed[:, 10:] = (changed[:, 10:] + 7) % V
    other = m(changed, v).logits
    torch.testing.assert_close(other[:, :10], full[:, :10], rtol=0, atol=1e-5)
    assert not torch.allclose(other[:, 10:], full[:, 10:], atol=1e-3)


@torch.no_grad()
def test_left_padding_matches_unpadded(model):
    m = VideoLlama(model.config).eval()
    m.load_state_dict(model.state_dict())
    open_gates(m, cross=True)
    v = video(b=2)
    short, long_ = ids(b=1, t=5, seed=3), ids(b=1, t=9, seed=4)
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long_])
    mask = torch.tensor([[0] * 4 + [1] * 5, [1] * 9])
    logits = m(batch, v, attention_mask=mask).logits
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits[0, 4:], m(short, v[:1]).logits[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[1], m(long_, v[1:]).logits[0], rtol=1e-4, atol=1e-4)


def test_loss_matches_manual_cross_entropy_and_trains(model):
    x = ids(b=2, t=10)
    labels = x.clone()
    labels[0, :4] = -100
    m = VideoLlama(model.config)
    m.load_state_dict(model.state_dict())
    out = m(x, video(), labels=labels)
    logits = out.logits.detach()
    terms = [torch.nn.functional.cross_entropy(logits[b, t - 1], labels[b, t], reduction="sum")
             for b in range(2) for t in range(1, 10) if labels[b, t] != -100]
    torch.testing.assert_close(out.loss.detach(), torch.stack(terms).mean())
    torch.testing.assert_close(lm_loss(logits, labels, reduction="sum"), torch.stack(terms).sum())
    assert float(lm_loss(logits, torch.full_like(labels, -100))) == 0.0
    # Gradients reach the closed cross-attention gates, so training can open them ...
    out.loss.backward()
    assert m.decoder.cross_attn_layers[0].attn_gate.grad.abs().sum() > 0
    # ... but nothing behind a closed gate learns yet (the Flamingo property: the LM starts intact).
    assert m.vision.temporal[0].gate.grad is None or m.vision.temporal[0].gate.grad.abs().sum() == 0
    # Once open, the vision side's own gates get gradients too.
    m.zero_grad()
    open_gates(m, cross=True)
    m(x, video(), labels=labels).loss.backward()
    assert m.vision.temporal[0].gate.grad.abs().sum() > 0
    assert m.vision.frame_diff.gate.grad.abs().sum() > 0


@pytest.mark.parametrize("preset, overrides", [
    ("tiny", {}),
    ("shapes", {}),  # open gates, no resampler, initializer_range 0.1
    ("tiny", {"decoder.tie_word_embeddings": True}),
])
def test_meta_build_plus_init_weights_equals_eager_build(preset, overrides):
    """The model owns its initialisation: built on meta, allocated with to_empty and given
    init_weights() under the same seed, it equals the model the constructor builds, value for
    value; every parameter is covered (none keeps the NaN it was allocated with)."""
    cfg = VideoLlamaConfig.from_name(preset, **overrides)
    torch.manual_seed(7)
    eager = VideoLlama(cfg)
    with torch.device("meta"):
        lazy = VideoLlama(cfg)
    assert all(p.is_meta for p in lazy.parameters())
    lazy.to_empty(device="cpu")
    with torch.no_grad():
        for p in lazy.parameters():
            p.fill_(float("nan"))
    torch.manual_seed(7)
    lazy.init_weights()
    expected, got = eager.state_dict(), lazy.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    if cfg.decoder.tie_word_embeddings:
        assert lazy.lm_head.weight is lazy.decoder.embed_tokens.weight
    # Gates start at the config's value; the generic rule's std is the config's initializer_range.
    gate = cfg.decoder.cross_attn_gate_init
    assert all(p.item() == gate for n, p in lazy.named_parameters() if n.endswith(("attn_gate", "ff_gate")))
    std = lazy.decoder.layers[0].mlp.up_proj.weight.detach().std().item()
    assert std == pytest.approx(cfg.initializer_range, rel=0.1)


def test_init_weights_reinitialises_a_trained_model():
    torch.manual_seed(0)
    fresh = VideoLlama(tiny())
    torch.manual_seed(1)
    trained = VideoLlama(tiny())
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)
    torch.manual_seed(0)
    trained.init_weights()
    for (name, a), b in zip(fresh.state_dict().items(), trained.state_dict().values()):
        assert torch.equal(a, b), name


def test_tied_embeddings():
    m = VideoLlama(tiny(**{"decoder.tie_word_embeddings": True}))
    assert m.lm_head.weight is m.decoder.embed_tokens.weight


@pytest.mark.parametrize("max_shard_size", [5 * 2**30, 200_000])
def test_save_load_roundtrip(model, tmp_path, max_shard_size):
    m = VideoLlama(model.config).eval()
    m.load_state_dict(model.state_dict())
    open_gates(m, temporal=True, cross=True, frame_diff=True)
    m.save_pretrained(tmp_path, max_shard_size=max_shard_size)
    if max_shard_size < 2**20:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        files = sorted(set(index["weight_map"].values()))
        assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
        assert not (tmp_path / "model.safetensors").exists()
    else:
        assert (tmp_path / "model.safetensors").is_file()
    assert json.loads((tmp_path / "preprocessor.json").read_text())["size"] == 64
    loaded = VideoLlama.from_pretrained(tmp_path).eval()
    assert loaded.config == m.config
    a, b = m.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x, v = ids(), video()
    with torch.no_grad():
        assert torch.equal(loaded(x, v).logits, m(x, v).logits)


def test_save_load_tied_stores_once(tmp_path):
    torch.manual_seed(0)
    m = VideoLlama(tiny(**{"decoder.tie_word_embeddings": True}))
    m.save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    loaded = VideoLlama.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.lm_head.weight is loaded.decoder.embed_tokens.weight
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.lm_head.weight, m.lm_head.weight.detach().bfloat16())


def test_load_rejects_bad_checkpoints(model, tmp_path):
    model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    good = load_file(path)

    bad = dict(good)
    bad["decoder.layers.1.mlp.up_proj.weight"] = torch.zeros(255, 96)
    save_file(bad, path)
    with pytest.raises(ValueError, match=r"decoder\.layers\.1\.mlp\.up_proj\.weight.*\(255, 96\)") as e:
        VideoLlama.from_pretrained(tmp_path)
    assert "model.safetensors" in str(e.value)

    bad = {k: t for k, t in good.items() if k != "vision.temporal.1.gate"}
    save_file(bad, path)
    with pytest.raises(ValueError, match=r"missing tensors.*vision\.temporal\.1\.gate"):
        VideoLlama.from_pretrained(tmp_path)

    bad = dict(good, **{"decoder.extra.weight": torch.zeros(2)})
    save_file(bad, path)
    with pytest.raises(ValueError, match=r"model\.safetensors: unexpected tensor 'decoder\.extra\.weight'"):
        VideoLlama.from_pretrained(tmp_path)

    path.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        VideoLlama.from_pretrained(tmp_path)


@pytest.mark.parametrize("bad_video, message", [
    (torch.zeros(2, 3, 64, 64), "5-D"),
    (torch.zeros(2, 4, 1, 64, 64), "1 channels"),
    (torch.zeros(2, 4, 3, 32, 64), "32x64"),
    (torch.zeros(2, 17, 3, 64, 64), "17 frames"),
    (torch.zeros(3, 4, 3, 64, 64), "batch size mismatch"),
])
def test_bad_video_raises(model, bad_video, message):
    with pytest.raises(ValueError, match=message):
        model(ids(b=2, t=4), bad_video)


@pytest.mark.parametrize("bad_ids, message", [
    (torch.full((1, 4), V), r"\[0, 1024\)"),
    (torch.full((1, 4), -1), r"\[0, 1024\)"),
    (torch.zeros(1, 129, dtype=torch.long), "max_seq_len 128"),
    (torch.zeros(4, dtype=torch.long), "2-D"),
])
def test_bad_tokens_raise(model, bad_ids, message):
    with pytest.raises(ValueError, match=message):
        model(bad_ids)


def test_bad_masks_and_labels_raise(model):
    x = ids(b=2, t=4)
    with pytest.raises(ValueError, match="attention_mask shape"):
        model(x, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="labels shape"):
        model(x, labels=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="either video or visual_latents"):
        model(x, video(), visual_latents=torch.zeros(2, 16, 64))


@torch.no_grad()
def test_visual_latents_reuse_equals_video(model):
    m = VideoLlama(model.config).eval()
    m.load_state_dict(model.state_dict())
    open_gates(m, temporal=True, cross=True, frame_diff=True)
    x, v = ids(), video()
    latents = m.encode_video(v)
    assert latents.shape == (2, 16, 64)
    assert torch.equal(m(x, visual_latents=latents).logits, m(x, v).logits)


def test_video_index_shares_one_encoding_among_text_rows(model):
    """Three text rows about two videos (rows 0 and 2 about video 1) give the logits and the loss
    of the same rows with each row's video repeated, and gradients reach the encoder."""
    m = VideoLlama(model.config)
    m.load_state_dict(model.state_dict())
    open_gates(m, temporal=True, cross=True, frame_diff=True)
    x, v = ids(b=3, t=6), video(b=2)
    index = torch.tensor([1, 0, 1])
    labels = x.clone()
    labels[:, :2] = -100
    shared = m(x, v, video_index=index, labels=labels)
    with torch.no_grad():
        repeated = m(x, v[index], labels=labels)
    torch.testing.assert_close(shared.logits, repeated.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared.loss, repeated.loss, rtol=1e-5, atol=1e-6)
    shared.loss.backward()
    assert m.vision.embeddings.patch_embedding.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="one entry per row"):
        m(x, v, video_index=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"in \[0, 2\)"):
        m(x, v, video_index=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="video_index needs video"):
        m(x, video_index=index)


@torch.no_grad()
def test_no_resampler_reads_every_frame_token():
    """num_latents 0: the latents are the F x (1+N) frame tokens plus their frame's time embedding."""
    torch.manual_seed(0)
    m = VideoLlama(tiny(**{"resampler.num_latents": 0})).eval()
    open_gates(m, temporal=True, cross=True, frame_diff=True)
    assert m.resampler.latents is None and len(m.resampler.layers) == 0
    v = video(f=3)
    latents = m.encode_video(v)
    tokens = m.vision(v, apply_post_layernorm=True)  # [2, 3, 65, 64]
    assert latents.shape == (2, 3 * 65, 64)
    torch.testing.assert_close(latents, (tokens + m.resampler.time_embedding[:3, None]).flatten(1, 2))
    x = ids()
    assert torch.equal(m(x, visual_latents=latents).logits, m(x, v).logits)
    with pytest.raises(ValueError, match=r"\[batch, frames x 65, 64\]"):
        m(x, visual_latents=latents[:, :100])


@torch.no_grad()
def test_closed_gates_equal_plain_image_vit_bitwise(model):
    # The same ViT without any temporal part (temporal_every=0, no frame_diff) is the image ViT.
    plain = VideoLlama(tiny(**{"vision.temporal_every": 0, "vision.frame_diff": False})).eval()
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert missing == [] and all("temporal" in k or "frame_diff" in k for k in unexpected)
    v = video(b=2, f=3)
    assert torch.equal(model.vision(v), plain.vision(v))
    assert torch.equal(model.encode_video(v), plain.encode_video(v))


@torch.no_grad()
def test_bfloat16_forward_close_to_float32(model):
    m = VideoLlama(model.config).eval()
    m.load_state_dict(model.state_dict())
    open_gates(m, temporal=True, cross=True, frame_diff=True)
    x, v = ids(), video()
    ref = m(x, v).logits
    m.to(torch.bfloat16)
    low = m(x, v).logits  # float32 video in: the encoder casts it to the weights' dtype
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, rtol=0.05, atol=0.05)


@torch.no_grad()
def test_right_padding_and_all_ones_mask(model):
    x, v = ids(b=2, t=8), video()
    plain = model(x, v).logits
    assert torch.equal(model(x, v, attention_mask=torch.ones_like(x)).logits, plain)
    # Right padding (training batches): real tokens never see the pads after them.
    mask = torch.tensor([[1] * 5 + [0] * 3, [1] * 8])
    padded = model(x, v, attention_mask=mask).logits
    torch.testing.assert_close(padded[0, :5], plain[0, :5], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(padded).all()
