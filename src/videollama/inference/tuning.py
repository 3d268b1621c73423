"""Quick measurements that choose between implementations on this host, kept per host.

What is fastest depends on the CPU (its instruction set, caches, memory) and on the code torch
generates for it, so three choices are measured where they are made rather than assumed:

* :func:`choose_int8`: for one int8 weight shape, which implementation of the product
  (:data:`videollama.inference.quantize.IMPLS`) is fastest eagerly, at decode rows and at prompt rows;
* :func:`prepare_compiled`: whether inductor's fused reduction beats that choice inside a
  compiled step (it needs a compile per shape, so it runs only when a compiled step is wanted);
* :func:`choose_step`: whether the compiled decode step beats the eager one at a given batch and
  cache shape (compiling loses at small batches on some CPUs).

Each result is a small JSON record in :class:`~videollama.inference.host.Store` (this host's file
in our cache directory), keyed by the shape measured, with the times behind it; a later process
on the same host reads it and measures nothing. Times are CPU seconds of this thread (when torch
runs one thread) or wall seconds, medians over interleaved rounds, so that another process's
load at one moment does not favour one candidate.
"""

from __future__ import annotations

import statistics
import time
import weakref
from collections.abc import Callable

import torch

from videollama.inference.host import Store, aten_isa, cpu_model, isa
from videollama.inference.int8_impls import product

ROWS = {"decode": (1, 8), "prefill": (64,)}
# A compiled step must beat the eager one by this fraction to be kept: a tie stays eager (no
# compile to pay for, nothing that can fail later).
STEP_MARGIN = 0.03
# When inductor's fused reduction is this many times slower than the eager choice on the largest
# weight, the smaller ones are not compiled to check (each compile costs seconds).
FUSED_GIVE_UP = 1.5
_MEMO: dict[str, dict] = {}
_PREPARED: weakref.WeakSet = weakref.WeakSet()


def _clock() -> Callable[[], float]:
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def time_calls(fns: dict[str, Callable[[], object]], *, rounds: int = 5, min_s: float = 0.003,
               max_calls: int = 64) -> dict[str, float]:
    """Median milliseconds per call of each function, in interleaved rounds of several calls.
    A candidate over 4x the fastest in the first round is timed no further (its figure stays)."""
    clock = _clock()
    for fn in fns.values():
        fn()  # warm: page-in, first-call allocations
    first = {}
    for name, fn in fns.items():
        t = clock()
        fn()
        first[name] = max(clock() - t, 1e-7)
    best = min(first.values())
    live = [n for n in fns if first[n] <= 4 * best]
    calls = {n: max(1, min(max_calls, int(min_s / first[n]))) for n in live}
    samples: dict[str, list[float]] = {n: [] for n in live}
    for _ in range(rounds):
        for n in live:
            t = clock()
            for _ in range(calls[n]):
                fns[n]()
            samples[n].append((clock() - t) / calls[n])
    return {n: 1e3 * (statistics.median(samples[n]) if n in samples else first[n]) for n in fns}


def _record(**fields) -> dict:
    return {**fields, "cpu": cpu_model(), "isa": isa(), "aten_isa": aten_isa(), "torch": torch.__version__,
            "when": time.strftime("%Y-%m-%d %H:%M:%S")}


def _cached(key: str, valid: Callable[[dict], bool], measure: Callable[[], dict]) -> dict:
    """The record under ``key`` (this process's, else the store's if ``valid``), else a new one."""
    got = _MEMO.get(key)
    if got is None:
        stored = Store().get(key)
        got = stored if stored is not None and valid(stored) else None
        if got is None:
            got = measure()
            Store().put(key, got)
        _MEMO[key] = got
    return got


