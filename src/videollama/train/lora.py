"""LoRA and QLoRA through peft, and the ``videollama merge`` command.

Our module names are Hugging Face's (``q_proj``, ``v_proj``, ``gate_proj``...), so peft's own
LoRA layers apply to a VideoLlama as they are: :func:`apply_lora` picks the linear layers a
recipe's ``lora:`` section names (``recipe.LoraSection``), wraps each in a peft ``lora.Linear``
(``W x + (alpha / r) B A x``, A: [r, in], B: [out, r], B starting at 0) and freezes every other
parameter. Parameter names gain peft's infixes (``q_proj.base_layer.weight``,
``q_proj.lora_A.default.weight``); the part of a parameter (``model.parts.part_of``) and the
blocks FSDP shards are unchanged, so LoRA is applied before ``fully_shard`` and checkpoints
(DCP, every tensor, frozen ones included) resume as any other run.

An adapter directory is peft's format: ``adapter_config.json`` (peft's ``LoraConfig``) and
``adapter_model.safetensors`` (``get_peft_model_state_dict``: ``...q_proj.lora_A.weight`` [r, in],
``...q_proj.lora_B.weight`` [out, r]). :func:`load_adapter` reads one onto a base model and
merges it (``merge_and_unload``): inference then costs exactly what the base model costs.

QLoRA (``lora.quantize: nf4``): every base linear layer but the output head becomes a
bitsandbytes ``Linear4bit`` (NF4 weights, bf16 compute) before the adapters are added; peft's
LoRA layers for bitsandbytes take over from there. It needs a CUDA GPU and bitsandbytes.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
from pathlib import Path

import torch
import torch.nn as nn

from videollama.model.parts import part_of
from videollama.train.recipe import LoraSection

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_NAME = "default"
_PATTERN = set("*?[.")


_LORA_INFIXES = (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.")


def is_lora_param(name: str) -> bool:
    """Whether the parameter ``name`` (of a model with adapters) is a LoRA A or B matrix."""
    return any(infix in name for infix in _LORA_INFIXES)


def target_modules(model: nn.Module, section: LoraSection) -> list[str]:
    """Full names of the linear (and embedding) layers of ``model`` that ``section`` adapts, in module order.

    A bare name matches the last component of a module in one of ``section.parts``; a pattern
    (a dot or wildcard in it) is fnmatch-ed against the full module name, whatever its part."""
    if any(is_lora_param(n) for n, _ in model.named_parameters()):
        raise ValueError("the model already has LoRA adapters")
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        for target in section.target_modules:
            if _PATTERN & set(target):
                hit = fnmatch.fnmatchcase(name, target)
            else:
                hit = name.rsplit(".", 1)[-1] == target and part_of(name + ".weight") in section.parts
            if hit:
                names.append(name)
                break
    if _tied(model) and any(isinstance(model.get_submodule(n), nn.Embedding) or n == "lm_head" for n in names):
        raise ValueError("lora: the model ties lm_head to the token embedding; an adapter on either would change "
                         "the other on merge. Leave embed_tokens and lm_head out of lora.target_modules")
    if not names:
        raise ValueError(f"lora.target_modules {section.target_modules} (parts {section.parts}) match no linear "
                         "layer of the model; see `videollama info` for module names")
    return names


def _tied(model: nn.Module) -> bool:
    return bool(getattr(getattr(getattr(model, "config", None), "decoder", None), "tie_word_embeddings", False))


def lora_config(section: LoraSection, targets: list[str], base: str | None = None):
    """peft's LoraConfig for ``section`` on the modules ``targets`` (full names)."""
    from peft import LoraConfig

    return LoraConfig(r=section.r, lora_alpha=section.alpha, lora_dropout=section.dropout,
                      target_modules=list(targets), bias="none", base_model_name_or_path=base)


