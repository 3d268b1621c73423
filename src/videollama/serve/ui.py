"""The web chat UI (Gradio) and the ``videollama chat`` command.

One page: upload a video (or pick an example), see the frames the model sees with their
timestamps, ask questions and watch the answer stream in. The page talks to the serving
engine (:mod:`videollama.serve.engine`) in-process, the same engine object that answers the
OpenAI-compatible API: ``videollama chat`` mounts the page at ``/`` of the API's app, so one
process, one model and one batch serve both. There is no second generation path here.

Offline by construction: Gradio's analytics are switched off before it is imported, there is
no share link, no server-side rendering (no Node), and the page's theme uses the fonts that
Gradio ships, so the browser loads nothing but this server's own assets.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import inspect
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

from videollama.serve.limits import APIError

STOP_TIMEOUT_S = 45.0  # Ctrl-C to exit, at most

# Before Gradio is imported anywhere in this process: no telemetry, no version check.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

# Default generation settings shown on the page (temperature 0 is greedy); the engine's limits
# (``--max-tokens``, ``--max-video-bytes``, ``--max-batch``) bound what the page offers.
DEFAULT_MAX_TOKENS = 64
# How many Shapes clips `videollama chat` offers as examples when given no --examples folder.
NUM_SHAPES_EXAMPLES = 3
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi")

CSS = """
#frames img { image-rendering: pixelated; }
"""


def _gradio():
    try:
        import gradio as gr
    except ImportError as e:  # an optional dependency: one line saying how to get it (an OSError
        # is what the CLI prints as `videollama: error: ...`)
        raise OSError(f"the web UI needs gradio ({e}): pip install 'videollama[ui]'") from e
    return gr


def frame_caption(index: int, seconds: float) -> str:
    """The caption under frame ``index`` (0-based) of the gallery, e.g. ``frame 1 · 0.25 s``."""
    return f"frame {index + 1} · {seconds:.2f} s"


def video_message(video: bytes, text: str) -> dict:
    """A user message in the OpenAI chat format with the video before the text; the video rides
    as the engine's in-process ``{"type": "video", "video": bytes}`` part (the API's clients send
    the same bytes as a ``video_url``)."""
    return {"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": text}]}


def engine_messages(history: Sequence[dict], video: bytes | None, question: str) -> list[dict]:
    """The OpenAI-format messages for ``question`` after ``history`` (the chatbot's messages,
    ``{"role", "content"}`` with string content): the video rides on the first user turn."""
    turns = [(m["role"], _text_of(m["content"])) for m in history if m["role"] in ("user", "assistant")]
    turns.append(("user", question))
    messages: list[dict] = []
    for i, (role, text) in enumerate(turns):
        first_user = role == "user" and not any(r == "user" for r, _ in turns[:i])
        if first_user and video is not None:
            messages.append(video_message(video, text))
        else:
            messages.append({"role": role, "content": text})
    return messages


def _text_of(content: Any) -> str:
    """A chatbot message's text (Gradio may hand back a string or a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    if isinstance(content, dict):
        return str(content.get("text", ""))
    return str(content)


def read_video(path: str | Path, cap: int) -> bytes:
    """The bytes of an uploaded video, refusing one over ``cap`` bytes before reading it."""
    path = Path(path)
    size = path.stat().st_size
    if size > cap:
        raise ValueError(f"{path.name}: {size} bytes, over the server's {cap}-byte cap for a video "
                         "(--max-video-bytes)")
    with open(path, "rb") as f:
        data = f.read(cap + 1)
    if len(data) > cap:  # it grew meanwhile
        raise ValueError(f"{path.name}: over the server's {cap}-byte cap for a video (--max-video-bytes)")
    return data


async def preview_frames(engine, video: bytes) -> tuple[list[tuple[Any, str]], list[float]]:
    """The gallery items for a video, ``(uint8 [H, W, 3] frame, caption)`` per frame the model
    sees, and the frames' times in seconds; from the engine's own preprocessing
    (``engine.preview``), decoded off the event loop."""
    if inspect.iscoroutinefunction(engine.preview):
        frames, timestamps = await engine.preview(video)
    else:
        frames, timestamps = await asyncio.to_thread(engine.preview, video)
    seconds = [float(t) for t in timestamps]
    return [(frames[i], frame_caption(i, seconds[i])) for i in range(len(frames))], seconds


