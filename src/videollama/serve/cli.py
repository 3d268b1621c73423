"""``videollama serve``: the OpenAI-compatible HTTP server (FastAPI + uvicorn) for a model directory.

Binds 127.0.0.1 unless ``--host`` says otherwise. The API key comes from ``--api-key`` or the
``VIDEOLLAMA_API_KEY`` environment variable; without one the server warns and asks for none.
The server answers only the Host names it is told (``--allowed-hosts``, beside the local ones
and the bind address). ``videollama chat`` shares these options (:func:`add_access_arguments`).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from videollama.serve.limits import add_limit_arguments, limits_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from videollama.inference.load import add_model_arguments

    add_model_arguments(parser)  # --model, --adapter, --quantize
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    add_access_arguments(parser, key_help="required as 'Authorization: Bearer KEY' on every route but /health")
    parser.add_argument("--served-model-name", default=None, help="the model id of the API (default: the "
                        "directory's name)")
    parser.add_argument("--allowed-local-media-path", type=Path, default=None,
                        help="file:// video URLs are read only under this folder (default: refused)")
    parser.add_argument("--allowed-media-domains", nargs="*", default=[], metavar="DOMAIN",
                        help="http(s) video URLs are fetched only from these hosts (.example.com: its "
                        "subdomains too); private and loopback addresses are refused anyway")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decode step where, measured at start-up, it beats the eager step")
    add_limit_arguments(parser)


def add_access_arguments(parser: argparse.ArgumentParser, *, key_help: str) -> None:
    """``--api-key`` and ``--allowed-hosts``, for ``serve`` and ``chat``."""
    parser.add_argument("--api-key", default=None, help=f"{key_help} (default: $VIDEOLLAMA_API_KEY)")
    parser.add_argument("--allowed-hosts", nargs="+", default=[], metavar="NAME",
                        help="Host names (and Origin hosts of browsers) the server answers besides localhost, "
                        "127.0.0.1, ::1 and the bind address, e.g. the machine's name when bound to 0.0.0.0; "
                        "'*' answers any (421 otherwise: a web page cannot reach the server by DNS rebinding)")


def api_key(args: argparse.Namespace) -> str | None:
    return args.api_key or os.environ.get("VIDEOLLAMA_API_KEY") or None


def pick_device(name: str | None) -> str:
    """The torch device to serve on: ``name``, checked, or cuda when available, else cpu."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name}: not a torch device ({str(e).split(':')[0]})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (try --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: only cpu and cuda devices are served")
    return name


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from videollama.serve import guard
    from videollama.serve.app import create_app
    from videollama.serve.engine import Engine

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    limits = limits_from_args(args)
    if not (args.model / "config.json").is_file():
        raise FileNotFoundError(f"serve: {args.model} is not a model directory (no config.json)")
    if args.allowed_local_media_path is not None and not args.allowed_local_media_path.is_dir():
        raise FileNotFoundError(f"--allowed-local-media-path {args.allowed_local_media_path}: no such folder")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be 1 to 65535, got {args.port}")
    key = api_key(args)
    hosts = guard.allowed_hosts(args.host, args.allowed_hosts)
    device = pick_device(args.device)
    if key is None:
        logging.getLogger(__name__).warning("no API key (--api-key or VIDEOLLAMA_API_KEY): any local client may call")
    if args.host in ("0.0.0.0", "::") and not args.allowed_hosts:
        logging.getLogger(__name__).warning("bound to %s: only Host localhost, 127.0.0.1, ::1 and %s are answered; "
                                            "give the names clients use with --allowed-hosts", args.host, args.host)
    engine = Engine.from_model_dir(args.model, device=device, adapter=args.adapter, quantize=args.quantize,
                                   limits=limits, compile=args.compile,
                                   allowed_local_path=args.allowed_local_media_path,
                                   allowed_domains=tuple(args.allowed_media_domains))
    if args.served_model_name:
        engine.name = args.served_model_name
    if args.compile:
        engine.warm_up()  # every batch bucket's step chosen (and compiled) before the first request
    engine.start()
    try:
        uvicorn.run(create_app(engine, api_key=key, hosts=hosts), host=args.host, port=args.port,
                    log_level="info", timeout_graceful_shutdown=5)
    finally:
        engine.close()
    return 0