def apply_lora(model: nn.Module, section: LoraSection, *, base: str | None = None, quantize: bool = True,
               seed: int = 0):
    """Add peft LoRA adapters to ``model`` in place and freeze everything else.

    The adapters are drawn after ``torch.manual_seed(seed)``: every rank, and every restart,
    starts from the same A (B is 0). With ``section.quantize == "nf4"`` (and ``quantize``) the base linear layers are first
    quantized to NF4 on the GPU. Returns peft's tuner (a ``LoraModel``, for ``merge_and_unload``);
    ``model`` itself is the module to train."""
    from peft.tuners.lora import LoraModel

    targets = target_modules(model, section)
    if quantize and section.quantize == "nf4":
        quantize_nf4(model)
    torch.manual_seed(seed)
    tuner = LoraModel(model, lora_config(section, targets, base), ADAPTER_NAME)
    for name, p in model.named_parameters():
        p.requires_grad_(is_lora_param(name))
    return tuner


def frozen_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if not p.requires_grad)


@contextlib.contextmanager
def without_adapters(model: nn.Module):
    """Put each peft layer's base layer back in its place for the duration (the adapters' tensors
    stay allocated): ``init_weights`` then draws the base weights exactly as for a model without LoRA."""
    from peft.tuners.lora import LoraLayer

    swapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            setattr(owner, child, module.get_base_layer())
            swapped.append((owner, child, module))
    try:
        yield model
    finally:
        for owner, child, module in swapped:
            setattr(owner, child, module)


@torch.no_grad()
def reset_lora(model: nn.Module) -> None:
    """Initialise every adapter as peft does (A: Kaiming-uniform, B: 0), from the global RNG.

    For a model built on the meta device: its ``init_weights`` treats the adapters' linear
    layers like any other (normal(0, std)), which would make B A non-zero at step 0."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.reset_lora_parameters(ADAPTER_NAME, True)


# ---- QLoRA -------------------------------------------------------------------------------------


def require_qlora() -> None:
    """Raise a one-line ValueError unless NF4 quantization can run here (CUDA + bitsandbytes)."""
    if not torch.cuda.is_available():
        raise ValueError("lora.quantize nf4 (QLoRA) needs a CUDA GPU and bitsandbytes; this machine has no CUDA "
                         "device (use lora.quantize=none for LoRA on full-precision weights)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ValueError("lora.quantize nf4 (QLoRA) needs a CUDA GPU and bitsandbytes: "
                         f"pip install bitsandbytes ({e})") from e


@torch.no_grad()
def quantize_nf4(model: nn.Module, *, compute_dtype: torch.dtype = torch.bfloat16) -> int:
    """Replace every ``nn.Linear`` but ``lm_head`` by a frozen bitsandbytes NF4 ``Linear4bit`` on
    CUDA (the weights are quantized as they move to the GPU). Returns the number replaced."""
    require_qlora()
    import bitsandbytes as bnb

    n = 0
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or name == "lm_head":
            continue
        q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                              compute_dtype=compute_dtype, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(module.weight.data.float().cpu(), requires_grad=False, quant_type="nf4")
        if module.bias is not None:
            q.bias = nn.Parameter(module.bias.data.float().cpu(), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q.to("cuda"))
        n += 1
    return n


# ---- adapter directories -----------------------------------------------------------------------


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors in peft's format (``...lora_A.weight`` [r, in], ``...lora_B.weight`` [out, r])."""
    from peft import get_peft_model_state_dict

    # save_embedding_layers=False: peft's "auto" would look the config's base model up on the
    # Hugging Face Hub to see whether the vocabulary was resized; ours never is.
    return get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME, save_embedding_layers=False)