def build_ui(engine, *, examples: Sequence[str | Path] = (), title: str = "VideoLlama chat"):
    """The Gradio Blocks page over ``engine`` (which must be started by the caller)."""
    gr = _gradio()
    limits = engine.limits

    def on_new_video(path: str | None):
        """A new video (upload, example or clear): a fresh chat at once, the frames to come."""
        return [], [], ("Reading the frames the model sees..." if path else "Upload a video or pick an example.")

    async def on_preview(path: str | None):
        """The frames the model sees of the video now shown, with their times."""
        if not path:
            return [], "Upload a video or pick an example."
        try:
            data = read_video(path, limits.max_video_bytes)
            items, seconds = await preview_frames(engine, data)
        except (APIError, ValueError, OSError) as e:  # a bad video is the user's to fix: say so on the page
            return [], f"Cannot use this video: {e}"
        at = ", ".join(f"{t:.2f}" for t in seconds)
        return items, f"The model sees {len(items)} frames, at {at} s."

    async def respond(question: str, history: list[dict], path: str | None, max_tokens: float,
                      temperature: float, top_p: float, seed: float) -> AsyncIterator[tuple[str, list[dict]]]:
        question = (question or "").strip()
        if not question:
            yield "", history
            return
        video = read_video(path, limits.max_video_bytes) if path else None
        messages = engine_messages(history, video, question)
        history = [*history, {"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        yield "", history
        options: dict[str, Any] = {"max_tokens": int(max_tokens), "temperature": float(temperature),
                                   "top_p": float(top_p)}
        if temperature > 0:
            options["seed"] = int(seed)
        answer = ""
        try:
            async for event in engine.chat(messages, **options):
                if isinstance(event, str):  # a text delta; the final ChatResult repeats the whole text
                    answer += event
                    history[-1] = {"role": "assistant", "content": answer}
                    yield "", history
        except (APIError, ValueError, OSError) as e:  # the request's fault (too long, bad video...): say so
            history[-1] = {"role": "assistant", "content": f"{answer}\n[error: {e}]".lstrip()}
            yield "", history

    # Uploads and gallery images live in Gradio's cache folder: files older than 2 h are
    # removed every hour, so a long-running server does not fill its disk.
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(3600, 7200)) as page:
        gr.Markdown(f"## {title}\nUpload a video or pick an example, then ask about it.")
        with gr.Row():
            with gr.Column(scale=1):
                video = gr.Video(label="Video", sources=["upload"], format=None, elem_id="video")
                if examples:
                    gr.Examples([[str(p)] for p in examples], inputs=[video], label="Examples",
                                elem_id="examples")
                status = gr.Markdown("Upload a video or pick an example.", elem_id="status")
                frames = gr.Gallery(label="Frames the model sees", columns=4, format="png",
                                    object_fit="contain", allow_preview=True, height=280, elem_id="frames")
            with gr.Column(scale=1):
                chatbot = gr.Chatbot(label="Chat", render_markdown=False, elem_id="chatbot",
                                     feedback_options=None, height=480)
                question = gr.Textbox(label="Question", placeholder="What happens in the video?",
                                      elem_id="question", lines=1, submit_btn=True)
                with gr.Accordion("Generation", open=False):
                    max_tokens = gr.Slider(1, limits.max_tokens, value=min(DEFAULT_MAX_TOKENS, limits.max_tokens),
                                           step=1, label="max tokens")
                    temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature (0 = greedy)")
                    top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top p (with temperature > 0)")
                    seed = gr.Number(value=0, precision=0, label="seed (with temperature > 0)")
                clear = gr.Button("Clear chat")
        # Gradio runs one event of a kind at a time unless told: let as many chats run as the
        # engine batches (more wait in Gradio's queue, showing their place), and as many
        # previews as it has decode workers.
        # A question asked before the preview is done still goes with the video shown: the chat
        # reads the video component itself, and the engine decodes (and caches) it on its own.
        video.change(on_new_video, inputs=[video], outputs=[frames, chatbot, status], queue=False).then(
            on_preview, inputs=[video], outputs=[frames, status], concurrency_limit=limits.decode_workers)
        question.submit(respond, inputs=[question, chatbot, video, max_tokens, temperature, top_p, seed],
                        outputs=[question, chatbot], concurrency_limit=limits.max_batch)
        clear.click(lambda: [], outputs=[chatbot])
    return page


def mount_ui(app, engine, *, examples: Sequence[str | Path] = ()):
    """Mount the page at ``/`` of a FastAPI ``app`` (e.g. the API's), serving local assets only."""
    gr = _gradio()
    page = build_ui(engine, examples=examples)
    theme = gr.themes.Default()  # fonts from Gradio's own static folder, not Google Fonts
    allowed = sorted({str(Path(p).resolve().parent) for p in examples})
    # allowed_paths: the examples' folder only (a scratch copy, see example_videos), so that
    # nothing else of the machine is served.
    return gr.mount_gradio_app(app, page, path="/", ssr_mode=False, mcp_server=False, pwa=False,
                               allowed_paths=allowed, max_file_size=engine.limits.max_video_bytes,
                               theme=theme, css=CSS, footer_links=[])


def _api_app(engine):
    """The OpenAI-compatible API's FastAPI app (serve/app.py) over the same ``engine``."""
    from videollama.serve.app import create_app

    # No API key here: serve/app.py's key check covers every route, the page's included.
    return create_app(engine)


@contextlib.contextmanager
def serving(engine, *, host: str = "127.0.0.1", port: int = 0, examples: Sequence[str | Path] = (),
            with_api: bool = True, start_timeout_s: float = 60.0) -> Iterator[str]:
    """Serve the page (and the API beside it) on a background thread; yields the base URL.

    ``port=0`` takes a free port. The server is stopped on exit, whatever happened inside."""
    import uvicorn
    from fastapi import FastAPI

    app = mount_ui(_api_app(engine) if with_api else FastAPI(), engine, examples=examples)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on",
                                            timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, name="videollama-ui", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + start_timeout_s
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"the web UI server did not start on {host}:{port} (is the port in use?)")
            time.sleep(0.05)
        bound = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://{host}:{bound}/"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def shapes_examples(directory: Path, n: int = NUM_SHAPES_EXAMPLES, seed: int = 0) -> list[Path]:
    """Write ``n`` Shapes clips (5 s, 320x240) into ``directory``; return their paths."""
    from videollama.data import shapes

    rng = random.Random(seed)
    paths = []
    for i in range(n):
        spec = shapes.sample_clip_spec(rng)
        path = directory / f"shapes-{i}.mp4"
        path.write_bytes(shapes.encode_mp4(shapes.render_frames(spec)))
        paths.append(path)
    return paths


