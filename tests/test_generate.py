"""KV-cache generation against repeated full forwards, sampling, and the `generate` command."""

from __future__ import annotations

import pytest
import torch

from conftest import sharpened_tiny_model, token_ids, video_frames
from reference_decode import reference_generate
from videollama.cli import main
from videollama.config import VideoLlamaConfig
from videollama.inference.generate import generate, sample
from videollama.model import VideoLlama

V = 1024


@pytest.fixture(scope="module", params=[16, 0], ids=["resampler", "no-resampler"])
def model(request) -> VideoLlama:
    # num_latents 0: the decoder reads every frame token (the Shapes preset's choice).
    return sharpened_tiny_model(request.param)


def video(b: int = 1, f: int = 4, seed: int = 1) -> torch.Tensor:
    return video_frames(b, f, seed)


def ids(b: int = 1, t: int = 6, seed: int = 2) -> torch.Tensor:
    return token_ids(b, t, seed)


@torch.no_grad()
def greedy_by_full_forwards(model, input_ids, video, n):
    """The reference: no cache, the whole sequence through forward() at every step."""
    seq = input_ids
    for _ in range(n):
        nxt = model(seq, video).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    return seq[:, input_ids.shape[1]:]


@pytest.mark.parametrize("with_video", [False, True])
def test_kv_cache_greedy_equals_full_forwards(model, with_video):
    x = ids(b=2, t=7)
    v = video(b=2) if with_video else None
    expected = greedy_by_full_forwards(model, x, v, 12)
    got = generate(model, x, v, max_new_tokens=12)
    assert got.shape == (2, 12) and got.dtype == torch.long
    assert torch.equal(got, expected)
    if with_video:  # the video matters: without it the answer differs
        assert not torch.equal(generate(model, x, max_new_tokens=12), got)


def test_left_padded_batch_equals_each_prompt_alone(model):
    v = video(b=3)
    prompts = [ids(t=3, seed=10), ids(t=8, seed=11), ids(t=5, seed=12)]
    t = max(p.shape[1] for p in prompts)
    batch = torch.cat([torch.cat([torch.zeros(1, t - p.shape[1], dtype=torch.long), p], 1) for p in prompts])
    mask = torch.cat([torch.cat([torch.zeros(1, t - p.shape[1], dtype=torch.long),
                                 torch.ones_like(p)], 1) for p in prompts])
    got = generate(model, batch, v, max_new_tokens=10, attention_mask=mask)
    for i, p in enumerate(prompts):
        alone = generate(model, p, v[i:i + 1], max_new_tokens=10)
        assert torch.equal(got[i], alone[0]), f"row {i}"


def test_visual_latents_reuse_equals_video(model):
    x, v = ids(), video()
    latents = model.encode_video(v)
    assert torch.equal(generate(model, x, visual_latents=latents, max_new_tokens=8),
                       generate(model, x, v, max_new_tokens=8))


def test_eos_then_pad_and_early_stop(model):
    x = ids(b=2, t=5)
    free = generate(model, x, max_new_tokens=10)
    # Pretend a token of row 0 (its third, or the first later one that fits) is EOS: one row 0 emits
    # there for the first time and row 1 never emits, so row 0 stops and row 1 runs on.
    row0, row1 = free[0].tolist(), free[1].tolist()
    k = next((k for k in range(2, 10) if row0[k] not in row0[:k] and row0[k] not in row1), None)
    assert k is not None, f"no token of row 0 is absent from row 1: {free.tolist()}"
    eos = row0[k]
    got = generate(model, x, max_new_tokens=10, eos_token_id=eos)
    assert got.shape == (2, 10)
    assert torch.equal(got[0, :k + 1], free[0, :k + 1])
    assert (got[0, k + 1:] == model.config.decoder.pad_token_id).all()
    assert torch.equal(got[1], free[1])  # row 1 never emits it: the full length, unchanged
    # Every row stopped: generation ends early.
    single = generate(model, x[:1], max_new_tokens=10, eos_token_id=eos)
    assert single.shape == (1, k + 1) and torch.equal(single[0], free[0, :k + 1])


