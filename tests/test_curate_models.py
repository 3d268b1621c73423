"""Model stages of curation against independent references.

* CLIP similarity: a tiny random ``CLIPModel`` (and a CLIP tokenizer) saved to a folder by the
  test; the stage's score of a clip and a text must equal the mean over frames of transformers'
  own ``CLIPModel(...).logits_per_image`` within 1e-4.
* PMI: a tiny VideoLlama with a tokenizer; each score must equal mean log p(text | video) minus
  mean log p(text | no video), computed one text at a time from the model's own forward.
* Captions: the batched captioner must give what ``generate`` gives for each clip alone.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from videollama.curate.clipscore import ClipScorer, clip_preprocess  # noqa: E402
from videollama.curate.pmi import Captioner, PmiScorer, model_spec  # noqa: E402

LETTERS = "abcdefghijklmnopqrstuvwxyz"
TEXTS = [["a red square moves left", "a blue circle"], ["a green triangle stays still"], []]


def _clip_folder(path):
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{c: 2 + i for i, c in enumerate(LETTERS)},
             **{c + "</w>": 28 + i for i, c in enumerate(LETTERS)}}
    tok = transformers.CLIPTokenizer(vocab=vocab, merges=[])
    tcfg = transformers.CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                       num_attention_heads=4, max_position_embeddings=40, bos_token_id=0,
                                       eos_token_id=1, pad_token_id=1)
    vcfg = transformers.CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
                                         num_hidden_layers=1, num_attention_heads=4)
    torch.manual_seed(0)
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=tcfg.to_dict(), vision_config=vcfg.to_dict(),
                                                           projection_dim=16)).eval()
    with torch.no_grad():  # HF's fresh init leaves constants (layer norms); randomise everything
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    pre = {"crop_size": {"height": 32, "width": 32}, "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3]}
    (path / "preprocessor_config.json").write_text(json.dumps(pre))
    return model, tok


def _frames(seed: int, n: int, size: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_clip_scores_equal_transformers_logits_per_image(tmp_path):
    folder = tmp_path / "clip"
    reference, tok = _clip_folder(folder)
    assert clip_preprocess(folder) == (32, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    scorer = ClipScorer(folder, num_frames=3, fps=1.0)
    assert scorer.spec == (3, 1.0, 32)
    clips = [(_frames(i, 3, 32), texts) for i, texts in enumerate(TEXTS)]
    got = scorer.score(clips)
    mean = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    for (frames, texts), result in zip(clips, got):
        assert len(result["scores"]) == len(texts)
        pixels = (torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255 - mean) / std
        if texts:
            inputs = tok(texts, padding=True, return_tensors="pt")
            with torch.no_grad():
                logits = reference(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                   pixel_values=pixels).logits_per_image  # [F, T]
            expected = logits.mean(dim=0)
            assert torch.allclose(torch.tensor(result["scores"]), expected, atol=1e-4, rtol=0)
            # the scores tell the texts apart (a score equal for every text would pass nothing)
            assert len(texts) < 2 or abs(expected[0] - expected[1]) > 1e-3
        with torch.no_grad():
            image = reference.get_image_features(pixel_values=pixels)
        image = image if isinstance(image, torch.Tensor) else image.pooler_output
        image = image / image.norm(dim=-1, keepdim=True)
        embedding = image.mean(0) / image.mean(0).norm()
        assert torch.allclose(torch.tensor(result["embedding"]), embedding, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_videollama(tmp_path_factory):
    from videollama.config import VideoLlamaConfig
    from videollama.data.tokenizer import train_tokenizer
    from videollama.model.videollama import VideoLlama

    path = tmp_path_factory.mktemp("model")
    cfg = VideoLlamaConfig.from_name("tiny").with_overrides({
        "preprocess.num_frames": 2, "preprocess.size": 32, "vision.image_size": 32, "vision.max_frames": 2,
        "vision.gate_init": 1.0, "decoder.cross_attn_gate_init": 1.0})
    torch.manual_seed(0)
    model = VideoLlama(cfg).eval()
    tok = train_tokenizer([t for ts in TEXTS for t in ts] * 4, vocab_size=300)
    model.save_pretrained(path, tokenizer=tok)
    return path, model, tok


def _mean_logp(model, ids, labels, video):
    logits = model(torch.tensor([ids]), video).logits[0, :-1]  # [T-1, V]
    logp = torch.log_softmax(logits.double(), dim=-1)
    picked = [logp[t, labels[t + 1]].item() for t in range(len(ids) - 1) if labels[t + 1] != -100]
    return sum(picked) / len(picked)


def test_pmi_equals_forward_with_and_without_video(tiny_videollama):
    from videollama.curate.clipscore import normalise
    from videollama.data.tokenizer import caption_prompt, encode_example

    path, model, tok = tiny_videollama
    assert model_spec(path)[0] == (2, 4.0, 32)
    scorer = PmiScorer(path)
    clips = [(_frames(10 + i, 2, 32), texts) for i, texts in enumerate(TEXTS)]
    got = scorer.score(clips)
    pre = model.config.preprocess
    for (frames, texts), result in zip(clips, got):
        video = normalise(frames, pre.mean, pre.std)[None]  # [1, F, 3, S, S]
        for text, score, with_video, without in zip(texts, result["scores"], result["logp_video"],
                                                    result["logp_text"]):
            ids, labels = encode_example(tok, caption_prompt(), text, model.config.decoder.max_seq_len)
            with torch.no_grad():
                expected_v = _mean_logp(model, ids, labels, video)
                expected_t = _mean_logp(model, ids, labels, None)
            assert abs(with_video - expected_v) < 1e-4 and abs(without - expected_t) < 1e-4
            assert abs(score - (expected_v - expected_t)) < 1e-4
            assert abs(expected_v - expected_t) > 1e-6  # the video changes the model's belief
    # different videos give different scores for one text (the video reaches the decoder)
    same = scorer.score([(_frames(1, 2, 32), ["a blue circle"]), (_frames(2, 2, 32), ["a blue circle"])])
    assert abs(same[0]["scores"][0] - same[1]["scores"][0]) > 1e-6


def _token_logp(model, ids, labels, video):
    logits = model(torch.tensor([ids]), video).logits[0, :-1]  # [T-1, V]
    logp = torch.log_softmax(logits.double(), dim=-1)
    return [logp[t, labels[t + 1]].item() for t in range(len(ids) - 1) if labels[t + 1] != -100]


def test_pmi_sum_and_max_span_equal_per_token_forward(tiny_videollama):
    """pmi_sum / pmi_span against per-token PMI from the model's own forward, one text at a time,
    the best span found by trying every contiguous run (not Kadane)."""
    from videollama.curate.clipscore import normalise
    from videollama.data.tokenizer import caption_prompt, encode_example

    path, model, tok = tiny_videollama
    scorer = PmiScorer(path)
    clips = [(_frames(30 + i, 2, 32), texts) for i, texts in enumerate(TEXTS)]
    got = scorer.score(clips)
    pre = model.config.preprocess
    spans_differ = False
    for (frames, texts), result in zip(clips, got):
        video = normalise(frames, pre.mean, pre.std)[None]
        for j, text in enumerate(texts):
            ids, labels = encode_example(tok, caption_prompt(), text, model.config.decoder.max_seq_len)
            with torch.no_grad():
                pmi = [a - b for a, b in zip(_token_logp(model, ids, labels, video),
                                             _token_logp(model, ids, labels, None))]
            best = max(sum(pmi[a:b]) for a in range(len(pmi)) for b in range(a + 1, len(pmi) + 1))
            assert abs(result["pmi_sum"][j] - sum(pmi)) < 1e-4
            assert abs(result["pmi_span"][j] - best) < 1e-4
            assert abs(result["scores"][j] - sum(pmi) / len(pmi)) < 1e-4  # the mean stays the pmi column
            spans_differ |= abs(best - sum(pmi)) > 1e-6
    assert spans_differ  # some text has a negative stretch that the best span leaves out


def test_marginal_pmi_equals_mean_over_reference_clips(tiny_videollama):
    """The marginal prior against the model's own forward: per token, log of the mean over the
    reference clips of p(token | prefix, clip), each clip run alone, one text at a time."""
    import math

    from videollama.curate.clipscore import normalise
    from videollama.data.tokenizer import caption_prompt, encode_example

    path, model, tok = tiny_videollama
    scorer = PmiScorer(path)
    scorer.MAX_ROWS = 5  # several decoder passes per batch: the chunking must not change a number
    pre = model.config.preprocess
    ref_frames = [_frames(50 + r, 2, 32) for r in range(3)]
    reference = scorer.reference_latents(["r0", "r1", "r2"], ref_frames)
    assert scorer.reference_latents(["r0", "r1", "r2"], ref_frames) is reference  # encoded once per set
    clips = [(_frames(60 + i, 2, 32), texts) for i, texts in enumerate(TEXTS)]
    got = scorer.score(clips, reference=reference)
    plain = scorer.score(clips)
    for (frames, texts), result, without in zip(clips, got, plain):
        assert result["scores"] == without["scores"] and result["pmi_sum"] == without["pmi_sum"]
        assert without["pmi_marginal"] == [None] * len(texts)
        video = normalise(frames, pre.mean, pre.std)[None]
        for j, text in enumerate(texts):
            ids, labels = encode_example(tok, caption_prompt(), text, model.config.decoder.max_seq_len)
            with torch.no_grad():
                own = _token_logp(model, ids, labels, video)
                refs = [_token_logp(model, ids, labels, normalise(f, pre.mean, pre.std)[None]) for f in ref_frames]
            prior = [math.log(sum(math.exp(r[t]) for r in refs) / len(refs)) for t in range(len(own))]
            pmi = [a - b for a, b in zip(own, prior)]
            best = max(sum(pmi[a:b]) for a in range(len(pmi)) for b in range(a + 1, len(pmi) + 1))
            assert abs(result["pmi_marginal"][j] - sum(pmi) / len(pmi)) < 1e-4
            assert abs(result["pmi_marginal_sum"][j] - sum(pmi)) < 1e-4
            assert abs(result["pmi_marginal_span"][j] - best) < 1e-4
            assert abs(result["pmi_marginal_sum"][j] - result["pmi_sum"][j]) > 1e-6  # another prior


def test_reference_clips_are_evenly_spaced_and_part_of_the_batch_digest(tmp_path):
    from videollama.curate.pipeline import reference_clips
    from videollama.curate.records import make_batches
    from videollama.curate.rows import ClipRow

    live = [ClipRow(f"v-{i:04d}", "v", 0.0, 1.0, 1.0, 64, 64, 1.0, ["t"]) for i in range(10)][::-1]
    assert reference_clips(live, 4) == ["v-0000", "v-0002", "v-0005", "v-0007"]
    assert reference_clips(live, 20) == sorted(r.clip_id for r in live)
    assert reference_clips(live, 0) == []
    clips = [(f"v-{i:04d}", ["t"]) for i in range(3)]
    plain = make_batches("pmi", clips, 2, tmp_path)
    with_ref = make_batches("pmi", clips, 2, tmp_path, reference=["v-0000"])
    other_ref = make_batches("pmi", clips, 2, tmp_path, reference=["v-0001"])
    assert "reference" not in plain[0] and with_ref[0]["reference"] == ["v-0000"]
    assert len({plain[0]["record"], with_ref[0]["record"], other_ref[0]["record"]}) == 3


def test_captioner_matches_generate_per_clip(tiny_videollama):
    from videollama.curate.clipscore import normalise
    from videollama.data.tokenizer import caption_prompt, encode_prompt
    from videollama.inference.generate import generate

    path, model, tok = tiny_videollama
    captioner = Captioner(path, max_new_tokens=6)
    frames = [_frames(20 + i, 2, 32) for i in range(3)]
    got = captioner.caption(frames)
    pre = model.config.preprocess
    ids = torch.tensor([encode_prompt(tok, caption_prompt())])
    for clip, caption in zip(frames, got):
        new = generate(model, ids, normalise(clip, pre.mean, pre.std)[None], max_new_tokens=6,
                       eos_token_id=model.config.decoder.eos_token_id)[0].tolist()
        if 2 in new:
            new = new[:new.index(2)]
        assert caption == tok.decode([i for i in new if i != 0], skip_special_tokens=True).strip()
