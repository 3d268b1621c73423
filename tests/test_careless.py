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


# ---- merge --out and export --out: the rule of `data shards` -------------------------------------


def _tiny_model_dir(path, seed: int):
    torch.manual_seed(seed)
    VideoLlama(VideoLlamaConfig.from_name("tiny")).save_pretrained(path)
    return path


def _adapter(base, out):
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import save_file

    model = VideoLlama.from_pretrained(base)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["decoder.layers.0.self_attn.q_proj"], init_lora_weights=False)
    inject_adapter_in_model(config, model)
    config.save_pretrained(str(out))
    save_file(get_peft_model_state_dict(model, save_embedding_layers=False), str(out / "adapter_model.safetensors"))
    return out


def _files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_merge_refuses_another_model_and_overwrite_replaces_only_a_model_directory(tmp_path, capsys, monkeypatch):
    base, other = _tiny_model_dir(tmp_path / "base", 0), _tiny_model_dir(tmp_path / "other", 1)
    adapter = _adapter(base, tmp_path / "adapter")
    kept = {p: _files(p) for p in (base, other, adapter)}

    def merge(out, *extra):
        return main(["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(out), *extra])

    assert merge(other) == 2  # another model's weights were replaced, exit 0
    assert "is not empty" in capsys.readouterr().err
    for out, says in [(base, "is, or is inside, the --model input"), (base / "sub", "is, or is inside, the --model"),
                      (adapter, "is, or is inside, the --adapter input"), (tmp_path, "holds the --model input")]:
        assert merge(out, "--overwrite") == 2
        assert says in capsys.readouterr().err, out
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "config.json").write_text("{}")
    (mixed / "notes.txt").write_text("mine")
    assert merge(mixed, "--overwrite") == 2
    assert "is not a model directory" in capsys.readouterr().err
    assert {p: _files(p) for p in (base, other, adapter)} == kept and (mixed / "notes.txt").read_text() == "mine"

    # A failure while writing leaves the old model as it was, and nothing half-written beside it.
    def broken_save(self, directory, **kwargs):
        (directory / "config.json").parent.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text("{}")
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(VideoLlama, "save_pretrained", broken_save)
        assert merge(other, "--overwrite") == 2
    assert "disk full" in capsys.readouterr().err
    assert _files(other) == kept[other]
    assert merge(other, "--overwrite") == 0
    assert _files(other)["model.safetensors"] != kept[other]["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert merge(tmp_path / "new") == 0 and (tmp_path / "new" / "config.json").is_file()


def test_export_refuses_a_full_folder_and_overwrite_replaces_only_its_own_kind(tmp_path, capsys):
    from videollama.train.loop import train

    run = tmp_path / "run"
    train(small_cfg(max_steps=2), run)
    out = tmp_path / "model"
    assert main(["export", str(run), "--out", str(out)]) == 0
    first = _files(out)
    (out / "model.safetensors").write_bytes(b"old")
    assert main(["export", str(run), "--out", str(out)]) == 2  # was: exit 0, the folder rewritten
    assert "is not empty" in capsys.readouterr().err and (out / "model.safetensors").read_bytes() == b"old"
    assert main(["export", str(run), "--out", str(out), "--overwrite"]) == 0
    assert _files(out) == first
    assert main(["export", str(run), "--out", str(run), "--overwrite"]) == 2
    assert "is, or is inside, the run directory input" in capsys.readouterr().err
    assert main(["export", str(run), "--out", str(tmp_path), "--overwrite"]) == 2
    assert "holds the run directory input" in capsys.readouterr().err
    assert main(["export", str(run), "--out", str(run / "model")]) == 0  # inside the run: the usual place
    assert (run / "model" / "config.json").is_file()