def example_videos(folder: Path | None, scratch: Path, cap: int) -> list[Path]:
    """The example videos, in ``scratch`` (the only folder the page may serve them from): copies
    of ``folder``'s videos (sorted, at most 12, each at most ``cap`` bytes), or fresh Shapes clips."""
    if folder is None:
        return shapes_examples(scratch)
    if not folder.is_dir():
        raise NotADirectoryError(f"--examples {folder}: not a folder")
    found = sorted(p for p in folder.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
    if not found:
        raise ValueError(f"--examples {folder}: no video files ({', '.join(VIDEO_SUFFIXES)})")
    copies = []
    for path in found[:12]:
        copy = scratch / path.name
        copy.write_bytes(read_video(path, cap))
        copies.append(copy)
    return copies


# ---- the `videollama chat` command -----------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    from videollama.inference.load import add_model_arguments
    from videollama.serve.limits import add_limit_arguments

    add_model_arguments(parser)  # --model, --adapter, --quantize: as serve, generate and eval
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (0 = any free port)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--examples", type=Path, metavar="DIR",
                        help="a folder of example videos to offer (default: a few Shapes clips)")
    parser.add_argument("--no-api", action="store_true",
                        help="serve only the page, not the OpenAI-compatible API beside it at /v1")
    add_limit_arguments(parser)


def load_engine(args: argparse.Namespace):
    """The serving engine for ``args``: the same class and loader ``videollama serve`` uses."""
    import torch

    from videollama.serve.engine import Engine
    from videollama.serve.limits import limits_from_args

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return Engine.from_model_dir(args.model, device=device, adapter=args.adapter, quantize=args.quantize,
                                 limits=limits_from_args(args))


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be 0 to 65535, got {args.port}")
    if not (args.model / "config.json").is_file():
        raise FileNotFoundError(f"chat: {args.model} is not a model directory (no config.json)")
    if args.examples is not None and not args.examples.is_dir():
        raise NotADirectoryError(f"--examples {args.examples}: not a folder")
    _gradio()  # a missing optional dependency fails before any weights are read
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"videollama chat: warning: listening on {args.host}: the page and the API ask for no key, "
              "anyone who can reach this address can use the model", file=sys.stderr)
    # Ctrl-C and SIGTERM stop the page, installed explicitly as uvicorn does for `serve`: a process
    # started in the background by a non-interactive shell inherits SIGINT as ignored, and Python
    # then installs no KeyboardInterrupt handler of its own.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _raise_keyboard_interrupt)
    engine = load_engine(args)
    engine.start()
    try:
        with tempfile.TemporaryDirectory(prefix="videollama-chat-") as scratch:
            examples = example_videos(args.examples, Path(scratch), engine.limits.max_video_bytes)
            with serving(engine, host=args.host, port=args.port, examples=examples,
                         with_api=not args.no_api) as url:
                api = "" if args.no_api else f" (API at {url}v1)"
                print(f"videollama chat: serving {args.model} at {url}{api}; Ctrl-C stops", flush=True)
                try:
                    while True:
                        time.sleep(3600)
                except KeyboardInterrupt:
                    print("videollama chat: stopping", flush=True)
                    # A stop is bounded: should closing the server and the engine take longer,
                    # every thread's stack goes to stderr (what held it) and the process exits 1.
                    faulthandler.dump_traceback_later(STOP_TIMEOUT_S, exit=True)
    finally:
        engine.close()
    faulthandler.cancel_dump_traceback_later()
    return 0
