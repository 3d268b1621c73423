"""The ``videollama`` command line: one entry point, one subcommand per job.

Each subcommand lives next to the code it drives, as a module exposing
``add_arguments(parser)`` and ``run(args) -> int``; this file only lists them, and imports
a module (and so torch) only when its subcommand runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from videollama import __version__
from videollama.data.errors import BadSample, SkipBudgetExceeded
from videollama.eval.metrics import JavaMissing
from videollama.noise import quiet_known_noise

# name -> (module, one-line help). Groups with their own sub-subcommands (data, tokenizer)
# are handled by their module's add_arguments.
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("videollama.plan.info", "parameters, FLOPs and memory of a preset, built on the meta device"),
    "plan": ("videollama.plan.cli", "memory per device of a training step or of generation, and whether it fits"),
    "convert": ("videollama.convert", "import Hugging Face Llama / CLIP weights into a model directory"),
    "generate": ("videollama.inference.cli", "generate text from a model directory, with or without a video"),
    "data": ("videollama.data.cli", "synthesise, shard and inspect video-text data"),
    "curate": ("videollama.curate.cli", "curate raw videos into scored, filtered, captioned clips: shards + clips.parquet"),
    "tokenizer": ("videollama.data.tokenizer", "train the byte-level BPE tokenizer"),
    "train": ("videollama.train.loop", "pre-train or fine-tune (one process or under torchrun)"),
    "export": ("videollama.train.checkpoint", "export a training checkpoint as a model directory"),
    "merge": ("videollama.train.lora", "merge a LoRA adapter into its base model: a plain model directory"),
    "eval": ("videollama.eval.cli", "evaluate a model on VideoQA, grounding or captioning, whole videos"),
    "plot": ("videollama.train.plot", "plot the loss and LR curves of a run"),
    "serve": ("videollama.serve.cli", "serve a model directory over an OpenAI-compatible HTTP API"),
    "chat": ("videollama.serve.ui", "a web chat page (Gradio) over a model directory, the API beside it"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="videollama", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"videollama {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback of an error")
        if only is None or only == name:
            importlib.import_module(module).add_arguments(p)
            p.set_defaults(_module=module)
    return parser


# What a user can cause and fix (a bad path, value or file): one line, exit 2. Anything else is
# a bug of ours and keeps its traceback.
USER_ERRORS = (ValueError, OSError, BadSample, SkipBudgetExceeded, JavaMissing)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_known_noise()  # before any subcommand imports torch, peft or torchao
    # Only the chosen subcommand's module is imported: `videollama info` never imports the loader.
    only = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only if only in COMMANDS else None)
    args, extra = parser.parse_known_args(argv)
    if extra:
        # `key=value` overrides may come anywhere on the line, before or after options.
        overrides = [a for a in extra if "=" in a and not a.startswith("-")]
        unknown = [a for a in extra if a not in overrides]
        if unknown or not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
        args.overrides = list(args.overrides) + overrides
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except USER_ERRORS as e:
        if getattr(args, "debug", False):
            raise
        message = " ".join(str(e).split("\n")).strip() or type(e).__name__
        print(f"videollama: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("videollama: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
