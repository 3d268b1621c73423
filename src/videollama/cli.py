"""The ``videollama`` command line: one entry point, one subcommand per job.

Each subcommand lives next to the code it drives, as a module exposing
``add_arguments(parser)`` and ``run(args) -> int``; this file only lists them, and imports
a module (and so torch) only when its subcommand runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Groups with their own sub-subcommands (data, tokenizer)
# are handled by their module's add_arguments.
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("videollama.model.info", "parameters, FLOPs and memory of a preset, built on the meta device"),
    "convert": ("videollama.convert", "import Hugging Face Llama / CLIP weights into a model directory"),
    "generate": ("videollama.model.generate", "generate text from a model directory, with or without a video"),
    "data": ("videollama.data.cli", "synthesise, shard and inspect video-text data"),
    "tokenizer": ("videollama.data.tokenizer", "train the byte-level BPE tokenizer"),
    "train": ("videollama.train.loop", "pre-train or fine-tune (one process or under torchrun)"),
    "export": ("videollama.train.checkpoint", "export a training checkpoint as a model directory"),
    "eval": ("videollama.eval.harness", "evaluate a model on VideoQA or captioning"),
    "plot": ("videollama.train.plot", "plot the loss and LR curves of a run"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="videollama", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if only is None or only == name:
            importlib.import_module(module).add_arguments(p)
            p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Only the chosen subcommand's module is imported: `videollama info` never imports the loader.
    only = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(only)
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
