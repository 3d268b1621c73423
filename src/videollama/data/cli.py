"""``videollama data synth|synth-long|web|shards|inspect``: each verb lives in its own module."""

from __future__ import annotations

import argparse
import importlib

VERBS: dict[str, tuple[str, str]] = {
    "synth": ("videollama.data.shapes", "generate the Shapes corpus (train shards + eval split)"),
    "synth-long": ("videollama.data.shapes_long_synth",
                   "generate Shapes-Long (minutes-long videos: needle, order, count, grounding)"),
    "web": ("videollama.data.shapes_web", "generate the raw 'web' Shapes corpus (noisy uploads + truth.json)"),
    "shards": ("videollama.data.ingest", "write WebDataset shards from a folder of videos or a JSONL manifest"),
    "inspect": ("videollama.data.inspect", "print samples, timestamps and skipped counts; contact sheet"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for name, (module, help_) in VERBS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(_verb_module=module)


def run(args: argparse.Namespace) -> int:
    return int(importlib.import_module(args._verb_module).run(args) or 0)
