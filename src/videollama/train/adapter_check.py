"""Checking a peft LoRA adapter directory before anything is allocated for it.

An adapter is untrusted input that could size its own allocation: peft builds each LoRA layer
from ``r`` (and ``rank_pattern``) in ``adapter_config.json`` before it reads a weight, so a
2 KB config saying ``r: 1000000`` would allocate gigabytes. And some adapters cannot be merged
exactly onto the plain base model: PiSSA, OLoRA, CorDA, LoftQ and the other initialisations
that rewrite the base weights when the adapter is made; DoRA's magnitude vectors; weights
stored transposed (``fan_in_fan_out``); NaN or boolean weights. So, in order:

1. :func:`check_config`: the config's keys, each one understood (``HANDLED``), informational
   (``IGNORED``, never acted on: ``base_model_name_or_path`` is not looked up anywhere) or a
   LoraConfig field left at peft's default; ranks and alphas finite and positive.
2. :func:`read_safetensors_header`: the weights file's header only (8-byte length, then JSON),
   bounded; every tensor a float tensor whose byte range lies inside the file.
3. :func:`expected_shapes`: the shape every adapter tensor must have on *this* base model,
   from its modules' own sizes and the rank the config gives each one; the header must match
   it exactly (no tensor missing, none extra).

Only then are the tensors read (:func:`read_checked_tensors`: each one finite) and peft builds
its layers. Every error is a ValueError naming the file and what is wrong.
"""

from __future__ import annotations

import dataclasses
import math
import re
import struct
from pathlib import Path
from typing import Any

# Config keys we act on (checked in check_config) and keys that say where the adapter came from
# or how peft should run it, which merging never uses.
HANDLED = {"peft_type", "r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora",
           "init_lora_weights", "lora_dropout", "inference_mode"}
IGNORED = {"base_model_name_or_path", "revision", "task_type", "peft_version", "auto_mapping", "runtime_config"}
# init_lora_weights values that leave the base weights as they are (B = 0, or both random):
# the adapter's tensors alone then describe the update. PiSSA, OLoRA, CorDA, LoftQ, ... do not.
EXACT_INITS = (True, False, "gaussian")
FLOAT_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
# A 13B model's adapter on every linear layer has ~1,300 tensors: a header of ~200 KB.
MAX_HEADER_BYTES = 16 << 20
MAX_PATTERNS = 4096
MAX_PATTERN_CHARS = 512


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """What a checked ``adapter_config.json`` asks for."""

    r: int
    alpha: float
    target_modules: tuple[str, ...] | str  # names (peft: a module whose name ends with one) or one regex
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    use_rslora: bool
    init_lora_weights: bool | str
    dropout: float

    def lora_config(self):
        """peft's LoraConfig of exactly these fields (nothing else from the file reaches peft)."""
        from peft import LoraConfig

        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return LoraConfig(r=self.r, lora_alpha=self.alpha, target_modules=targets, rank_pattern=dict(self.rank_pattern),
                          alpha_pattern=dict(self.alpha_pattern), use_rslora=self.use_rslora, bias="none",
                          init_lora_weights=self.init_lora_weights, lora_dropout=self.dropout)


def check_config(d: dict[str, Any], where: str) -> AdapterSpec:
    """The AdapterSpec of a parsed ``adapter_config.json``; ValueError (naming ``where``) for
    anything we do not understand or cannot merge exactly."""
    if d.get("peft_type") != "LORA":
        raise ValueError(f"{where}: peft_type is {d.get('peft_type')!r}; only LoRA adapters are supported")
    _check_other_keys(d, where)
    init = d.get("init_lora_weights", True)
    if not any(init is ok or (isinstance(ok, str) and init == ok) for ok in EXACT_INITS):
        raise ValueError(f"{where}: init_lora_weights {init!r} is not supported: PiSSA, OLoRA, CorDA, LoftQ and "
                         "other data- or SVD-based initialisations change (or may change) the base weights when the "
                         "adapter is made, so merged onto the plain base model it would give wrong weights "
                         "(supported: true, false, gaussian)")
    _flag(d.get("inference_mode", False), f"{where}: inference_mode")
    r = _rank(d.get("r", 8), f"{where}: r")
    alpha = _alpha(d.get("lora_alpha", 8), f"{where}: lora_alpha")
    return AdapterSpec(
        r=r, alpha=alpha, target_modules=_targets(d.get("target_modules"), where),
        rank_pattern=_pattern(d.get("rank_pattern") or {}, f"{where}: rank_pattern", _rank),
        alpha_pattern=_pattern(d.get("alpha_pattern") or {}, f"{where}: alpha_pattern", _alpha),
        use_rslora=_flag(d.get("use_rslora", False), f"{where}: use_rslora"),
        init_lora_weights=init, dropout=_dropout(d.get("lora_dropout", 0.0), f"{where}: lora_dropout"))


