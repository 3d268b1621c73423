"""Weight import: parity with Hugging Face Llama and CLIP on tiny random checkpoints.

The one Hugging Face parity suite: Llama with GQA (untied) and MHA (tied), unpadded and left-padded;
Llama-3 RoPE (theta 500,000; rope_type llama3 and linear) as transformers 5 writes it
(``rope_parameters``) and as transformers 4 did (``rope_theta`` + ``rope_scaling``);
CLIPVisionModel and CLIPModel, one image and a multi-frame video with the gates closed.
Then the vocabulary and tokenizer rules of ``videollama convert``.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import transformers

from videollama.cli import main as cli_main
from videollama.convert import convert
from videollama.model.videollama import VideoLlama

LLAMA_VOCAB = 320


def _tiny_llama(path, *, tie=False, kv_heads=2, rope_parameters=None):
    cfg = transformers.LlamaConfig(
        vocab_size=LLAMA_VOCAB, hidden_size=96, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128,
        rms_norm_eps=1e-5, tie_word_embeddings=tie,
        rope_parameters=rope_parameters or {"rope_type": "default", "rope_theta": 10000.0},
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
    ours = convert(llama=tmp_path / "llama", preset="tiny", vocab_size=1024, log=messages.append)   # != 320
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


# ---- Llama-3 RoPE ------------------------------------------------------------------------------

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def _logits_max_diff(ours, hf, length, seed=0):
    ids = torch.randint(0, LLAMA_VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return (ours(ids).logits - hf(ids).logits).abs().max().item()


def test_llama3_theta_gqa_untied_parity(tmp_path):
    """Llama-3: GQA (4 heads, 2 kv), untied head, theta 500,000 in transformers 5's rope_parameters."""
    hf = _tiny_llama(tmp_path / "llama", kv_heads=2,
                     rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    saved = json.loads((tmp_path / "llama" / "config.json").read_text())
    assert saved["rope_parameters"]["rope_theta"] == 500000.0 and "rope_theta" not in saved  # the new form only
    ours = convert(llama=tmp_path / "llama", preset="tiny", vocab_size=LLAMA_VOCAB, log=lambda *_: None).eval()
    assert ours.config.decoder.rope_theta == 500000.0 and ours.config.decoder.rope_type == "default"
    assert not ours.config.decoder.tie_word_embeddings and ours.config.decoder.kv_heads == 2
    assert _logits_max_diff(ours, hf, 40) <= 1e-4
    # The test can see the bug: at the theta the old import used, the logits are far off.
    wrong = convert(llama=tmp_path / "llama", preset="tiny", vocab_size=LLAMA_VOCAB,
                    overrides={"decoder.rope_theta": 10000.0}, log=lambda *_: None).eval()
    assert _logits_max_diff(wrong, hf, 40) > 1e-3  # measured: 8e-3, 80x the tolerance


@pytest.mark.parametrize("rope", [LLAMA3_ROPE, {"rope_type": "linear", "rope_theta": 500000.0, "factor": 4.0}],
                         ids=["llama3", "linear"])
def test_scaled_rope_parity(tmp_path, rope):
    """rope_type llama3 (Llama-3.1+) and linear; 48 positions, past original_max_position_embeddings (32)."""
    hf = _tiny_llama(tmp_path / "llama", rope_parameters=dict(rope))
    ours = convert(llama=tmp_path / "llama", preset="tiny", vocab_size=LLAMA_VOCAB, log=lambda *_: None).eval()
    d = ours.config.decoder
    assert (d.rope_type, d.rope_theta, d.rope_factor) == (rope["rope_type"], 500000.0, rope["factor"])
    if rope["rope_type"] == "llama3":
        assert (d.rope_low_freq_factor, d.rope_high_freq_factor) == (1.0, 4.0)
        assert d.rope_original_max_position_embeddings == 32
    assert _logits_max_diff(ours, hf, 48) <= 1e-4
    # Without the rescaling (plain RoPE at the same theta) the logits differ: the scaling matters here.
    plain = convert(llama=tmp_path / "llama", preset="tiny", vocab_size=LLAMA_VOCAB,
                    overrides={"decoder.rope_type": "default"}, log=lambda *_: None).eval()
    assert _logits_max_diff(plain, hf, 48) > 1e-3  # measured: 1e-2 (llama3), 2e-2 (linear)


def test_transformers4_rope_form_parity(tmp_path):
    """A config.json in transformers 4's form: top-level rope_theta, rope_scaling with the old "type" key."""
    hf = _tiny_llama(tmp_path / "llama", rope_parameters=dict(LLAMA3_ROPE))
    path = tmp_path / "llama" / "config.json"
    saved = json.loads(path.read_text())
    rope = saved.pop("rope_parameters")
    saved["rope_theta"] = rope.pop("rope_theta")
    saved["rope_scaling"] = {"type": rope.pop("rope_type"), **rope}
    path.write_text(json.dumps(saved))
    ours = convert(llama=tmp_path / "llama", preset="tiny", vocab_size=LLAMA_VOCAB, log=lambda *_: None).eval()
    assert (ours.config.decoder.rope_type, ours.config.decoder.rope_theta) == ("llama3", 500000.0)
    assert _logits_max_diff(ours, hf, 48) <= 1e-4


def test_rope_forms():
    from videollama.hf_config import rope_overrides

    def read(hf):
        o = rope_overrides({"max_position_embeddings": 64, **hf})
        return o["decoder.rope_type"], o["decoder.rope_theta"]

    assert read({}) == ("default", 10000.0)
    assert read({"rope_theta": 500000.0, "rope_scaling": None}) == ("default", 500000.0)     # transformers 4
    assert read({"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}) == ("default", 500000.0)
    assert read({"rope_theta": 1.0, "rope_parameters": {"rope_type": "default", "rope_theta": 2.0}}) == ("default", 2.0)
    o = rope_overrides({"rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 2}})
    assert (o["decoder.rope_type"], o["decoder.rope_factor"]) == ("linear", 2.0)
    # llama3 without original_max_position_embeddings falls back to max_position_embeddings, as in transformers.
    o = rope_overrides({"max_position_embeddings": 64, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 5.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}})
    assert o["decoder.rope_original_max_position_embeddings"] == 64
    with pytest.raises(ValueError, match="needs \\['low_freq_factor', 'high_freq_factor'\\]"):
        rope_overrides({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        rope_overrides({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}})


@pytest.mark.parametrize("rope", [
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32},
    {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
], ids=["yarn", "dynamic"])
def test_unsupported_rope_type_is_refused(tmp_path, rope):
    _tiny_llama(tmp_path / "llama", rope_parameters=dict(rope))
    config = tmp_path / "llama" / "config.json"
    assert json.loads(config.read_text())["rope_parameters"]["rope_type"] == rope["rope_type"]
    with pytest.raises(ValueError, match=re.escape(f"{config}: rope_type '{rope['rope_type']}' is not supported")):
        convert(llama=tmp_path / "llama", preset="tiny", vocab_size=LLAMA_VOCAB, log=lambda *_: None)


def test_old_model_config_without_rope_fields_loads_unchanged(tmp_path):
    """A config.json written before the rope_* fields existed still loads, with plain RoPE."""
    from videollama.config import VideoLlamaConfig

    cfg = VideoLlamaConfig.from_name("tiny")
    d = cfg.to_dict()
    for key in [k for k in d["decoder"] if k.startswith("rope_") and k != "rope_theta"]:
        del d["decoder"][key]
    (tmp_path / "config.json").write_text(json.dumps(d))
    loaded = VideoLlamaConfig.load(tmp_path)
    assert loaded == cfg and loaded.decoder.rope_type == "default"


# ---- vocabulary and tokenizer ------------------------------------------------------------------


def _our_tokenizer(path, vocab_size=300):
    """A byte-level BPE with VideoLlama's special tokens (ids 0..6), saved as path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from videollama.data.tokenizer import SPECIAL_TOKENS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["a red square moves left.", "a blue circle stays still."] * 20, trainer=trainer)
    tok.save(str(path))
    return tok


def _llama_style_tokenizer(path):
    """A tokenizer.json as Llama checkpoints ship one: no VideoLlama special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=LLAMA_VOCAB, special_tokens=["<unk>", "<|begin_of_text|>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, the llama says hello."] * 20, trainer=trainer)
    tok.save(str(path))
    return tok


def test_tokenizer_sets_the_vocabulary(tmp_path, capsys):
    _tiny_llama(tmp_path / "llama")
    tok = _our_tokenizer(tmp_path / "tokenizer.json")
    n = tok.get_vocab_size()
    assert n < LLAMA_VOCAB < 1024  # smaller than the checkpoint's and the tiny preset's
    out = tmp_path / "model"
    rc = cli_main(["convert", "--llama", str(tmp_path / "llama"), "--tokenizer", str(tmp_path / "tokenizer.json"),
                   "--preset", "tiny", "--out", str(out)])
    assert rc == 0
    assert "RE-INITIALISED" in capsys.readouterr().out
    model = VideoLlama.from_pretrained(out)
    assert model.config.decoder.vocab_size == n == model.lm_head.weight.shape[0]
    assert (model.config.decoder.bos_token_id, model.config.decoder.eos_token_id) == (1, 2)
    assert (out / "tokenizer.json").read_bytes() == (tmp_path / "tokenizer.json").read_bytes()
    # An explicit, larger --vocab-size wins; vision-only conversions follow the same rule.
    from tokenizers import Tokenizer

    saved = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert convert(llama=tmp_path / "llama", preset="tiny", vocab_size=n + 5, tokenizer=saved,
                   log=lambda *_: None).config.decoder.vocab_size == n + 5
    _tiny_clip_vision(tmp_path / "clip")
    assert convert(vision=tmp_path / "clip", preset="tiny", tokenizer=saved,
                   log=lambda *_: None).config.decoder.vocab_size == n


def test_vocab_size_below_the_tokenizer_is_an_error(tmp_path):
    _tiny_llama(tmp_path / "llama")
    tok = _our_tokenizer(tmp_path / "tokenizer.json")
    out = tmp_path / "model"
    n = tok.get_vocab_size()
    with pytest.raises(ValueError, match=f"--vocab-size {n - 1} is smaller than the tokenizer's {n} tokens"):
        cli_main(["convert", "--llama", str(tmp_path / "llama"), "--tokenizer", str(tmp_path / "tokenizer.json"),
                  "--vocab-size", str(n - 1), "--preset", "tiny", "--out", str(out), "--debug"])
    assert not out.exists()  # nothing written


def test_llama_alone_keeps_the_checkpoint_vocabulary_and_tokenizer(tmp_path, capsys):
    hf = _tiny_llama(tmp_path / "llama")
    _llama_style_tokenizer(tmp_path / "llama" / "tokenizer.json")
    out = tmp_path / "model"
    rc = cli_main(["convert", "--llama", str(tmp_path / "llama"), "--preset", "tiny", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "RE-INITIALISED" not in printed
    assert "lacks VideoLlama's special tokens" in printed  # copied as is, with a warning
    assert (out / "tokenizer.json").read_bytes() == (tmp_path / "llama" / "tokenizer.json").read_bytes()
    model = VideoLlama.from_pretrained(out).eval()
    assert model.config.decoder.vocab_size == LLAMA_VOCAB  # not the tiny preset's 1024
    assert torch.equal(model.decoder.embed_tokens.weight, hf.model.embed_tokens.weight)
    assert _logits_max_diff(model, hf, 9) <= 1e-4
    # generate refuses the Llama tokenizer (no <video>, <|answer|>, ...) before reading any weights.
    (out / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=re.escape(f"{out / 'tokenizer.json'}: special token")):
        cli_main(["generate", "--model", str(out), "--prompt", "hello", "--debug"])


def test_directory_without_tokenizer_warns_and_generate_eval_refuse_it(tmp_path, capsys):
    _tiny_llama(tmp_path / "llama")
    out = tmp_path / "model"
    out.mkdir()
    (out / "tokenizer.json").write_text("{}")  # an earlier conversion's leftover must not survive
    rc = cli_main(["convert", "--llama", str(tmp_path / "llama"), "--preset", "tiny", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"{out} has no tokenizer.json" in printed
    assert not (out / "tokenizer.json").exists()
    # The error names the directory and comes before the weights are read (they are garbage now).
    (out / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(FileNotFoundError, match=re.escape(f"generate: model directory {out} has no tokenizer.json")):
        cli_main(["generate", "--model", str(out), "--prompt", "hello", "--debug"])
    with pytest.raises(FileNotFoundError, match=re.escape(f"eval: model directory {out} has no tokenizer.json")):
        cli_main(["eval", "--model", str(out), "--task", "videoqa", "--data", str(tmp_path / "x.jsonl"),
                  "--out", str(tmp_path / "eval"), "--device", "cpu", "--debug"])
