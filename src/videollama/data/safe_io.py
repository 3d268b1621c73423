"""Reading files a user hands us, with bounds: regular files only, lines and JSON of bounded size
and depth, valid UTF-8, and paths that stay inside their root.

Every function raises an error that names the file (and the line) and says what is wrong; the
readers turn it into a counted skip (the loader, ``data shards``, ``eval``) or a one-line error.
Imports no torch.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# The caps live in videollama.constants; the readers here apply them (and re-export them).
from videollama.constants import MAX_JSON_BYTES as MAX_JSON_BYTES
from videollama.constants import MAX_JSON_DEPTH as MAX_JSON_DEPTH
from videollama.constants import MAX_LINE_BYTES as MAX_LINE_BYTES
from videollama.constants import MAX_TEXT_CHARS as MAX_TEXT_CHARS
from videollama.data.errors import NOT_A_FILE, OUTSIDE_ROOT, TOO_LARGE, BadSample

NUL_IN_PATH = "the path contains a NUL byte, which no file name can hold"


def check_regular_file(path: str | os.PathLike, what: str = "file", *, name: str | None = None) -> os.stat_result:
    """``os.stat`` of ``path`` (following links), refusing anything but a regular file.

    Only ``stat``: a FIFO would block an open forever and a device (``/dev/zero``) never ends,
    so both are refused before anything opens them. Raises FileNotFoundError for a missing path
    (or a dangling link), BadSample(NOT_A_FILE) otherwise (a symlink loop included); errors name
    ``name`` (default: the path).
    """
    source = str(path) if name is None else name
    if "\x00" in os.fsdecode(path):  # os.stat would raise ValueError, which no caller expects
        raise BadSample(NOT_A_FILE, source.replace("\x00", "\\x00"), NUL_IN_PATH)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise
    except OSError as e:  # ELOOP (symlink loop), EACCES, ENAMETOOLONG, ...
        why = ("symlink loop (too many levels of symbolic links)" if e.errno == errno.ELOOP
               else f"cannot stat the {what}: {e.strerror or e}")
        raise BadSample(NOT_A_FILE, source, why) from e
    if not stat.S_ISREG(st.st_mode):
        raise BadSample(NOT_A_FILE, source, f"the {what} is a {_file_kind(st.st_mode)}, not a regular file")
    return st


def _file_kind(mode: int) -> str:
    kinds = [(stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
             (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")]
    return next((kind for test, kind in kinds if test(mode)), f"file of mode {stat.filemode(mode)}")


def read_json_object(path: str | os.PathLike, what: str = "JSON file", *, limit: int = MAX_JSON_BYTES) -> dict:
    """A regular JSON file of at most ``limit`` bytes holding an object, parsed with parse_json's bounds."""
    value = parse_json(read_bounded(path, limit, what), str(path))
    if not isinstance(value, dict):
        raise ValueError(f"{path}: the {what} is not a JSON object")
    return value


