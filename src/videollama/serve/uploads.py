"""The chat page's file boundary: which files its handlers may read, and how.

A Gradio event carries a file as a ``FileData`` whose ``path`` the browser sends back, so a
hostile client can name any path (``/etc/shadow``, ``/dev/zero``, a FIFO) or a URL. Three layers
keep the page to what it was given:

1. Gradio's own allow-list: ``mount_ui`` marks the page as launched (a mounted app never is, and
   Gradio skips its path check for an app that is not), so an event's input file must lie in
   Gradio's upload folder before Gradio copies or hashes it;
2. :func:`refuse_url_inputs`: the page's video component takes no URL (Gradio would download
   one into its cache);
3. :func:`read_upload`: the handlers read only a regular file inside the upload folder (after
   resolving links), opened without blocking and without following a final link, and at most
   ``--max-video-bytes`` of it. Its bytes are then decoded only in the sandboxed decoder.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def _read_regular(path: str | os.PathLike, cap: int, shown: str) -> bytes:
    """At most ``cap`` bytes of a regular file (ValueError for anything else or anything larger).

    Opened with O_NONBLOCK (a FIFO opens at once instead of waiting for a writer) and O_NOFOLLOW,
    then checked with fstat on that descriptor: what is read is what was checked."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{shown}: not a regular file")
        if info.st_size > cap:
            raise ValueError(f"{shown}: {info.st_size} bytes, over the server's {cap}-byte cap for a video "
                             "(--max-video-bytes)")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=True) as f:
            fd = -1
            data = f.read(cap + 1)
    finally:
        if fd >= 0:
            os.close(fd)
    if len(data) > cap:  # it grew meanwhile
        raise ValueError(f"{shown}: over the server's {cap}-byte cap for a video (--max-video-bytes)")
    return data


def read_video(path: str | Path, cap: int) -> bytes:
    """The bytes of a video file the operator named (``--examples``), refusing one over ``cap``
    bytes before reading it, and anything but a regular file."""
    path = Path(os.path.realpath(path))
    return _read_regular(path, cap, path.name)


def read_upload(path, upload_folder: str | Path, cap: int) -> bytes:
    """The bytes of a video the page received as an upload: a regular file inside
    ``upload_folder`` (Gradio's), at most ``cap`` bytes. Anything else is a ValueError that says
    nothing of the file itself (not whether it exists)."""
    if not isinstance(path, str | Path) or not str(path) or "\x00" in str(path):
        raise ValueError("not a video this page received")
    real, root = os.path.realpath(path), os.path.realpath(upload_folder)
    if os.path.commonpath([real, root]) != root or real == root:
        raise ValueError("not a video this page received (only uploads are read)")
    try:
        return _read_regular(real, cap, Path(real).name)
    except FileNotFoundError:
        raise ValueError("the uploaded video is gone (uploads are kept for 2 hours): upload it again") from None


def refuse_url_inputs(video) -> None:
    """Make a ``gr.Video`` refuse URLs where Gradio would fetch them into its cache (on its own
    instance: a subclass of a Gradio component makes Gradio write a ``.pyi`` beside its module)."""
    from gradio.exceptions import InvalidPathError

    def refuse(path) -> None:
        if str(path).lower().startswith(("http:", "https:")):
            raise InvalidPathError("this page takes uploaded videos only, not URLs")

    move, async_move = video.move_resource_to_block_cache, video.async_move_resource_to_block_cache

    def guarded_move(url_or_file_path):
        refuse(url_or_file_path)
        return move(url_or_file_path)

    async def guarded_async_move(url_or_file_path):
        refuse(url_or_file_path)
        return await async_move(url_or_file_path)

    video.move_resource_to_block_cache, video.async_move_resource_to_block_cache = guarded_move, guarded_async_move
