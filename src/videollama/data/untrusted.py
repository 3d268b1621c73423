"""Decoding an untrusted video in a sandbox: ``load_clip`` in a child process with a memory limit
and a wall-clock timeout, for what no declaration check covers (serving untrusted uploads).
The checks of what a file declares are in mp4_boxes.py and h264_sps.py.
"""

from __future__ import annotations

# ---- decoding in a sandbox ----------------------------------------------------------------------

DEFAULT_ISOLATED_MEMORY_BYTES = 2 << 30
DEFAULT_ISOLATED_TIMEOUT_S = 120.0
_context = None


def load_clip_isolated(source, *, memory_bytes: int = DEFAULT_ISOLATED_MEMORY_BYTES,
                       timeout_s: float = DEFAULT_ISOLATED_TIMEOUT_S, **load_clip_kwargs):
    """``load_clip(source, **load_clip_kwargs)`` in a child process, for input nothing vouches for.

    The child may map ``memory_bytes`` of address space beyond what it starts with
    (``RLIMIT_AS``; Linux enforces it) and is killed after ``timeout_s`` seconds of wall-clock
    time, whatever FFmpeg is doing. Children are forked from a server process that has imported
    the loader once (multiprocessing's ``forkserver``), so each clip costs a fork, not an
    interpreter start; the first call starts the server.

    Returns what ``load_clip`` returns. Raises what it raises (``BadSample``,
    ``FileNotFoundError``, ``ValueError``), and ``BadSample`` with reason OUT_OF_MEMORY when the
    child ran out of its memory, TIMEOUT when it was killed at ``timeout_s``, DECODE_ERROR when
    it died otherwise (a crash in FFmpeg).
    """
    import torch

    from videollama.data.errors import DECODE_ERROR, OUT_OF_MEMORY, TIMEOUT, BadSample

    name = load_clip_kwargs.get("name")
    if name is None:
        name = f"<{len(source)} bytes>" if isinstance(source, bytes | bytearray | memoryview) else str(source)
        load_clip_kwargs["name"] = name
    if isinstance(source, bytearray | memoryview):
        source = bytes(source)
    receive, send = mp_context().Pipe(duplex=False)
    child = mp_context().Process(target=_isolated_child, args=(send, source, memory_bytes, load_clip_kwargs),
                                  daemon=True)
    child.start()
    send.close()
    try:
        if not receive.poll(timeout_s):
            raise BadSample(TIMEOUT, name, f"isolated decode killed after {timeout_s:g} s")
        try:
            kind, payload = receive.recv()
        except EOFError:  # the child died without a word
            child.join(5)
            code = child.exitcode
            raise BadSample(DECODE_ERROR, name, f"isolated decode died (exit code {code})") from None
    finally:
        if child.is_alive():
            child.kill()
        child.join()
        receive.close()
    if kind == "clip":
        frames, timestamps = payload
        return torch.from_numpy(frames), torch.from_numpy(timestamps)
    if kind == "bad":
        reason, bad_source, message = payload
        error = BadSample(reason, bad_source, "")
        error.args = (message,)
        raise error
    if kind == "oom":
        raise BadSample(OUT_OF_MEMORY, name, f"isolated decode ran out of its {memory_bytes} bytes: {payload}")
    raise payload  # an exception load_clip raises itself (FileNotFoundError, ValueError)


def mp_context():
    """The process context of every sandboxed decode (here and in the server's probe): a fork
    server with the decoding modules preloaded, so a child starts in milliseconds and shares no
    state with the parent."""
    global _context
    if _context is None:
        import multiprocessing

        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(["videollama.data.video"])
    return _context


def start_fork_server() -> None:
    """Start :func:`mp_context`'s fork server now (once per process; it imports torch and PyAV,
    about 2 s): a server calls this before it serves, so its first request pays only its own decode."""
    from multiprocessing import forkserver

    mp_context()
    forkserver.ensure_running()


def _isolated_child(send, source, memory_bytes: int, load_clip_kwargs: dict) -> None:
    import resource

    from videollama.data.errors import BadSample
    from videollama.data.video import load_clip

    try:
        with open("/proc/self/statm") as statm:  # the address space already mapped, in pages
            mapped = int(statm.read().split()[0]) * resource.getpagesize()
    except OSError:
        mapped = 0
    limit = mapped + memory_bytes
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        frames, timestamps = load_clip(source, **load_clip_kwargs)
        message = ("clip", (frames.numpy(), timestamps.numpy()))
    except BadSample as error:
        if isinstance(error.__cause__, MemoryError):  # FFmpeg could not allocate (ENOMEM)
            message = ("oom", str(error))
        else:
            message = ("bad", (error.reason, error.source, str(error)))
    except MemoryError as error:
        message = ("oom", f"{type(error).__name__}: {error}")
    except Exception as error:  # handed to the parent, which raises it
        if isinstance(error, RuntimeError) and "can't allocate memory" in str(error):  # torch's CPU allocator
            message = ("oom", str(error))
        else:
            message = ("error", error)
    try:
        send.send(message)
    except MemoryError:
        send.send(("oom", "sending the result"))
    send.close()