def read_yaml_object(path: str | os.PathLike, what: str = "YAML file", *, limit: int = MAX_JSON_BYTES) -> dict:
    """A regular YAML file of at most ``limit`` bytes holding a mapping (an empty file: ``{}``),
    with parse_json's depth bound and no aliases (``*name``: a few of them can stand for an
    exponential amount of data). Errors are ValueError or BadSample naming the file."""
    import yaml

    data = read_bounded(path, limit, what)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 (byte {data[e.start]:#04x} at offset {e.start})") from None

    class NoAliases(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)

    try:
        value = yaml.load(text, Loader=NoAliases)  # noqa: S506 - a SafeLoader
    except RecursionError:
        raise ValueError(f"{path}: YAML nested too deeply") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if value is None:
        return {}
    if _depth(value) > MAX_JSON_DEPTH:
        raise ValueError(f"{path}: YAML nested deeper than {MAX_JSON_DEPTH} levels")
    if not isinstance(value, dict):
        raise ValueError(f"{path}: the {what} must be a YAML mapping")
    return value


def read_bounded(path: str | os.PathLike, limit: int, what: str = "file") -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (BadSample(TOO_LARGE) above it)."""
    st = check_regular_file(path, what)
    if st.st_size > limit:
        raise BadSample(TOO_LARGE, str(path), f"the {what} is {st.st_size} bytes, over the {limit}-byte cap")
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:  # grew since the stat
        raise BadSample(TOO_LARGE, str(path), f"the {what} is over the {limit}-byte cap")
    return data


def iter_lines(path: str | os.PathLike, *, max_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, str | ValueError]]:
    """``(line number, text)`` for each non-blank line of a regular text file, or ``(line number,
    ValueError)`` for a line over ``max_bytes`` or not valid UTF-8 (the reading goes on).

    Memory stays within ``max_bytes`` whatever the file holds: an over-long line is read past
    in chunks, never held."""
    check_regular_file(path, "JSONL file")
    with open(path, "rb") as f:
        lineno = 0
        while True:
            raw = f.readline(max_bytes + 1)
            if not raw:
                return
            lineno += 1
            if len(raw) > max_bytes and not raw.endswith(b"\n"):
                while raw and not raw.endswith(b"\n"):  # skip the rest of this line
                    raw = f.readline(max_bytes + 1)
                yield lineno, ValueError(f"{path}:{lineno}: line longer than {max_bytes} bytes")
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, ValueError(f"{path}:{lineno}: not valid UTF-8 (byte {raw[e.start]:#04x} "
                                         f"at column {e.start + 1})")
                continue
            if text.strip():
                yield lineno, text


def parse_json(text: str | bytes, where: str, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` with the errors a hostile file can cause turned into one ValueError naming ``where``."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{where}: not valid UTF-8 (byte {text[e.start]:#04x} at offset {e.start})") from None
    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError(f"{where}: JSON nested too deeply") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
    if _depth(value) > max_depth:
        raise ValueError(f"{where}: JSON nested deeper than {max_depth} levels")
    return value



def iter_manifest(path: Path, label: str | None = None) -> Iterator[tuple[int, str, dict | ValueError]]:
    """The lines of a JSONL manifest of videos: ``(line number, "LABEL:LINENO", row)`` where row
    is the line's JSON object (with a string ``"video"``) or the ValueError saying why the line is
    not one (too long, not JSON, no video path). LABEL defaults to the path."""
    label = str(path) if label is None else label
    for lineno, line in iter_lines(path):
        where = f"{label}:{lineno}"
        try:
            if isinstance(line, ValueError):
                raise line
            row = parse_json(line, where)
            if not isinstance(row, dict) or not isinstance(row.get("video"), str):
                raise ValueError(f'{where}: each line must be a JSON object with a "video" path')
        except ValueError as e:
            yield lineno, where, e
            continue
        yield lineno, where, row

def _depth(value: Any) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def resolve_inside(root: str | os.PathLike, relative: str, *, allow_outside: bool = False) -> Path:
    """``root / relative`` with symbolic links resolved, refused unless it stays inside ``root``.

    An absolute path, ``..`` or a link that points out is BadSample(OUTSIDE_ROOT), with a message
    that does not say whether the target exists. ``allow_outside`` turns the check off (an
    explicit user choice, e.g. ``eval --allow-outside-root``).
    """
    if "\x00" in relative:  # every os call on it would raise ValueError, ending the whole run
        raise BadSample(NOT_A_FILE, relative.replace("\x00", "\\x00"), NUL_IN_PATH)
    base = Path(root).resolve()
    try:
        resolved = (base / relative).resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop, on some Pythons
        raise BadSample(NOT_A_FILE, relative, f"cannot resolve the path: {e}") from e
    if not allow_outside and not resolved.is_relative_to(base):
        raise BadSample(OUTSIDE_ROOT, relative, f"the path leaves its root folder {root}; refused "
                                                       "(absolute path, '..' or a link out)")
    return resolved


@contextmanager
def written_beside(out: Path) -> Iterator[Path]:
    """A fresh folder beside ``out`` to write into; when the block ends without error it replaces
    ``out`` (whole), else it is removed and ``out`` is left as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.writing-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        yield staging
        if out.exists():
            retired = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, retired)
            os.replace(staging, out)
            shutil.rmtree(retired)
        else:
            os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
