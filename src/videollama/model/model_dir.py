"""The model directory: ``config.json``, ``preprocessor.json`` and ``model.safetensors`` (or
``model-0000i-of-0000N.safetensors`` shards plus ``model.safetensors.index.json``, the Hugging
Face index format), and optionally ``tokenizer.json``. Loading is strict: a missing, unexpected or
misshapen tensor is an error that names the tensor and the file; weights newer than the directory
(model/parts.py ``ADDED_ZERO_INIT``) start at zero, which changes nothing."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from videollama.config import VideoLlamaConfig
from videollama.model.parts import ADDED_ZERO_INIT, check_layout

CONFIG_NAME = "config.json"
PREPROCESSOR_NAME = "preprocessor.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_NAME = "tokenizer.json"


def save_model_dir(model: nn.Module, directory: Path, *, tokenizer=None, max_shard_size: int = 5 * 2**30) -> None:
    """``VideoLlama.save_pretrained``: the config, the preprocessing spec, the weights (sharded
    above ``max_shard_size`` bytes; tied output weights stored once) and the tokenizer if given."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    model.config.save(directory / CONFIG_NAME)
    (directory / PREPROCESSOR_NAME).write_text(json.dumps(asdict(model.config.preprocess), indent=2) + "\n")
    if tokenizer is not None:
        _save_tokenizer(tokenizer, directory / TOKENIZER_NAME)

    state = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    if model.config.decoder.tie_word_embeddings:
        del state["lm_head.weight"]
    # Leftovers of an earlier save with another layout would confuse the loader.
    for old in [directory / WEIGHTS_NAME, directory / WEIGHTS_INDEX_NAME,
                *directory.glob("model-*-of-*.safetensors")]:
        old.unlink(missing_ok=True)

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(directory / WEIGHTS_NAME), metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / file), metadata=meta)
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def read_config(directory: Path) -> VideoLlamaConfig:
    """The directory's validated config.json (sizes, divisibility); a clear error if it has none."""
    if not (directory / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{directory}: no {CONFIG_NAME}; not a VideoLlama model directory")
    return VideoLlamaConfig.load(directory / CONFIG_NAME)


def read_state(directory: Path, config: VideoLlamaConfig, expected: dict[str, torch.Tensor], *,
               device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of ``expected`` (a meta model's state dict) read from the directory's
    safetensors, each checked against its expected name and shape; tied weights shared."""
    files = weight_files(directory)
    check_layout(config, [n for names in files.values() for n in names], str(directory))
    expected = dict(expected)
    if config.decoder.tie_word_embeddings:
        del expected["lm_head.weight"]
    state: dict[str, torch.Tensor] = {}
    where: dict[str, Path] = {}
    for file, names in files.items():
        with _open_safetensors(file) as f:
            stored = set(f.keys())
            missing_in_file = set(names) - stored
            if missing_in_file:
                raise ValueError(f"{file}: the index lists {sorted(missing_in_file)[:5]} but the file lacks them")
            for name in names:
                if name in where:
                    raise ValueError(f"{file}: tensor {name!r} is also stored in {where[name]}")
                if name not in expected:
                    raise ValueError(f"{file}: unexpected tensor {name!r} for a {config.name!r} config")
                t = f.get_tensor(name)
                if tuple(t.shape) != tuple(expected[name].shape):
                    raise ValueError(f"{file}: tensor {name!r} has shape {tuple(t.shape)}, the config "
                                     f"({directory / CONFIG_NAME}) needs {tuple(expected[name].shape)}")
                state[name] = t.to(device=device, dtype=dtype if t.is_floating_point() and dtype else t.dtype)
                where[name] = file
    for name in ADDED_ZERO_INIT:  # newer than the directory: zero changes nothing (model/parts.py)
        if name in expected and name not in state:
            state[name] = torch.zeros(expected[name].shape, device=device,
                                      dtype=dtype or state["decoder.embed_tokens.weight"].dtype)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"{directory}: missing tensors {missing[:5]}" + (" ..." if len(missing) > 5 else ""))
    if config.decoder.tie_word_embeddings:
        state["lm_head.weight"] = state["decoder.embed_tokens.weight"]
    return state


def _save_tokenizer(tokenizer, path: Path) -> None:
    """A ``tokenizers.Tokenizer`` is saved; a path (file, or folder holding tokenizer.json) is
    checked by loading it, then copied byte for byte."""
    import shutil

    from videollama.data.tokenizer import load_tokenizer

    if isinstance(tokenizer, (str, Path)):
        source = Path(tokenizer)
        source = source / TOKENIZER_NAME if source.is_dir() else source
        load_tokenizer(source)  # a clear error for a missing or invalid file, before copying
        if source.resolve() != path.resolve():
            shutil.copyfile(source, path)
    else:
        tokenizer.save(str(path))


def weight_files(directory: Path) -> dict[Path, list[str]]:
    """The safetensors files of a model (or Hugging Face checkpoint) directory and the tensor
    names each one holds. An index may name only plain files inside the directory."""
    from videollama.data.safe_io import MAX_JSON_BYTES, check_regular_file, read_json_object

    index = directory / WEIGHTS_INDEX_NAME
    single = directory / WEIGHTS_NAME
    if index.is_file():
        weight_map = read_json_object(index, "index", limit=64 * MAX_JSON_BYTES).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise ValueError(f"{index}: not a safetensors index (no weight_map of tensor name -> file name)")
        files: dict[Path, list[str]] = {}
        for name, file in weight_map.items():
            if Path(file).name != file or file in (".", ".."):
                raise ValueError(f"{index}: tensor {name!r} points to {file!r}, not a file of {directory}")
            path = directory / file
            if not path.exists():
                raise FileNotFoundError(f"{index}: tensor {name!r} points to missing file {path}")
            check_regular_file(path, "weights file")
            files.setdefault(path, []).append(name)
        return files
    if single.exists():
        check_regular_file(single, "weights file")
        return {single: safetensors_names(single)}
    raise FileNotFoundError(f"{directory}: neither {WEIGHTS_NAME} nor {WEIGHTS_INDEX_NAME}")


def safetensors_names(path: Path) -> list[str]:
    """The tensor names of a safetensors file (its header only); a damaged file is a ValueError."""
    with _open_safetensors(path) as f:
        return list(f.keys())



def _open_safetensors(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError and others
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
