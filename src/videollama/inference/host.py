"""The host a process decodes on, and the directory we keep what we learnt about it in.

``cache_dir()`` is ``$VIDEOLLAMA_CACHE`` or ``~/.cache/videollama``: a directory of ours (created
mode 0700; refused if another user owns it or others may write to it, since compiled code is
loaded from it). It holds the int8 kernel built for this host (``kernels/``), torch's inductor
caches (``inductor/``, so a second process reuses the compiled decode step) and the measurements
that chose between implementations (``tuning/<host key>.json``).

The host key names what a measurement depends on: the CPU model, the instruction set our kernel
is built for (:func:`isa`) and ATen's, and the torch version. A choice measured on one machine is
never reused on another kind.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import stat
import tempfile
import threading
from functools import cache
from pathlib import Path

CACHE_ENV = "VIDEOLLAMA_CACHE"
ISA_ENV = "VIDEOLLAMA_ISA"
ISAS = ("avx512", "avx2", "generic")  # best first: a host runs the best it has unless told lower
MAX_STORE_BYTES = 1 << 20


def cache_dir(sub: str = "") -> Path:
    """Our cache directory (or its subdirectory ``sub``), created if missing; PermissionError if
    it is not ours alone."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "videollama").expanduser()
    path = root / sub if sub else root
    root.parent.mkdir(parents=True, exist_ok=True)
    for d in (root, path):
        d.mkdir(exist_ok=True, mode=0o700)
    for d in {root, path}:
        st = d.stat()
        if st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise PermissionError(f"{d} is not a private directory of this user (owner uid {st.st_uid}, mode "
                                  f"{stat.S_IMODE(st.st_mode):o}): compiled code is never loaded from it; "
                                  f"set {CACHE_ENV} to a directory of yours")
    return path


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and a rename:
    another process reads the old file or the new one, never a part."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@cache
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what the platform module says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f.read(1 << 20).splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (``/proc/cpuinfo``; empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f.read(1 << 20).splitlines():
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def isa() -> str:
    """The instruction set our int8 kernel is built for: ``avx512`` (AVX-512 F), ``avx2`` (AVX2 and
    FMA) or ``generic`` (portable C). ``$VIDEOLLAMA_ISA`` may lower it (to measure the AVX2 path on
    an AVX-512 machine), never raise it above what the CPU has."""
    flags = cpu_flags()
    best = "avx512" if "avx512f" in flags else "avx2" if {"avx2", "fma"} <= flags else "generic"
    wanted = os.environ.get(ISA_ENV, "").strip().lower()
    if wanted in ISAS and ISAS.index(wanted) > ISAS.index(best):
        return wanted
    return best


def aten_isa() -> str:
    """ATen's CPU kernel level (``ATEN_CPU_CAPABILITY`` may lower it), e.g. ``AVX2``."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


def host_key() -> str:
    """A short name for (CPU model, our ISA, ATen's ISA, torch version): measurements are kept per key."""
    import torch

    ident = json.dumps([cpu_model(), isa(), aten_isa(), torch.__version__, platform.machine()])
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


class Store:
    """Measurements of this host, one JSON file per host key; writes are atomic and merge with
    what other processes wrote meanwhile (the last write of a key wins)."""

    _lock = threading.Lock()

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or cache_dir("tuning") / f"{host_key()}.json"

    def _read(self) -> dict:
        try:
            with open(self.path, "rb") as f:
                raw = f.read(MAX_STORE_BYTES + 1)
        except FileNotFoundError:
            return {}
        if len(raw) > MAX_STORE_BYTES:
            return {}  # not ours to trust: measure again
        try:
            data = json.loads(raw)
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, key: str) -> dict | None:
        value = self._read().get(key)
        return value if isinstance(value, dict) else None

    def put(self, key: str, value: dict) -> None:
        with self._lock:
            data = self._read()
            data[key] = value
            write_atomic(self.path, json.dumps(data, indent=1, sort_keys=True).encode())


def use_compile_cache() -> Path:
    """Point torch's inductor caches (FX graphs, AOT autograd, compiled kernels) at our cache
    directory, unless ``TORCHINDUCTOR_CACHE_DIR`` names another one than torch's default, and turn
    them on; call before the first compile of the process. Returns the directory used."""
    import torch._functorch.config
    import torch._inductor.config
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    # torch writes its default into the variable the first time it asks: that is not a choice.
    if not chosen or os.path.abspath(chosen) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir("inductor"))
    torch._inductor.config.fx_graph_cache = True
    torch._functorch.config.enable_autograd_cache = True
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