def _check_other_keys(d: dict[str, Any], where: str) -> None:
    """Every key neither HANDLED nor IGNORED must be a LoraConfig field at peft's default: a
    feature switched on (DoRA, fan_in_fan_out, bias, modules_to_save, LoftQ, layer replication...)
    changes what merging means, and we merge plain LoRA only. A key peft does not know is refused
    unless it is null, false or empty (a switch that is off)."""
    from peft import LoraConfig

    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(LoraConfig)
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    for key, value in d.items():
        if key in HANDLED or key in IGNORED:
            continue
        if key not in defaults:
            if value is None or value is False or value == {} or value == []:
                continue
            raise ValueError(f"{where}: unknown key {key!r} (= {_short(value)}): not a LoRA setting this version "
                             "understands; refusing to guess what it changes")
        if not _same(value, defaults[key]):
            raise ValueError(f"{where}: {key} = {_short(value)} is not supported: only plain LoRA adapters "
                             f"(W + scale * B A) are merged exactly (peft's default is {_short(defaults[key])})")


def _same(value: Any, default: Any) -> bool:
    if isinstance(value, bool) or isinstance(default, bool):
        return value is default or (value is None and default is False)
    if default is None:
        return value is None or value == {} or value == []
    return value == default


def _rank(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a whole number >= 1, not {_short(value)}")
    return value


def _alpha(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a finite number > 0, not {_short(value)}")
    return float(value)


def _dropout(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
        raise ValueError(f"{what} must be a number in [0, 1), not {_short(value)}")
    return float(value)


def _flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{what} must be true or false, not {_short(value)}")
    return value


def _targets(value: Any, where: str) -> tuple[str, ...] | str:
    if isinstance(value, str) and 0 < len(value) <= MAX_PATTERN_CHARS:
        _compile(value, f"{where}: target_modules")
        return value
    if (isinstance(value, list) and 0 < len(value) <= MAX_PATTERNS
            and all(isinstance(t, str) and 0 < len(t) <= MAX_PATTERN_CHARS for t in value)):
        return tuple(value)
    raise ValueError(f"{where}: target_modules must be a non-empty list of module names (or one regex), "
                     f"not {_short(value)}")


def _pattern(value: Any, what: str, check) -> dict:
    if not isinstance(value, dict) or len(value) > MAX_PATTERNS:
        raise ValueError(f"{what} must be an object of at most {MAX_PATTERNS} patterns, not {_short(value)}")
    for key, item in value.items():
        if not 0 < len(key) <= MAX_PATTERN_CHARS:
            raise ValueError(f"{what}: a pattern must have 1 to {MAX_PATTERN_CHARS} characters")
        _compile(key, what)
        check(item, f"{what}[{key!r}]")
    return dict(value)


def _compile(pattern: str, what: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{what}: {pattern!r} is not a valid regular expression ({e})") from None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---- the weights file: its header, then the tensors ------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]


def read_safetensors_header(path: str | Path) -> dict[str, TensorInfo]:
    """The tensors a safetensors file declares (name -> dtype, shape), read from its header only.

    Refused (ValueError naming the file): a header over MAX_HEADER_BYTES or past the end of the
    file, a tensor that is not a float tensor (F16, BF16, F32, F64), a byte range that does not
    lie inside the file or does not match the shape."""
    from videollama.data.safe_io import check_regular_file, parse_json

    size = check_regular_file(path, "adapter weights").st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise ValueError(f"{path}: not a safetensors file (header length {length}, file of {size} bytes)")
        header = parse_json(f.read(length), str(path))
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (the header is not a JSON object)")
    data_bytes = size - 8 - length
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        tensors[name] = _tensor_info(path, name, entry, data_bytes)
    return tensors


def _tensor_info(path, name: str, entry: Any, data_bytes: int) -> TensorInfo:
    if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str):
        raise ValueError(f"{path}: tensor {name!r} has no dtype in the header")
    dtype, shape, offsets = entry["dtype"], entry.get("shape"), entry.get("data_offsets")
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{path}: tensor {name!r} is {dtype}, not a float tensor (F16, BF16, F32, F64): "
                         "adapter weights are floating-point numbers")
    if (not isinstance(shape, list) or len(shape) > 8
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
        raise ValueError(f"{path}: tensor {name!r} has no valid shape ({_short(shape)})")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) for n in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_bytes
            or offsets[1] - offsets[0] != math.prod(shape) * FLOAT_DTYPES[dtype]):
        raise ValueError(f"{path}: tensor {name!r} of shape {tuple(shape)} {dtype} does not lie inside the file "
                         f"(offsets {_short(offsets)}, {data_bytes} bytes of data)")
    return TensorInfo(dtype, tuple(shape))


def expected_shapes(model, spec: AdapterSpec, where: str) -> dict[str, tuple[int, ...]]:
    """The adapter tensors (peft's saved names) and shapes that ``spec`` needs on ``model``: for a
    linear layer ``lora_A.weight`` [r, in] and ``lora_B.weight`` [out, r], for an embedding
    ``lora_embedding_A`` [r, vocab] and ``lora_embedding_B`` [dim, r], r from rank_pattern or r.
    Uses peft's own matching of target_modules and rank_pattern; reads sizes only."""
    import torch.nn as nn
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key

    config = spec.lora_config()
    shapes: dict[str, tuple[int, ...]] = {}
    hits = set()
    for name, module in model.named_modules():
        if not name or not check_target_module_exists(config, name):
            continue
        hits.add(name)
        r = spec.rank_pattern.get(get_pattern_key(spec.rank_pattern.keys(), name), spec.r)
        if isinstance(module, nn.Linear):
            shapes[f"{name}.lora_A.weight"] = (r, module.in_features)
            shapes[f"{name}.lora_B.weight"] = (module.out_features, r)
        elif isinstance(module, nn.Embedding):
            shapes[f"{name}.lora_embedding_A"] = (r, module.num_embeddings)
            shapes[f"{name}.lora_embedding_B"] = (module.embedding_dim, r)
        else:
            raise ValueError(f"{where}: target_modules matches {name}, a {type(module).__name__}: only linear and "
                             "embedding layers are supported")
    _every_target_exists(spec, hits, where)
    return shapes


def _every_target_exists(spec: AdapterSpec, hits: set[str], where: str) -> None:
    if not hits:
        raise ValueError(f"{where}: target_modules {_short(spec.target_modules)} match no layer of this model "
                         "(an adapter of another base model?)")
    if isinstance(spec.target_modules, str):
        return
    for target in spec.target_modules:  # peft's rule for a list: the name, or a suffix after a dot
        if not any(name == target or name.endswith("." + target) for name in hits):
            raise ValueError(f"{where}: target module {target!r} does not exist in this model "
                             "(an adapter of another base model?)")


def check_against_model(header: dict[str, TensorInfo], expected: dict[str, tuple[int, ...]], weights: Path,
                        config: Path) -> None:
    """The header declares exactly the expected tensors, each with the expected shape."""
    missing, unexpected = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{weights}: does not fit {config} on this model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    for key, shape in expected.items():
        if header[key].shape != shape:
            raise ValueError(f"{weights}: {key!r} has shape {header[key].shape}, but {config} with this model needs "
                             f"{shape} (r = {_rank_of(key, shape)}; an adapter of another base model, or a config "
                             "whose r / rank_pattern does not match its weights?)")


def _rank_of(key: str, shape: tuple[int, ...]) -> int:
    return shape[0] if key.endswith(("lora_A.weight", "lora_embedding_A")) else shape[1]


def read_checked_tensors(path: Path, header: dict[str, TensorInfo]) -> dict:
    """The tensors of a checked safetensors file, each refused unless every value is finite."""
    import torch
    from safetensors import safe_open

    state = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in header:
                state[name] = f.get_tensor(name)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    for name, tensor in state.items():
        if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{path}: tensor {name!r} holds NaN or infinite values")
    return state
