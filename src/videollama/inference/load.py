"""Loading a model for inference, the one way ``generate``, ``eval`` and ``serve`` do it.

:func:`add_model_arguments` gives a command ``--model DIR``, ``--adapter DIR`` (a peft LoRA
adapter, merged into the weights at load time, so decoding costs what the base model costs) and
``--quantize {none,int8,int4}`` (weight-only quantization through torchao,
:mod:`videollama.inference.quantize`; int8 products by the implementation measured fastest here). :func:`load_for_inference` returns ``(model, tokenizer)``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

QUANTIZE = ("none", "int8", "int4")


def add_model_arguments(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """``--model`` (required unless ``required`` is False: a command with a mode that needs no
    model checks it itself), ``--adapter`` and ``--quantize``."""
    parser.add_argument("--model", required=required, type=Path, help="model directory (config.json, "
                        "model.safetensors, tokenizer.json, preprocessor.json)")
    parser.add_argument("--adapter", type=Path, default=None,
                        help="a peft LoRA adapter directory (adapter_config.json, adapter_model.safetensors), "
                             "merged into --model's weights at load time")
    parser.add_argument("--quantize", choices=QUANTIZE, default="none",
                        help="weight-only quantization through torchao (default: none)")


def refuse_run_dir(model_dir: str | Path) -> None:
    """A training run directory given where a model directory goes: say how to make one from it."""
    model_dir = Path(model_dir)
    if (model_dir / "config.json").is_file() or not (model_dir / "checkpoints").is_dir():
        return
    raise ValueError(f"{model_dir} is a training run directory (checkpoints/), not a model directory: export "
                     f"it first, e.g. `videollama export {model_dir} --out models/NAME`, then pass --model models/NAME "
                     "(a LoRA run exports its adapter: --model BASE --adapter DIR, or export --merged)")


def load_for_inference(model_dir: str | Path, *, adapter: str | Path | None = None, quantize: str | None = None,
                       device: str | None = None):
    """The model of ``model_dir`` (with ``adapter`` merged in, then quantized) in eval mode on
    ``device`` (default: cuda when available, else cpu), and its tokenizer.

    The tokenizer is read first: a directory without a usable one fails before any weights are."""
    import torch

    from videollama.data.tokenizer import load_tokenizer
    from videollama.model.videollama import VideoLlama

    if quantize not in (None, *QUANTIZE):
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE)}, not {quantize!r}")
    if adapter is not None:
        from videollama.train.lora import read_adapter_config

        read_adapter_config(adapter)  # a bad --adapter fails before the base weights are read
    refuse_run_dir(model_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(model_dir)
    model = VideoLlama.from_pretrained(model_dir, device=device)
    if adapter is not None:
        from videollama.train.lora import load_adapter

        model = load_adapter(model, adapter, merge=True)
    if quantize not in (None, "none"):
        from videollama.inference.quantize import quantize_model

        model = quantize_model(model, quantize)
    return model.eval(), tokenizer