def test_sampling_is_seeded_and_top_p_small_is_greedy(model):
    x, v = ids(), video()
    a = generate(model, x, v, max_new_tokens=10, temperature=1.0, generator=torch.Generator().manual_seed(3))
    b = generate(model, x, v, max_new_tokens=10, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    greedy = generate(model, x, v, max_new_tokens=10)
    tiny_p = generate(model, x, v, max_new_tokens=10, temperature=1.0, top_p=1e-6,
                      generator=torch.Generator().manual_seed(4))
    assert torch.equal(tiny_p, greedy)  # the nucleus always keeps the top token, and only it here


def test_nucleus_sampling_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, -1)
    draws = sample(logits, temperature=1.0, top_p=0.7, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=4).float() / 4000
    # 0.5 + 0.3 reaches 0.7: only tokens 0 and 1 survive, renormalised to 0.625 / 0.375.
    assert counts[2] == 0 and counts[3] == 0
    assert abs(float(counts[0]) - 0.625) < 0.03
    full = sample(logits, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert abs(float((full == 3).float().mean()) - 0.05) < 0.015
    assert torch.equal(sample(logits[:2], temperature=0.0), torch.zeros(2, dtype=torch.long))


def test_generate_bad_arguments(model):
    x = ids(t=100)
    with pytest.raises(ValueError, match=r"100 tokens \+ 29 new is longer than max_seq_len 128"):
        generate(model, x, max_new_tokens=29)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, ids(), max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, ids(), max_new_tokens=2, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="LEFT-padded"):
        generate(model, ids(t=3), max_new_tokens=2, attention_mask=torch.tensor([[1, 1, 0]]))
    with pytest.raises(ValueError, match="batch size mismatch"):
        generate(model, ids(b=2), video(b=1), max_new_tokens=2)


# ---- the command line -------------------------------------------------------------------

