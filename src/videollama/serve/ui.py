"""The web chat UI (Gradio) and the ``videollama chat`` command.

One page: upload a video (or pick an example), see the windows the model sees of the whole video
on a timeline and their frames with their timestamps (serve/timeline.py), ask questions and watch
the answer stream in; an answer that names a time range is marked on the timeline. The page talks to the serving
engine (:mod:`videollama.serve.engine`) in-process, the same engine object that answers the
OpenAI-compatible API: ``videollama chat`` mounts the page at ``/`` of the API's app, so one
process, one model and one batch serve both. There is no second generation path here.

Offline by construction: Gradio's analytics are switched off before it is imported, there is
no share link, no server-side rendering (no Node), and the page's theme uses the fonts that
Gradio ships, so the browser loads nothing but this server's own assets.

Hostile clients: the page's handlers read only files the page received as uploads
(serve/uploads.py); the whole server, page and API, sits behind the request guard (serve/guard.py:
Host, Origin, body limits); with an API key the API asks for it as ``serve`` does and the page
asks for it once, as the password of Gradio's login form.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import hmac
import math
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from videollama.serve.examples import example_videos
from videollama.serve.limits import APIError
from videollama.serve.timeline import (
    TIMELINE_CSS,
    answer_segment,
    answer_status,
    frame_caption,
    preview_frames,
    preview_status,
)
from videollama.serve.uploads import read_upload, read_video, refuse_url_inputs

__all__ = ["build_ui", "mount_ui", "serving", "read_video", "read_upload", "engine_messages", "video_message",
           "frame_caption"]

STOP_TIMEOUT_S = 45.0  # Ctrl-C to exit, at most
PAGE_EVENT_BYTES = 1 << 20  # the body of one of the page's events (uploads excepted)

# Before Gradio is imported anywhere in this process: no telemetry, no version check.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

# Default generation settings shown on the page (temperature 0 is greedy); the engine's limits
# (``--max-tokens``, ``--max-video-bytes``, ``--max-batch``) bound what the page offers.
DEFAULT_MAX_TOKENS = 64

CSS = """
#frames img { image-rendering: pixelated; }
""" + TIMELINE_CSS


def _gradio():
    try:
        import gradio as gr
    except ImportError as e:  # an optional dependency: one line saying how to get it (an OSError
        # is what the CLI prints as `videollama: error: ...`)
        raise OSError(f"the web UI needs gradio ({e}): pip install 'videollama[ui]'") from e
    return gr


def video_message(video: bytes, text: str) -> dict:
    """A user message in the OpenAI chat format with the video before the text; the video rides
    as the engine's in-process ``{"type": "video", "video": bytes}`` part (the API's clients send
    the same bytes as a ``video_url``)."""
    return {"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": text}]}


def engine_messages(history: Sequence[dict], video: bytes | None, question: str) -> list[dict]:
    """The OpenAI-format messages for ``question`` after ``history`` (the chatbot's messages,
    ``{"role", "content"}`` with string content): the video rides on the first user turn."""
    turns = [(m["role"], _text_of(m.get("content"))) for m in history
             if isinstance(m, dict) and m.get("role") in ("user", "assistant")]
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


def sampling_options(max_tokens, temperature, top_p, seed) -> dict[str, Any]:
    """The engine's options from the page's controls, whatever a client sent for them (the
    engine checks the ranges; a value that is no finite number is a ValueError here)."""
    values = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if max_tokens != int(max_tokens) or seed != int(seed):
        raise ValueError("max tokens and seed must be whole numbers")
    options: dict[str, Any] = {"max_tokens": int(max_tokens), "temperature": float(temperature),
                               "top_p": float(top_p)}
    if temperature > 0:
        options["seed"] = int(seed)
    return options


def build_ui(engine, *, examples: Sequence[str | Path] = (), title: str = "VideoLlama chat"):
    """The Gradio Blocks page over ``engine`` (which must be started by the caller)."""
    gr = _gradio()
    limits = engine.limits

    async def read(path) -> bytes:  # an upload of this page, off the event loop
        return await asyncio.to_thread(read_upload, path, page.video.GRADIO_CACHE, limits.max_video_bytes)

    def on_new_video(path: str | None):
        """A new video (upload, example or clear): a fresh chat at once, the frames to come."""
        return [], [], ("Reading the frames the model sees..." if path else "Upload a video or pick an example.")

    async def on_preview(path: str | None):
        """The windows the model sees of the video now shown (a timeline), and their frames."""
        if not path:
            return [], "Upload a video or pick an example."
        try:
            data = await read(path)
            items, preview = await preview_frames(engine, data)
        except (APIError, ValueError, OSError) as e:  # a bad video is the user's to fix: say so on the page
            return [], f"Cannot use this video: {e}"
        return items, preview_status(preview)

    async def respond(question: str, history: list[dict], path: str | None, max_tokens: float,
                      temperature: float, top_p: float, seed: float) -> AsyncIterator[tuple[str, list[dict], Any]]:
        question = (question or "").strip()
        if not question:
            yield "", history, gr.skip()
            return
        history = [m for m in history or [] if isinstance(m, dict)]
        turn = [*history, {"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        answer = ""
        try:
            options = sampling_options(max_tokens, temperature, top_p, seed)
            video = await read(path) if path else None
            messages = engine_messages(history, video, question)
            history = turn
            yield "", history, gr.skip()
            async for event in engine.chat(messages, **options):
                if isinstance(event, str):  # a text delta; the final ChatResult repeats the whole text
                    answer += event
                    history[-1] = {"role": "assistant", "content": answer}
                    yield "", history, gr.skip()
                elif event.timestamps and (segment := answer_segment(event.text)) is not None:
                    # An answer with a time range: marked on the timeline of the windows it saw.
                    yield "", history, answer_status(event.timestamps, engine.model.config.preprocess.window_s,
                                                     segment)
        except (APIError, ValueError, OSError) as e:  # the request's fault (too long, bad video...): say so
            history = turn
            history[-1] = {"role": "assistant", "content": f"{answer}\n[error: {e}]".lstrip()}
            yield "", history, gr.skip()

    # Uploads and gallery images live in Gradio's cache folder: files older than 2 h are
    # removed every hour, so a long-running server does not fill its disk.
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(3600, 7200)) as blocks:
        page = _layout(gr, title, limits, examples)
        # Gradio runs one event of a kind at a time unless told: let as many chats run as the
        # engine batches (more wait in Gradio's queue, showing their place), and as many
        # previews as it has decode workers.
        # A question asked before the preview is done still goes with the video shown: the chat
        # reads the video component itself, and the engine decodes (and caches) it on its own.
        page.video.change(on_new_video, inputs=[page.video], outputs=[page.frames, page.chatbot, page.status],
                          queue=False).then(on_preview, inputs=[page.video], outputs=[page.frames, page.status],
                                            concurrency_limit=limits.decode_workers)
        page.question.submit(respond, inputs=[page.question, page.chatbot, page.video, *page.sampling],
                             outputs=[page.question, page.chatbot, page.status], concurrency_limit=limits.max_batch)
        page.clear.click(lambda: [], outputs=[page.chatbot])
    return blocks


def _layout(gr, title: str, limits, examples: Sequence[str | Path]) -> SimpleNamespace:
    """The page's components, inside the caller's ``gr.Blocks``: ``video``, ``status``,
    ``frames``, ``chatbot``, ``question``, ``clear`` and ``sampling`` (max tokens, temperature,
    top p, seed: the order of :func:`sampling_options`' arguments)."""
    gr.Markdown(f"## {title}\nUpload a video or pick an example, then ask about it.")
    with gr.Row():
        with gr.Column(scale=1):
            video = gr.Video(label="Video", sources=["upload"], format=None, elem_id="video")
            refuse_url_inputs(video)
            if examples:
                gr.Examples([[str(p)] for p in examples], inputs=[video], label="Examples",
                            elem_id="examples")
            # The status carries the timeline, HTML made here of numbers alone (timeline.py).
            status = gr.Markdown("Upload a video or pick an example.", elem_id="status", sanitize_html=False)
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
    return SimpleNamespace(video=video, status=status, frames=frames, chatbot=chatbot, question=question,
                           clear=clear, sampling=[max_tokens, temperature, top_p, seed])


def mount_ui(app, engine, *, examples: Sequence[str | Path] = (), api_key: str | None = None):
    """Mount the page at ``/`` of a FastAPI ``app`` (e.g. the API's), serving local assets only.
    With ``api_key`` the page asks for it (any user name, the key as password)."""
    gr = _gradio()
    page = build_ui(engine, examples=examples)
    theme = gr.themes.Default()  # fonts from Gradio's own static folder, not Google Fonts
    allowed = sorted({str(Path(p).resolve().parent) for p in examples})
    auth = None
    if api_key:
        def auth(user: str, password: str) -> bool:
            return hmac.compare_digest(str(password).encode(), api_key.encode())
    # allowed_paths: the examples' folder only (a scratch copy, see example_videos), so that
    # nothing else of the machine is served.
    mounted = gr.mount_gradio_app(app, page, path="/", ssr_mode=False, mcp_server=False, pwa=False,
                                  allowed_paths=allowed, max_file_size=engine.limits.max_video_bytes,
                                  theme=theme, css=CSS, footer_links=[], auth=auth,
                                  auth_message="The server's API key is the password (any user name).")
    # Gradio checks an event's input files against its upload folder only once an app has been
    # launched, and a mounted app never is: without this, a client could name any file.
    page.has_launched = True
    # Gradio switches matplotlib's backend around every event, importing matplotlib (when it is
    # installed) on the event loop at the first one: a stall of seconds for every client. Now instead.
    with gr.utils.MatplotlibBackendMananger():
        pass
    return mounted


@contextlib.contextmanager
def serving(engine, *, host: str = "127.0.0.1", port: int = 0, examples: Sequence[str | Path] = (),
            with_api: bool = True, start_timeout_s: float = 60.0, api_key: str | None = None,
            allowed_hosts: Sequence[str] = ()) -> Iterator[str]:
    """Serve the page (and the API beside it) on a background thread; yields the base URL.

    ``port=0`` takes a free port. The server is stopped on exit, whatever happened inside.
    ``api_key``: asked of the API (Bearer) and of the page (its login); ``allowed_hosts``: Host
    names answered besides the local ones and ``host`` (serve/guard.py)."""
    import uvicorn
    from fastapi import FastAPI

    from videollama.serve import guard
    from videollama.serve.app import api_paths, create_api, create_app

    inner = mount_ui(create_api(engine) if with_api else FastAPI(), engine, examples=examples, api_key=api_key)
    whole = engine.limits.max_body_bytes

    def body_cap(path: str) -> int:
        # Gradio parses an event's JSON on the event loop, whole: the page's events (a question,
        # the chat so far, file references) get a small cap; uploads and the API their own.
        return whole if api_paths(path) or path == "/gradio_api/upload" else min(whole, PAGE_EVENT_BYTES)

    app = create_app(engine, api_key=api_key, hosts=guard.allowed_hosts(host, allowed_hosts), inner=inner,
                     needs_key=api_paths, body_cap=body_cap)
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


# ---- the `videollama chat` command -----------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    from videollama.inference.load import add_model_arguments
    from videollama.serve.cli import add_access_arguments
    from videollama.serve.limits import add_limit_arguments

    add_model_arguments(parser)  # --model, --adapter, --quantize: as serve, generate and eval
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (0 = any free port)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--examples", type=Path, metavar="DIR",
                        help="a folder of example videos to offer (default: a few Shapes clips)")
    parser.add_argument("--no-api", action="store_true",
                        help="serve only the page, not the OpenAI-compatible API beside it at /v1")
    add_access_arguments(parser, key_help="required as 'Authorization: Bearer KEY' by the API at /v1 and "
                         "/metrics, and once by the page (its login form, any user name)")
    add_limit_arguments(parser)