def save_adapter(model: nn.Module, section: LoraSection, out: str | Path, *, base: str | None = None) -> Path:
    """Write ``out/adapter_config.json`` and ``out/adapter_model.safetensors`` (peft's format)."""
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    targets = [name for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    lora_config(section, targets, base).save_pretrained(str(out))
    state = {k: v.detach().to("cpu").contiguous() for k, v in adapter_state(model).items()}
    save_file(state, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return out


def read_adapter_config(adapter_dir: str | Path):
    """peft's LoraConfig from ``adapter_dir/adapter_config.json`` (bounded JSON), holding only the
    fields we understand, each checked (``adapter_check.check_config``: LoRA only, finite positive
    ranks and alphas, nothing that would make the merge inexact). Reads no weights."""
    return _read_spec(adapter_dir).lora_config()


def _read_spec(adapter_dir: str | Path):
    from videollama.data.safe_io import read_json_object
    from videollama.train.adapter_check import check_config

    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise FileNotFoundError(f"adapter {adapter_dir}: no such folder")
    path = adapter_dir / ADAPTER_CONFIG
    return check_config(read_json_object(path, "adapter config"), str(path))


def load_adapter(model: nn.Module, adapter_dir: str | Path, *, merge: bool = True) -> nn.Module:
    """Apply the peft adapter in ``adapter_dir`` to ``model`` (in place) and, with ``merge``,
    fold it into the base weights (peft's ``merge_and_unload``): returns the model to use.

    Nothing is allocated for the adapter until its config and the header of its weights file
    have been checked against this model's layer sizes (``adapter_check``); the tensors are then
    read and each checked to be finite. Nothing is looked up on the network: the config's
    ``base_model_name_or_path`` never reaches peft."""
    from peft import set_peft_model_state_dict
    from peft.tuners.lora import LoraModel

    from videollama.train.adapter_check import (
        check_against_model,
        expected_shapes,
        read_checked_tensors,
        read_safetensors_header,
    )

    spec = _read_spec(adapter_dir)
    config_path, weights = Path(adapter_dir) / ADAPTER_CONFIG, Path(adapter_dir) / ADAPTER_WEIGHTS
    header = read_safetensors_header(weights)
    expected = expected_shapes(model, spec, str(config_path))
    if _tied(model) and any(k.startswith(("decoder.embed_tokens.", "lm_head.")) for k in expected):
        raise ValueError(f"{config_path}: adapts embed_tokens or lm_head, which this model "
                         "ties together; merging would change both")
    check_against_model(header, expected, weights, config_path)
    state = read_checked_tensors(weights, header)
    tuner = LoraModel(model, spec.lora_config(), ADAPTER_NAME)
    built = {k: tuple(v.shape) for k, v in adapter_state(model).items()}
    if built != expected:  # peft matched other layers than we checked: refuse rather than guess
        raise ValueError(f"{config_path}: peft adapts other layers than the ones checked "
                         f"({sorted(set(built) ^ set(expected))[:3]})")
    set_peft_model_state_dict(model, state, adapter_name=ADAPTER_NAME)
    if not merge:
        return model
    return tuner.merge_and_unload()


# ---- `videollama merge` ------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="the base model directory")
    parser.add_argument("--adapter", required=True, type=Path,
                        help="a peft LoRA adapter (adapter_config.json, adapter_model.safetensors)")
    parser.add_argument("--out", required=True, type=Path, help="plain model directory to write (base + B A)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the model directory already in --out (whole: written beside it, then swapped)")


def run(args: argparse.Namespace) -> int:
    from videollama.data.safe_io import written_beside
    from videollama.model.videollama import VideoLlama
    from videollama.train.out_dir import check_out, is_model_dir

    check_out(args.out, overwrite=args.overwrite, inputs={"--model": args.model, "--adapter": args.adapter},
              command="merge", replaceable={"a model directory": is_model_dir})
    read_adapter_config(args.adapter)  # a bad --adapter fails before the base weights are read
    model = load_adapter(VideoLlama.from_pretrained(args.model, device="cpu"), args.adapter, merge=True)
    tokenizer = args.model / "tokenizer.json"
    with written_beside(args.out) as staging:
        model.save_pretrained(staging, tokenizer=tokenizer if tokenizer.is_file() else None)
    print(f"wrote {args.out}")
    return 0