@torch.inference_mode()
def choose_int8(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, names: list[str]) -> dict:
    """{"decode": impl, "prefill": impl, "ms": {rows: {impl: ms}}} for an int8 weight [N, K]: the
    fastest of ``names`` at ROWS["decode"] (by the product of its times there) and at ROWS["prefill"]."""
    n, k = weight.shape
    key = f"int8/{n}x{k}/{weight.device.type}/{str(dtype).removeprefix('torch.')}/{','.join(names)}"

    def measure() -> dict:
        ms = {}
        for rows in (*ROWS["decode"], *ROWS["prefill"]):
            x = torch.randn(rows, k, dtype=dtype, device=weight.device)
            ms[str(rows)] = time_calls({name: (lambda name=name, x=x: product(name, x, weight, scale))
                                        for name in names})
        pick = {part: min(names, key=lambda nm: _prod(ms[str(r)][nm] for r in rows)) for part, rows in ROWS.items()}
        return _record(**pick, ms=ms)

    return _cached(key, lambda r: r.get("decode") in names and r.get("prefill") in names, measure)


def _prod(values) -> float:
    out = 1.0
    for v in values:
        out *= v
    return out


@torch.inference_mode()
def prepare_compiled(model: torch.nn.Module) -> None:
    """Set each Int8Linear's ``compiled_impl``: inductor's fused reduction where, compiled, it beats
    the linear's eager choice at one row, else that choice (measured once per host and shape)."""
    if model in _PREPARED:
        return
    # Int8Linear's, by what they hold (quantize.py imports this module, not the other way round).
    linears = [m for m in model.modules() if hasattr(m, "compiled_impl") and m.impl != "fused"]
    shapes = sorted({(m.out_features, m.in_features, m.impl) for m in linears}, key=lambda s: -s[0] * s[1])
    decided: dict[tuple, str] = {}
    largest = None
    for n, k, impl in shapes:
        lin = next(m for m in linears if (m.out_features, m.in_features, m.impl) == (n, k, impl))

        def measure(lin=lin, impl=impl, largest=largest) -> dict:
            if largest is not None and ("failed" in largest or largest.get("ratio", 0) > FUSED_GIVE_UP):
                return _record(choice=impl, decided_on=f"{shapes[0][0]}x{shapes[0][1]}")
            return _measure_fused(lin)

        record = _cached(f"int8-compiled/{n}x{k}/{impl}", lambda r, impl=impl: r.get("choice") in (impl, "fused"),
                         measure)
        largest = largest or record
        decided[(n, k, impl)] = record["choice"]
    for m in linears:
        m.compiled_impl = decided[(m.out_features, m.in_features, m.impl)]
    _PREPARED.add(model)


def _measure_fused(lin) -> dict:
    """Inductor's fused reduction, compiled, against ``lin.impl`` eagerly, at one row."""
    from videollama.inference.host import use_compile_cache

    use_compile_cache()
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    x = torch.randn(1, lin.in_features, dtype=lin.scale.dtype, device=lin.weight.device)
    fused = torch.compile(lambda x: product("fused", x, lin.weight, lin.scale), dynamic=False)
    t = time.perf_counter()
    try:
        fused(x)
    except Exception as e:  # noqa: BLE001 - inductor raises many kinds; the eager choice stands
        return _record(choice=lin.impl, failed=f"{type(e).__name__}: {str(e)[:200]}")
    compile_s = time.perf_counter() - t
    ms = time_calls({"fused": lambda: fused(x), lin.impl: lambda: product(lin.impl, x, lin.weight, lin.scale)})
    choice = "fused" if ms["fused"] < ms[lin.impl] else lin.impl
    return _record(choice=choice, ms=ms, ratio=ms["fused"] / ms[lin.impl], compile_s=compile_s)


def choose_step(key: str, eager: Callable[[], object], compiled: Callable[[], object]) -> dict:
    """{"choice": "compiled" | "eager", "ms": {...}, "compile_s": s} for one decode-step shape:
    ``compiled`` is called first (it compiles), then both are timed; kept under ``key``."""
    def measure() -> dict:
        t = time.perf_counter()
        compiled()
        compile_s = time.perf_counter() - t
        ms = time_calls({"eager": eager, "compiled": compiled}, rounds=5, min_s=0.02, max_calls=8)
        choice = "compiled" if ms["compiled"] < ms["eager"] * (1 - STEP_MARGIN) else "eager"
        return _record(choice=choice, ms=ms, compile_s=compile_s, measured=True)

    return _cached(key, lambda r: r.get("choice") in ("compiled", "eager"), measure)


def forget() -> None:
    """Drop this process's memory of the records (the store keeps them)."""
    _MEMO.clear()
    _PREPARED.clear()  # WeakSet.clear