def load_engine(args: argparse.Namespace):
    """The serving engine for ``args``: the same class and loader ``videollama serve`` uses."""
    from videollama.serve.cli import pick_device
    from videollama.serve.engine import Engine
    from videollama.serve.limits import limits_from_args

    return Engine.from_model_dir(args.model, device=pick_device(args.device), adapter=args.adapter,
                                 quantize=args.quantize, limits=limits_from_args(args))


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    from videollama.serve import guard
    from videollama.serve.cli import api_key, pick_device
    from videollama.serve.limits import limits_from_args

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be 0 to 65535, got {args.port}")
    limits_from_args(args)  # a bad limit is a one-line error before anything loads
    key = api_key(args)
    guard.allowed_hosts(args.host, args.allowed_hosts)
    pick_device(args.device)
    if not (args.model / "config.json").is_file():
        raise FileNotFoundError(f"chat: {args.model} is not a model directory (no config.json)")
    if args.examples is not None and not args.examples.is_dir():
        raise NotADirectoryError(f"--examples {args.examples}: not a folder")
    _gradio()  # a missing optional dependency fails before any weights are read
    if args.host not in ("127.0.0.1", "localhost", "::1") and key is None:
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
            with serving(engine, host=args.host, port=args.port, examples=examples, with_api=not args.no_api,
                         api_key=key, allowed_hosts=args.allowed_hosts) as url:
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
