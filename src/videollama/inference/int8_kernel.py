"""Our int8 weight-only linear for the CPU: a small kernel, built at first use for this host as
a torch operator (``torch.ops.videollama.int8_linear``).

``y[m, n] = scale[n] * sum_k x[m, k] * w[n, k]``: float32 activations, int8 weights [N, K] (one
scale per output row), float32 accumulation. Each weight is read once per block of up to four
activation rows and widened in registers (AVX2: 8 at a time, ``vpmovsxbd`` + ``vcvtdq2ps``;
AVX-512: 16), so a decode step streams a quarter of the float32 bytes; blocks of output rows are
shared among ``torch.get_num_threads()`` threads (ATen's ``parallel_for``, torch's own pool).
Built with the host's C and C++ compilers for :func:`~videollama.inference.host.isa` (``-mavx2 -mfma``,
``-mavx512f``, or portable C) against the installed torch's headers, from the source below only
(nothing a user sends), into ``cache_dir("kernels")`` under a name that hashes the source, the
flags, the compiler and the torch version; the build writes a temporary file and renames it, so
processes starting together never load half a library. After loading, the operator is checked
against a float64 product on awkward shapes (tails in K, N and M) before it is used.

It is an operator of torch's dispatcher (C++, with a fake implementation registered here for
``torch.compile``) rather than a Python function around a C call: a decode step calls it some
60 times, and the Python around a call (argument checks, ``data_ptr``, ``ctypes``, and in a
compiled step the Python custom-op layer) cost more than the product itself at the ``small``
preset's shapes (bench/results/int8_op.md). Inside ``torch.compile`` it is one opaque call.

Without a C and a C++ compiler or torch's headers (or when the build or the check fails)
:func:`kernel_status` says why and :func:`available` is False:
:mod:`videollama.inference.quantize` then picks among the other implementations.
"""

from __future__ import annotations

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

