"""Careless use loses nothing and untrusted configs are checked before any allocation: convert
onto its input, shards over an older dataset, configs that lie about the weights."""

from __future__ import annotations

import json
import re

import pytest
import torch

from helpers import good_meta, good_video, small_cfg
from videollama.cli import main
from videollama.config import VideoLlamaConfig
from videollama.model.videollama import VideoLlama


def test_convert_refuses_an_out_that_is_or_is_inside_its_input(tmp_path, capsys):
    import transformers

    hf = tmp_path / "hf"
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).save_pretrained(hf, safe_serialization=True)
    before = {p.name: p.read_bytes() for p in hf.iterdir()}
    for out in (hf, hf / "sub"):
        assert main(["convert", "--llama", str(hf), "--preset", "tiny", "--out", str(out)]) == 2
        assert "is, or is inside, the --llama input" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in hf.iterdir()} == before  # not a byte changed


def test_data_shards_refuses_a_folder_with_another_dataset_and_overwrite_replaces_it_whole(tmp_path, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(3):
        (videos / f"v{i}.mp4").write_bytes(good_video(seed=i))
        (videos / f"v{i}.json").write_text(json.dumps(good_meta(i)))
    out = tmp_path / "shards"
    assert main(["data", "shards", "--input", str(videos), "--out", str(out), "--max-count", "1"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [f"shard-{i:06d}.tar" for i in range(3)]
    for i in (1, 2):
        (videos / f"v{i}.mp4").unlink()
    # A smaller dataset into the same folder would leave shard-000001/2 of the old one behind.
    capsys.readouterr()
    assert main(["data", "shards", "--input", str(videos), "--out", str(out), "--max-count", "1"]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert len(list(out.iterdir())) == 3  # untouched
    assert main(["data", "shards", "--input", str(videos), "--out", str(out), "--max-count", "1", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.tar"]  # the whole dataset replaced
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".shards")]  # no staging left


@pytest.mark.parametrize("change, says", [
    ({"decoder": {"num_heads": 0}}, "decoder.num_heads must be > 0, got 0"),
    ({"decoder": {"num_heads": 5}}, "decoder.hidden_size (96) is not divisible by decoder.num_heads (5)"),
    ({"decoder": {"num_layers": 20000}}, "the weights hold 2 blocks decoder.layers.N but the config says 20000"),
    ({"vision": {"hidden_act": "relu6"}}, "vision.hidden_act must be quick_gelu or gelu"),
    ({"decoder": {"pad_token_id": 5000}}, "decoder.pad_token_id 5000 is outside the vocabulary"),
])
def test_a_model_config_that_lies_is_refused_before_building(tmp_path, change, says):
    model_dir = tmp_path / "m"
    VideoLlama(VideoLlamaConfig.from_name("tiny")).save_pretrained(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    for section, values in change.items():
        cfg[section].update(values)
    (model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=re.escape(says)):
        VideoLlama.from_pretrained(model_dir)


def test_numbers_written_as_strings_are_read_as_numbers(tmp_path):
    model_dir = tmp_path / "m"
    VideoLlama(VideoLlamaConfig.from_name("tiny")).save_pretrained(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["decoder"]["vocab_size"] = "1024"
    (model_dir / "config.json").write_text(json.dumps(cfg))
    assert VideoLlama.from_pretrained(model_dir).config.decoder.vocab_size == 1024


def test_export_checks_the_run_config_against_the_checkpoint_before_allocating(tmp_path, monkeypatch):
    from videollama.train import checkpoint as ckpt
    from videollama.train.loop import train

    run = tmp_path / "run"
    train(small_cfg(max_steps=2), run)
    cfg = json.loads((run / "model_config.json").read_text())
    cfg["decoder"]["hidden_size"] = 65536  # a 17 GB model, if anything were allocated for it
    cfg["decoder"]["intermediate_size"] = 65536
    (run / "model_config.json").write_text(json.dumps(cfg))

    def no_allocation(*args, **kwargs):
        raise AssertionError("export allocated the model before checking it against the checkpoint")

    monkeypatch.setattr(torch.nn.Module, "to_empty", no_allocation)
    with pytest.raises(ValueError, match=r"tensor 'model.decoder.embed_tokens.weight' is \(1024, 96\) in the checkpoint"):
        ckpt.export(run, tmp_path / "model")
    assert not (tmp_path / "model").exists()
