"""Our int8 weight-only linear for the CPU: a small C kernel, built at first use for this host.

``y[m, n] = scale[n] * sum_k x[m, k] * w[n, k]``: float32 activations, int8 weights [N, K] (one
scale per output row), float32 accumulation. Each weight is read once per block of up to four
activation rows and widened in registers (AVX2: 8 at a time, ``vpmovsxbd`` + ``vcvtdq2ps``;
AVX-512: 16), so a decode step streams a quarter of the float32 bytes; output rows are shared
among ``torch.get_num_threads()`` OpenMP threads. Built with the host's C compiler for
:func:`~videollama.inference.host.isa` (``-mavx2 -mfma``, ``-mavx512f``, or portable C), from the
source below only (nothing a user sends), into ``cache_dir("kernels")`` under a name that hashes
the source, the flags and the compiler; the build writes a temporary file and renames it, so
processes starting together never load half a library. After loading, the kernel is checked
against a float64 product on awkward shapes (tails in K, N and M) before it is used.

Without a C compiler (or when the build or the check fails) :func:`kernel_status` says why and
:func:`available` is False: :mod:`videollama.inference.quantize` then picks among the other
implementations. ``torch.ops.videollama.int8_linear`` is the kernel as a torch custom op, with a
fake implementation, so it runs eagerly and inside ``torch.compile`` as one opaque call.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from videollama.inference.host import cache_dir, isa

SOURCE = r"""
#include <stdint.h>
#if defined(VL_AVX512)
#include <immintrin.h>
#define VL 16
typedef __m512 vf;
static inline vf ld_w(const int8_t* p){ return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p))); }
static inline vf ld_x(const float* p){ return _mm512_loadu_ps(p); }
static inline vf fma_(vf a, vf b, vf c){ return _mm512_fmadd_ps(a, b, c); }
static inline vf zero(void){ return _mm512_setzero_ps(); }
static inline float hsum(vf v){ return _mm512_reduce_add_ps(v); }
#elif defined(VL_AVX2)
#include <immintrin.h>
#define VL 8
typedef __m256 vf;
static inline vf ld_w(const int8_t* p){ return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p))); }
static inline vf ld_x(const float* p){ return _mm256_loadu_ps(p); }
static inline vf fma_(vf a, vf b, vf c){ return _mm256_fmadd_ps(a, b, c); }
static inline vf zero(void){ return _mm256_setzero_ps(); }
static inline float hsum(vf v){
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_hadd_ps(lo, lo); lo = _mm_hadd_ps(lo, lo); return _mm_cvtss_f32(lo); }
#else
#define VL 1
typedef float vf;
static inline vf ld_w(const int8_t* p){ return (float)p[0]; }
static inline vf ld_x(const float* p){ return p[0]; }
static inline vf fma_(vf a, vf b, vf c){ return a * b + c; }
static inline vf zero(void){ return 0.0f; }
static inline float hsum(vf v){ return v; }
#endif

/* One tile: MB activation rows x NB weight rows, MB*NB vector accumulators. */
#define TILE(MB, NB) \
static void tile_##MB##_##NB(const float* x, const int8_t* w, const float* s, float* y, \
                             long N, long K, long m0, long n0) { \
  vf acc[MB][NB]; \
  for (int i = 0; i < MB; i++) for (int j = 0; j < NB; j++) acc[i][j] = zero(); \
  long k = 0; \
  for (; k + VL <= K; k += VL) \
    for (int j = 0; j < NB; j++) { \
      vf wf = ld_w(w + (n0 + j) * K + k); \
      for (int i = 0; i < MB; i++) acc[i][j] = fma_(ld_x(x + (m0 + i) * K + k), wf, acc[i][j]); \
    } \
  for (int i = 0; i < MB; i++) for (int j = 0; j < NB; j++) { \
    float t = hsum(acc[i][j]); \
    for (long kk = k; kk < K; kk++) t += x[(m0 + i) * K + kk] * (float)w[(n0 + j) * K + kk]; \
    y[(m0 + i) * N + n0 + j] = t * s[n0 + j]; \
  } \
}
TILE(4, 2) TILE(4, 1) TILE(2, 4) TILE(2, 1) TILE(1, 8) TILE(1, 1)