/* y [M, N] = (x [M, K] @ w [N, K]^T) * s [N], for the blocks of 8 output rows b0 .. b1-1. */
void vl_int8_blocks(const float* x, const int8_t* w, const float* s, float* y,
                           long M, long N, long K, long b0, long b1) {
  for (long b = b0; b < b1; b++) {
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

# The operator around the kernel (C++, against torch's headers): checks, the output tensor, threads
# from torch's own pool. The kernel itself is compiled as C, apart: compiled as C++ in one file
# with the operator, its loops ran slower (bench/results/int8_op.md).
OP_SOURCE = r"""
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

extern "C" void vl_int8_blocks(const float* x, const int8_t* w, const float* s, float* y,
                               long M, long N, long K, long b0, long b1);

static at::Tensor int8_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kChar && scale.scalar_type() == at::kFloat,
              "videollama::int8_linear: x float32, weight int8, scale float32; got ", x.scalar_type(), ", ",
              weight.scalar_type(), ", ", scale.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 2 && scale.dim() == 1, "videollama::int8_linear: x [..., K], "
              "weight [N, K], scale [N]");
  const int64_t K = x.size(-1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K && scale.size(0) == N, "videollama::int8_linear: x [..., ", K, "] with weight ",
              weight.sizes(), " and scale ", scale.sizes());
  at::Tensor xc = x.contiguous(), wc = weight.contiguous(), sc = scale.contiguous();
  const int64_t M = K == 0 ? 0 : xc.numel() / K;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  at::Tensor y = at::empty(shape, x.options());
  if (M == 0 || N == 0) return y;
  if (K == 0) return y.zero_();
  const float* xp = xc.const_data_ptr<float>();
  const int8_t* wp = wc.const_data_ptr<int8_t>();
  const float* sp = sc.const_data_ptr<float>();
  float* yp = y.mutable_data_ptr<float>();
  const int64_t blocks = (N + 7) / 8;
  // About 64k multiply-adds per task: a decode step's small products run on the calling thread.
  const int64_t grain = std::max<int64_t>(1, 65536 / (8 * K * M));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    vl_int8_blocks(xp, wp, sp, yp, M, N, K, b0, b1);
  });
  return y;
}

TORCH_LIBRARY_FRAGMENT(videollama, m) {
  m.def("int8_linear(Tensor x, Tensor weight, Tensor scale) -> Tensor");
}
TORCH_LIBRARY_IMPL(videollama, CPU, m) {
  m.impl("int8_linear", &int8_linear_cpu);
}
"""

FLAGS = {"avx512": ["-mavx512f", "-DVL_AVX512"], "avx2": ["-mavx2", "-mfma", "-DVL_AVX2"], "generic": []}
COMPILERS = (("cc", "c++"), ("gcc", "g++"), ("clang", "clang++"))  # (C, C++) pairs, first found
_STATE: dict[str, object] = {}  # "ok": True once loaded and checked, or "why": why the kernel is not there


def _compiler() -> tuple[str, str] | None:
    """The first (C, C++) compiler pair on PATH."""
    for names in COMPILERS:
        paths = tuple(map(shutil.which, names))
        if all(paths):
            return paths
    return None


def _compiler_id(cc: str) -> str:
    out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
    return (out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else cc


def _torch_flags() -> list[str]:
    """Include and link flags for the installed torch (its headers and libraries ship in the wheel)."""
    root = Path(torch.__file__).parent
    include, lib = root / "include", root / "lib"
    if not (include / "torch" / "library.h").is_file():
        raise RuntimeError(f"torch's C++ headers are not installed under {include}")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [f"-I{include}", f"-I{include / 'torch' / 'csrc' / 'api' / 'include'}",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-L{lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib}"]


def build(target: str) -> Path:
    """The operator library for ``target`` (one of host.ISAS), compiled into our cache directory if
    it is not there yet. RuntimeError when no C and C++ compiler is found or the build fails."""
    pair = _compiler()
    if pair is None:
        raise RuntimeError(f"no C compiler with its C++ compiler on PATH (looked for "
                           f"{', '.join('/'.join(p) for p in COMPILERS)})")
    cc, cxx = pair
    c_flags = ["-O3", "-fPIC", *FLAGS[target]]
    cxx_flags = ["-O3", "-fPIC", "-shared", "-std=c++20", "-w", *_torch_flags()]
    ident = [SOURCE, OP_SOURCE, *c_flags, *cxx_flags, _compiler_id(cc), _compiler_id(cxx), torch.__version__]
    digest = hashlib.sha256("\n".join(ident).encode()).hexdigest()[:16]
    lib = cache_dir("kernels") / f"int8_linear_{target}_{digest}.so"
    if lib.is_file() and lib.stat().st_uid == os.getuid():
        return lib
    with tempfile.TemporaryDirectory(dir=lib.parent, prefix=".build-") as tmp:
        kernel, op, out = Path(tmp) / "int8_kernel.c", Path(tmp) / "int8_op.cpp", Path(tmp) / lib.name
        kernel.write_text(SOURCE)
        op.write_text(OP_SOURCE)
        for cmd in ([cc, *c_flags, "-c", str(kernel), "-o", str(kernel.with_suffix(".o"))],
                    [cxx, str(op), str(kernel.with_suffix(".o")), "-o", str(out), *cxx_flags]):
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            if done.returncode != 0:
                errors = [ln for ln in done.stderr.strip().splitlines() if "error" in ln] or [f"exit {done.returncode}"]
                raise RuntimeError(f"{Path(cmd[0]).name} could not build the {target} int8 kernel: {errors[0]}")
        os.replace(out, lib)
    return lib


def _register_fake() -> None:
    @torch.library.register_fake("videollama::int8_linear")
    def _(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return x.new_empty(*x.shape[:-1], weight.shape[0])


def _self_check() -> str | None:
    """None if the operator gives the float64 product on shapes with tails in every dimension."""
    g = torch.Generator().manual_seed(0)
    for m, n, k in [(1, 13, 70), (3, 17, 40), (6, 9, 33), (9, 24, 128)]:
        x = torch.randn(m, k, generator=g)
        w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
        s = torch.rand(n, generator=g)
        y = torch.ops.videollama.int8_linear(x, w, s)
        want = (x.double() @ w.double().T) * s.double()
        if not torch.allclose(y.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max())):
            return f"the built kernel gave wrong results at M={m} N={n} K={k}"
    return None


def _load() -> bool:
    """Build (or find) the library and load it once per process; True when the operator works."""
    if "ok" not in _STATE and "why" not in _STATE:
        target = isa()
        try:
            path = build(target)
            if not hasattr(torch.ops.videollama, "int8_linear"):  # a process loads one library
                torch.ops.load_library(str(path))
                _register_fake()
            why = _self_check()
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            why = f"{type(e).__name__}: {e}"
        if why:
            _STATE["why"] = why
        else:
            _STATE["ok"], _STATE["isa"] = True, target
    return "ok" in _STATE


def available() -> bool:
    """Whether our kernel runs on this host (building it on the first call)."""
    return _load()


def kernel_status() -> str:
    """``"<isa> kernel"`` when available, else why not."""
    return f"{_STATE['isa']} kernel" if available() else f"unavailable: {_STATE['why']}"


def int8_linear_eager(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] float32 (CPU) -> [..., N]; weight int8 [N, K] and scale float32 [N]: the operator,
    or the float product of the dequantized weight where the kernel is not available or x is not
    float32 on the CPU."""
    if x.dtype != torch.float32 or x.device.type != "cpu" or not available():
        return torch.nn.functional.linear(x, weight.to(x.dtype)) * scale.to(x.dtype)
    return torch.ops.videollama.int8_linear(x, weight, scale)
