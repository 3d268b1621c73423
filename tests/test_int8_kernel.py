"""Our int8 kernel (inference/int8_kernel.py), the measured choices (inference/tuning.py) and the
cache directory they live in (inference/host.py)."""

from __future__ import annotations

import copy
import os
import subprocess

import pytest
import torch
import torch.nn.functional as F

from videollama.config import VideoLlamaConfig
from videollama.inference import host, int8_kernel, tuning
from videollama.inference.generate import generate
from videollama.inference.int8_impls import product
from videollama.inference.quantize import Int8Linear, quantize_model
from videollama.model import VideoLlama

pytest.importorskip("torchao")


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty cache directory, and nothing of the kernel or the measurements in memory."""
    monkeypatch.setenv("VIDEOLLAMA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(int8_kernel, "_STATE", {})
    tuning.forget()
    yield tmp_path / "cache"
    tuning.forget()


@pytest.fixture
def kernel():
    """Our kernel, built and loaded (its operator registered); the test is skipped on a host that
    cannot build it (no C/C++ compiler or torch headers), where int8 uses the other products."""
    if not int8_kernel.available():
        pytest.skip(f"our kernel: {int8_kernel.kernel_status()}")


def int8_problem(m, n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    s = torch.rand(n, generator=g) / 50
    return x, w, s


@pytest.mark.parametrize("m,n,k", [(1, 384, 384), (1, 13, 70), (3, 17, 40), (5, 24, 129), (8, 1024, 384),
                                   (17, 9, 256), (2, 8192, 64)])
def test_kernel_equals_linear_on_dequantized_weights(m, n, k, kernel):
    x, w, s = int8_problem(m, n, k)
    want = F.linear(x, w.float() * s[:, None])  # the float product of the dequantized weight
    got = int8_kernel.int8_linear_eager(x, w, s)
    assert got.shape == want.shape and got.dtype == torch.float32
    exact = (x.double() @ w.double().T) * s.double()
    # Within float32 rounding of the exact product, as close as F.linear itself is.
    tol = 1e-5 * float(exact.abs().max())
    assert float((got.double() - exact).abs().max()) <= tol
    torch.testing.assert_close(got, want, rtol=1e-5, atol=tol)
    # Leading dimensions are kept; a non-contiguous input is read correctly.
    x3 = torch.randn(k, m, 2).permute(2, 1, 0)  # [2, m, k], not contiguous
    torch.testing.assert_close(int8_kernel.int8_linear_eager(x3, w, s), F.linear(x3, w.float() * s[:, None]),
                               rtol=1e-5, atol=1e-5 * float(exact.abs().max()) * 10)


def test_kernel_uses_the_threads_torch_is_given(kernel):
    x, w, s = int8_problem(4, 1000, 96)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = int8_kernel.int8_linear_eager(x, w, s)
        torch.set_num_threads(1)
        one = int8_kernel.int8_linear_eager(x, w, s)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)  # each output is summed by one thread in the same order


def test_custom_op_registration_and_fake(kernel):
    x, w, s = int8_problem(3, 16, 40)
    torch.library.opcheck(torch.ops.videollama.int8_linear.default, (x, w, s),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    with torch._subclasses.fake_tensor.FakeTensorMode():
        fake = torch.ops.videollama.int8_linear(torch.empty(2, 5, 40), torch.empty(16, 40, dtype=torch.int8),
                                                torch.empty(16))
    assert fake.shape == (2, 5, 16)


def test_custom_op_inside_torch_compile_is_one_opaque_call(kernel):
    from torch._dynamo.testing import CompileCounterWithBackend

    x, w, s = int8_problem(2, 24, 64)
    counter = CompileCounterWithBackend("aot_eager")

    def f(x):
        return torch.relu(torch.ops.videollama.int8_linear(x, w, s)) * 2

    got = torch.compile(f, backend=counter, fullgraph=True)(x)
    torch.testing.assert_close(got, f(x))
    ops = [n.target for n in counter.graphs[0].graph.nodes if n.op == "call_function"]
    # One call of the op in dynamo's graph: nothing of its body is traced.
    assert ops.count(torch.ops.videollama.int8_linear) == 1 and len(ops) == 3, ops


@pytest.mark.slow
def test_custom_op_under_inductor(kernel):
    x, w, s = int8_problem(3, 40, 72)
    f = torch.compile(lambda x: torch.ops.videollama.int8_linear(x, w, s) + 1, dynamic=False)
    torch.testing.assert_close(f(x), F.linear(x, w.float() * s[:, None]) + 1, rtol=1e-5, atol=1e-4)


def test_second_load_reuses_the_library_and_the_measurements(fresh_cache, monkeypatch):
    if int8_kernel._compiler() is None:
        pytest.skip("no C compiler here")
    builds = []
    run = subprocess.run

    def counting_run(cmd, *a, **kw):
        if "-shared" in cmd:
            builds.append(cmd)
        return run(cmd, *a, **kw)

    monkeypatch.setattr(subprocess, "run", counting_run)
    assert int8_kernel.available(), int8_kernel.kernel_status()
    libs = list((fresh_cache / "kernels").glob("*.so"))
    assert len(builds) == 1 and len(libs) == 1
    assert oct((fresh_cache / "kernels").stat().st_mode & 0o777) == oct(0o700)
    x, w, s = int8_problem(1, 64, 96)
    first = tuning.choose_int8(w, s, torch.float32, ["kernel", "dequant"])
    assert first["decode"] in ("kernel", "dequant") and set(first["ms"]["1"]) == {"kernel", "dequant"}
    assert first["cpu"] == host.cpu_model() and first["isa"] == host.isa()

    # A new process: nothing in memory. The library is loaded, not built; nothing is timed.
    monkeypatch.setattr(int8_kernel, "_STATE", {})
    tuning.forget()
    monkeypatch.setattr(tuning, "time_calls", lambda *a, **k: pytest.fail("measured again"))
    mtime = libs[0].stat().st_mtime_ns
    assert int8_kernel.available()
    assert len(builds) == 1 and libs[0].stat().st_mtime_ns == mtime
    assert tuning.choose_int8(w, s, torch.float32, ["kernel", "dequant"]) == first


def test_without_a_compiler_the_other_implementations_are_used(fresh_cache, monkeypatch):
    monkeypatch.setattr(int8_kernel, "_compiler", lambda: None)
    assert not int8_kernel.available()
    assert "no C compiler" in int8_kernel.kernel_status()
    torch.manual_seed(0)
    model = VideoLlama(VideoLlamaConfig.from_name("tiny")).eval()
    q = quantize_model(copy.deepcopy(model), "int8")
    impls = {m.impl for m in q.modules() if isinstance(m, Int8Linear)}
    assert impls and "kernel" not in impls
    with pytest.raises(ValueError, match="no C compiler"):
        quantize_model(copy.deepcopy(model), "int8", kernel="kernel")
    x, w, s = int8_problem(2, 8, 16)
    torch.testing.assert_close(int8_kernel.int8_linear_eager(x, w, s), F.linear(x, w.float() * s[:, None]))


def test_cache_dir_must_be_private(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    monkeypatch.setenv("VIDEOLLAMA_CACHE", str(shared))
    with pytest.raises(PermissionError, match="not a private directory"):
        host.cache_dir("kernels")
    monkeypatch.setenv("VIDEOLLAMA_CACHE", str(tmp_path / "mine"))
    assert host.cache_dir("kernels").is_dir()


def test_isa_can_be_lowered_not_raised(monkeypatch):
    best = host.isa()
    monkeypatch.setenv(host.ISA_ENV, "generic")
    assert host.isa() == "generic"
    monkeypatch.setenv(host.ISA_ENV, "avx512")
    assert host.isa() == best  # never above what the CPU has


def test_every_implementation_is_the_same_product():
    x, w, s = int8_problem(3, 32, 48)
    want = F.linear(x, w.float() * s[:, None])
    for impl in ("kernel", "aten", "dequant", "fused"):
        if impl == "kernel" and not int8_kernel.available():
            continue
        torch.testing.assert_close(product(impl, x, w, s), want, rtol=1e-5, atol=1e-5, msg=impl)


def test_int8_greedy_answers_equal_fp32():
    """Greedy answers of the int8 model (each shape's measured implementation) are the fp32
    model's, text-only and about a video, over several prompts, but at an exact near-tie."""
    torch.manual_seed(0)
    model = VideoLlama(VideoLlamaConfig.from_name("tiny")).eval()
    with torch.no_grad():  # open the cross-attention and sharpen the logits (as test_quantize does)
        for block in model.decoder.cross_attn_layers:
            block.attn_gate.fill_(1.0)
            block.ff_gate.fill_(1.0)
        model.lm_head.weight.mul_(20.0)
    q = quantize_model(copy.deepcopy(model), "int8")
    diverged = []
    for seed in range(6):
        x = torch.randint(3, 1024, (1, 5 + seed), generator=torch.Generator().manual_seed(seed))
        video = torch.randn(1, 16, 3, 64, 64, generator=torch.Generator().manual_seed(100 + seed)) if seed % 2 else None
        got, want = generate(q, x, video, max_new_tokens=12), generate(model, x, video, max_new_tokens=12)
        if torch.equal(got, want):
            continue
        # A random model has exact near-ties a trained one rarely has: the answers may part only
        # where fp32's two best logits are within 0.2% of each other (int8's error flips those).
        k = int((got != want).nonzero()[0, 1])
        with torch.no_grad():
            top = model(torch.cat([x, want[:, :k]], 1), video).logits[0, -1].topk(2).values
        assert float(top[0] - top[1]) <= 2e-3 * float(top[0].abs()), (seed, k, top.tolist())
        diverged.append(seed)
    assert len(diverged) <= 1, diverged


def test_store_writes_are_whole_and_merge(tmp_path):
    a, b = host.Store(tmp_path / "s.json"), host.Store(tmp_path / "s.json")
    a.put("x", {"choice": "kernel"})
    b.put("y", {"choice": "eager"})
    assert a.get("x") == {"choice": "kernel"} and a.get("y") == {"choice": "eager"}
    (tmp_path / "s.json").write_text("not json")
    assert a.get("x") is None  # a damaged file is measured again, never trusted
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary left behind