def make_model_dir(tmp_path, **overrides):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from videollama.data.tokenizer import SPECIAL_TOKENS

    texts = ["a red square moves left.", "a blue circle stays still.", "which way does the green triangle move?"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts * 5, trainer=trainer)
    assert tok.get_vocab_size() <= V
    tok.save(str(tmp_path / "tokenizer.json"))
    torch.manual_seed(0)
    # The tokenizer's vocabulary: every id the random model can emit decodes to text.
    cfg = VideoLlamaConfig.from_name("tiny").with_overrides({"decoder.vocab_size": tok.get_vocab_size(), **overrides})
    model = VideoLlama(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
        for block in model.decoder.cross_attn_layers:
            block.attn_gate.fill_(1.0)
    model.save_pretrained(tmp_path)
    return model, tok


def test_cli_generate_text_only(tmp_path, capsys):
    model, tok = make_model_dir(tmp_path)
    prompt = "a red square"
    rc = main(["generate", "--model", str(tmp_path), "--prompt", prompt, "--max-new-tokens", "6"])
    assert rc == 0
    printed = capsys.readouterr().out.strip()
    # Independent path: the tokenizer's own encoding, BOS first, then generate() directly.
    x = torch.tensor([[1] + tok.encode(prompt, add_special_tokens=False).ids])
    new = generate(model, x, max_new_tokens=6, eos_token_id=2)[0].tolist()
    assert printed == tok.decode([i for i in new if i != 2], skip_special_tokens=True).strip()
    assert printed  # a random model still says something (special tokens aside)


def _sweep_clip(path):
    """A bright bar sweeping right: 30 frames at 25 FPS (1.2 s, more than a 1 s window at 4 FPS)."""
    import av
    import numpy as np

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        for i in range(30):
            rgb = np.full((64, 64, 3), 40, dtype=np.uint8)
            rgb[:, 2 * i:2 * i + 6] = 230
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_cli_generate_with_video(tmp_path, capsys):
    """The video is seen whole (issue 21; it was one centred window before): the 1.2 s clip is two
    1 s windows (at 0 and 0.2 s) under the policy, and the answer is generate() on exactly the
    windows load_windows gives, through the model's own windows path."""
    from videollama.data.tokenizer import encode_prompt, videoqa_prompt
    from videollama.data.windows import load_windows
    from videollama.model.videollama import Windows

    model, tok = make_model_dir(tmp_path, **{"preprocess.num_frames": 4})
    path = tmp_path / "clip.mp4"
    _sweep_clip(path)
    args = ["generate", "--model", str(tmp_path), "--prompt", "which way?", "--template", "videoqa",
            "--max-new-tokens", "5"]
    assert main(args + ["--video", str(path)]) == 0
    with_video = capsys.readouterr().out.strip()

    frames, times = load_windows(path, model.config.preprocess)  # [W, F, 3, S, S], [W, F]
    assert times.flatten().tolist() == pytest.approx([0.0, 0.25, 0.5, 0.75, 0.2, 0.45, 0.7, 0.95])
    x = torch.tensor([encode_prompt(tok, videoqa_prompt("which way?"))])
    windows = Windows(times=times, video=torch.zeros(2, dtype=torch.long))
    new = generate(model, x, frames, windows=windows, max_new_tokens=5, eos_token_id=2)[0].tolist()
    assert with_video == tok.decode([i for i in new if i != 2], skip_special_tokens=True).strip()

    # --show-frames: every frame time the model saw, a line per window, then the same answer.
    assert main(args + ["--video", str(path), "--show-frames"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "frames (s) of 2 window(s) over 1.20 s:"
    assert lines[1:3] == [f"  window {w + 1}: " + " ".join(f"{t:.2f}" for t in times[w].tolist()) for w in range(2)]
    assert lines[3:] == [with_video]
    assert main(args + ["--show-frames"]) == 2  # nothing to show without a video
    assert "--show-frames needs --video" in capsys.readouterr().err


def test_generate_in_bfloat16(model):
    m = VideoLlama(model.config).eval()
    m.load_state_dict(model.state_dict())
    m.to(torch.bfloat16)
    assert m.decoder.new_kv_cache(1, 4)[0].k.dtype == torch.bfloat16
    x, v = ids(), video()
    got = generate(m, x, v, max_new_tokens=4)
    # The first token comes from the prefill alone: it must equal the bf16 full forward's choice.
    assert got.shape == (1, 4) and int(got[0, 0]) == int(m(x, v).logits[0, -1].argmax())


# ---- the static-shape step and its compiled form ----------------------------------------

def test_static_cache_equals_dynamic_cache(model):
    v = video(b=3)
    prompts = [ids(t=3, seed=40), ids(t=8, seed=41), ids(t=5, seed=42)]
    t = max(p.shape[1] for p in prompts)
    batch = torch.cat([torch.cat([torch.zeros(1, t - p.shape[1], dtype=torch.long), p], 1) for p in prompts])
    mask = (torch.arange(t)[None] >= torch.tensor([[t - p.shape[1]] for p in prompts])).long()
    for vid in (None, v):
        static = generate(model, batch, vid, max_new_tokens=12, attention_mask=mask)
        dynamic = reference_generate(model, batch, vid, max_new_tokens=12, attention_mask=mask)
        assert torch.equal(static, dynamic)
    # One generation path: the static cache is the only one generate() has.
    with pytest.raises(TypeError, match="cache"):
        generate(model, batch, max_new_tokens=2, cache="dynamic")


@pytest.mark.slow
def test_compiled_step_compiles_once(model, monkeypatch):
    from torch._dynamo.utils import counters

    from videollama.inference.generate import COMPILED, STEP_ENV

    # The compiled step itself, whatever this host measured faster for these shapes before (an
    # earlier test or run may have kept "eager" for one of them: then nothing would compile).
    monkeypatch.setenv(STEP_ENV, "compiled")
    monkeypatch.setitem(COMPILED, "choices", {})
    torch._dynamo.reset()
    counters.clear()
    x, v = ids(b=2, t=6), video(b=2)
    for vid in (None, v):
        eager = generate(model, x, vid, max_new_tokens=16)
        got = generate(model, x, vid, max_new_tokens=16, compile=True)
        assert "failed" not in COMPILED, COMPILED.get("failed")
        assert torch.equal(got, eager)
    # 2 x 15 steps, each at another position and cache length used: one graph per media / no media.
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
