"""Weight import: parity with Hugging Face Llama and CLIP on tiny random checkpoints.

The one Hugging Face parity suite: Llama with GQA (untied) and MHA (tied), unpadded and left-padded;
CLIPVisionModel and CLIPModel, one image and a multi-frame video with the gates closed.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from videollama.cli import main as cli_main
from videollama.convert import convert
from videollama.model.videollama import VideoLlama

LLAMA_VOCAB = 320


def _tiny_llama(path, *, tie=False, kv_heads=2):
    cfg = transformers.LlamaConfig(
        vocab_size=LLAMA_VOCAB, hidden_size=96, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path, safe_serialization=True)
    return model


def _tiny_clip_vision(path, *, full_clip=False):
    vcfg = transformers.CLIPVisionConfig(image_size=64, patch_size=8, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, hidden_act="quick_gelu")
    torch.manual_seed(1)
    if full_clip:
        tcfg = transformers.CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=37,
                                           num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=16)
        model = transformers.CLIPModel(transformers.CLIPConfig(text_config=tcfg.to_dict(),
                                                               vision_config=vcfg.to_dict())).eval()
    else:
        model = transformers.CLIPVisionModel(vcfg).eval()
    # Fresh HF inits leave some tensors at exact constants; randomise so the test can see swaps.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(path, safe_serialization=True)
    return model


@pytest.mark.parametrize("tie,kv_heads", [(False, 2), (True, 4)])
def test_llama_parity(tmp_path, tie, kv_heads):
    hf = _tiny_llama(tmp_path / "llama", tie=tie, kv_heads=kv_heads)
    ours = convert(llama=tmp_path / "llama", preset="tiny", vocab_size=LLAMA_VOCAB, log=lambda *_: None).eval()
    ids = torch.randint(0, LLAMA_VOCAB, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids).logits
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4
    # Left padding: HF's positions come from the mask too; compare the real positions.
    mask = torch.tensor([[0, 0, 0] + [1] * 14, [1] * 17])
    with torch.no_grad():
        ours_padded = ours(ids, attention_mask=mask).logits
        hf_padded = hf(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    torch.testing.assert_close(ours_padded[0, 3:], hf_padded[0, 3:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("full_clip", [False, True])
def test_clip_vision_parity(tmp_path, full_clip):
    hf = _tiny_clip_vision(tmp_path / "clip", full_clip=full_clip)
    ours = convert(vision=tmp_path / "clip", preset="tiny", log=lambda *_: None).eval()
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf_vision = hf.vision_model if full_clip else hf
        expected = hf_vision(pixel_values=pixels).last_hidden_state            # (3 images, 1+N, D)
        one_frame = ours.vision(pixels[:1].unsqueeze(1))                       # (1, 1 frame, 1+N, D)
        assert (one_frame[0, 0] - expected[0]).abs().max().item() <= 1e-4
        # Gates at zero: a 3-frame video is encoded exactly as the image ViT encodes each frame.
        video = ours.vision(pixels.unsqueeze(0))                               # (1, 3, 1+N, D)
        assert (video[0] - expected).abs().max().item() <= 1e-4


def test_vocab_mismatch_reinitialises_embeddings(tmp_path):
    hf = _tiny_llama(tmp_path / "llama")
    messages = []
    ours = convert(llama=tmp_path / "llama", preset="tiny", log=messages.append)   # tiny vocab 1024 != 320
    assert any("RE-INITIALISED" in m for m in messages)
    assert ours.decoder.embed_tokens.weight.shape[0] == ours.config.decoder.vocab_size != LLAMA_VOCAB
    # The blocks are still the imported ones.
    assert torch.equal(ours.decoder.layers[0].self_attn.q_proj.weight, hf.model.layers[0].self_attn.q_proj.weight)


def test_refuses_pickled_checkpoints(tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (d / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="safetensors"):
        convert(llama=d, preset="tiny", log=lambda *_: None)


def test_cli_convert_writes_a_model_directory(tmp_path, capsys):
    hf = _tiny_llama(tmp_path / "llama")
    _tiny_clip_vision(tmp_path / "clip")
    out = tmp_path / "model"
    rc = cli_main(["convert", "--llama", str(tmp_path / "llama"), "--vision", str(tmp_path / "clip"),
                   "--preset", "tiny", "--vocab-size", str(LLAMA_VOCAB), "--out", str(out)])
    assert rc == 0
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    model = VideoLlama.from_pretrained(out).eval()
    ids = torch.randint(0, LLAMA_VOCAB, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (model(ids).logits - hf(ids).logits).abs().max().item() <= 1e-4