/* y [M, N] = (x [M, K] @ w [N, K]^T) * s [N]; blocks of 8 output rows are shared among threads. */
void vl_int8_linear(const float* x, const int8_t* w, const float* s, float* y,
                    long M, long N, long K, int nthreads) {
  long blocks = (N + 7) / 8;
  #pragma omp parallel for schedule(static) num_threads(nthreads) if(nthreads > 1)
  for (long b = 0; b < blocks; b++) {
    long n0 = b * 8, n1 = n0 + 8 < N ? n0 + 8 : N, m = 0, n;
    for (; m + 4 <= M; m += 4) {
      for (n = n0; n + 2 <= n1; n += 2) tile_4_2(x, w, s, y, N, K, m, n);
      for (; n < n1; n++) tile_4_1(x, w, s, y, N, K, m, n);
    }
    for (; m + 2 <= M; m += 2) {
      for (n = n0; n + 4 <= n1; n += 4) tile_2_4(x, w, s, y, N, K, m, n);
      for (; n < n1; n++) tile_2_1(x, w, s, y, N, K, m, n);
    }
    for (; m < M; m++) {
      n = n0;
      if (n + 8 <= n1) { tile_1_8(x, w, s, y, N, K, m, n); n += 8; }
      for (; n < n1; n++) tile_1_1(x, w, s, y, N, K, m, n);
    }
  }
}
"""

FLAGS = {"avx512": ["-mavx512f", "-DVL_AVX512"], "avx2": ["-mavx2", "-mfma", "-DVL_AVX2"], "generic": []}
COMPILERS = ("cc", "gcc", "clang")
_STATE: dict[str, object] = {}  # "fn": the loaded ctypes function, or "why": why there is none


def _compiler() -> str | None:
    return next((path for path in map(shutil.which, COMPILERS) if path), None)


def _compiler_id(cc: str) -> str:
    out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
    return (out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else cc


def build(target: str) -> Path:
    """The kernel library for ``target`` (one of host.ISAS), compiled into our cache directory if
    it is not there yet. RuntimeError when no C compiler is found or the build fails."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError(f"no C compiler on PATH (looked for {', '.join(COMPILERS)})")
    flags = ["-O3", "-fPIC", "-shared", *FLAGS[target]]
    digest = hashlib.sha256("\n".join([SOURCE, *flags, _compiler_id(cc)]).encode()).hexdigest()[:16]
    lib = cache_dir("kernels") / f"int8_linear_{target}_{digest}.so"
    if lib.is_file() and lib.stat().st_uid == os.getuid():
        return lib
    with tempfile.TemporaryDirectory(dir=lib.parent, prefix=".build-") as tmp:
        src, out = Path(tmp) / "int8_linear.c", Path(tmp) / lib.name
        src.write_text(SOURCE)
        errors = ""
        for omp in (["-fopenmp"], []):  # a compiler without OpenMP builds the one-thread kernel
            done = subprocess.run([cc, *flags, *omp, str(src), "-o", str(out)], capture_output=True, text=True,
                                  timeout=300)
            if done.returncode == 0:
                os.replace(out, lib)
                return lib
            errors = done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        raise RuntimeError(f"{cc} could not build the {target} int8 kernel: {errors[0]}")


def _load(target: str):
    fn = ctypes.CDLL(str(build(target))).vl_int8_linear
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3 + [ctypes.c_int]
    return fn


def _self_check(fn) -> str | None:
    """None if the kernel gives the float64 product on shapes with tails in every dimension."""
    g = torch.Generator().manual_seed(0)
    for m, n, k in [(1, 13, 70), (3, 17, 40), (6, 9, 33), (9, 24, 128)]:
        x = torch.randn(m, k, generator=g)
        w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
        s = torch.rand(n, generator=g)
        y = torch.empty(m, n)
        fn(x.data_ptr(), w.data_ptr(), s.data_ptr(), y.data_ptr(), m, n, k, 1)
        want = (x.double() @ w.double().T) * s.double()
        if not torch.allclose(y.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max())):
            return f"the built kernel gave wrong results at M={m} N={n} K={k}"
    return None


def _kernel():
    """The loaded kernel function, or None (``_STATE["why"]`` says why); built once per process."""
    if "fn" not in _STATE and "why" not in _STATE:
        target = isa()
        try:
            fn = _load(target)
            why = _self_check(fn)
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            fn, why = None, f"{type(e).__name__}: {e}"
        if why:
            _STATE["why"] = why
        else:
            _STATE["fn"], _STATE["isa"] = fn, target
    return _STATE.get("fn")


def available() -> bool:
    """Whether our kernel runs on this host (building it on the first call)."""
    return _kernel() is not None


def kernel_status() -> str:
    """``"<isa> kernel"`` when available, else why not."""
    return f"{_STATE['isa']} kernel" if available() else f"unavailable: {_STATE['why']}"


def int8_linear_eager(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] float32 (CPU) -> [..., N]; weight int8 [N, K] and scale float32 [N], contiguous."""
    fn = _kernel()
    if fn is None or x.dtype != torch.float32 or x.device.type != "cpu":
        return torch.nn.functional.linear(x, weight.to(x.dtype)) * scale.to(x.dtype)
    k, n = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, k).contiguous()  # [M, K]
    y = torch.empty(x2.shape[0], n, dtype=x.dtype)  # [M, N]
    fn(x2.data_ptr(), weight.data_ptr(), scale.data_ptr(), y.data_ptr(), x2.shape[0], n, k,
       torch.get_num_threads())
    return y.view(*x.shape[:-1], n)


@torch.library.custom_op("videollama::int8_linear", mutates_args=())
def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """:func:`int8_linear_eager` as an op torch.compile calls without looking inside."""
    return int8_linear_eager(x, weight, scale)


@int8_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])
