"""Weight-only quantization (inference/quantize.py): torchao's int8 values, our kernel, the model's logits."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import token_ids
from videollama.config import VideoLlamaConfig
from videollama.inference.generate import generate
from videollama.inference.quantize import Int8Linear, quantize_model, weight_bytes
from videollama.model import VideoLlama

pytest.importorskip("torchao")


@pytest.fixture(scope="module")
def model() -> VideoLlama:
    torch.manual_seed(0)
    m = VideoLlama(VideoLlamaConfig.from_name("tiny")).eval()
    with torch.no_grad():  # open the cross-attention and sharpen the logits (as test_generate does)
        for block in m.decoder.cross_attn_layers:
            block.attn_gate.fill_(1.0)
            block.ff_gate.fill_(1.0)
        m.lm_head.weight.mul_(20.0)
    return m


@pytest.fixture(scope="module")
def quantized(model) -> VideoLlama:
    return quantize_model(copy.deepcopy(model), "int8")


def ids(b=2, t=9, seed=0):
    return token_ids(b, t, seed)


def test_int8_values_and_which_modules(model, quantized):
    int8 = {n: m for n, m in quantized.named_modules() if isinstance(m, Int8Linear)}
    fp32 = dict(model.named_modules())
    # Every decoder linear run per token (self-attention, MLP, cross-attention) and the lm_head;
    # nothing else: not the vision side, not the time code's projection (once per video).
    expected = {f"decoder.{n}" for n, m in model.decoder.named_modules()
                if isinstance(m, nn.Linear) and not n.startswith("media_time.")} | {"lm_head"}
    assert "decoder.media_time.proj" not in int8 and "decoder.media_time.proj" in fp32
    assert set(int8) == expected
    assert not any(isinstance(m, Int8Linear) for m in quantized.vision.modules())
    for name, q in int8.items():
        w = fp32[name].weight
        # Symmetric per-row int8: a row's step is max|w| / 127.5 (torchao spreads the 255 steps of
        # [-128, 127] over [-max, max]); each weight within half a step of its int8 value.
        amax = w.abs().amax(1)
        assert ((q.scale >= amax / 128) & (q.scale <= amax / 127)).all(), name
        step = q.scale
        err = (q.weight.float() * q.scale[:, None] - w).abs()
        assert (err <= step[:, None] / 2 * 1.01 + 1e-9).all(), name


def test_int8_logits_equal_the_dequantized_model_and_are_close_to_fp32(model, quantized):
    # The reference for the kernel: the fp32 model with every quantized weight replaced by its
    # dequantized value computes the same function up to float rounding.
    deq = copy.deepcopy(model)
    with torch.no_grad():
        for name, q in quantized.named_modules():
            if isinstance(q, Int8Linear):
                lin = deq.get_submodule(name)
                lin.weight = nn.Parameter(q.weight.float() * q.scale[:, None])
    x = ids()
    with torch.no_grad():
        ref, got, exact = deq(x).logits, quantized(x).logits, model(x).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    # Against the fp32 model: each weight moves by at most 1/254 of its row's largest, so a
    # logit moves by about that fraction of its size (errors of independent weights add in
    # quadrature, not all the same way); 3% of the largest logit is a loose bound of it.
    assert (got - exact).abs().max() <= 0.03 * exact.abs().max()
    a = generate(model, x, max_new_tokens=20)
    b = generate(quantized, x, max_new_tokens=20)
    assert (a == b).float().mean() >= 0.8, (a, b)


def test_int8_weight_memory_is_about_a_quarter(model, quantized):
    names = [n for n, m in quantized.named_modules() if isinstance(m, Int8Linear)]
    before = sum(weight_bytes(model.get_submodule(n)) for n in names)
    after = sum(weight_bytes(quantized.get_submodule(n)) for n in names)
    # 1 byte per weight instead of 4, plus one float32 scale per output row.
    assert 0.25 < after / before < 0.27, (before, after)
    assert weight_bytes(quantized) < weight_bytes(model)


def test_torchao_kernel_is_the_same_function(model, quantized):
    ao = quantize_model(copy.deepcopy(model), "int8", kernel="torchao")
    assert hasattr(ao.lm_head.weight, "qdata")
    x = ids(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(ao(x).logits, quantized(x).logits, rtol=1e-5, atol=1e-5)


def test_modes_and_errors(model, quantized):
    m = copy.deepcopy(model)
    assert quantize_model(m, "none") is m
    with pytest.raises(ValueError, match="quantize mode must be one of none, int8, int4"):
        quantize_model(m, "int3")
    with pytest.raises(ValueError, match="quantized already"):
        quantize_model(quantized, "int8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="int4 weight-only quantization needs a CUDA GPU"):
            quantize_model(m, "int4")


@pytest.mark.gpu
def test_int4_on_cuda_bfloat16(model):
    m = copy.deepcopy(model).to("cuda", torch.bfloat16)
    q = quantize_model(copy.deepcopy(m), "int4")
    x = ids().cuda()
    with torch.no_grad():
        a, b = m(x).logits.float(), q(x).logits.float()
    assert (a - b).abs().max() <= 0.1 * a.abs().max()


@pytest.mark.slow
def test_compiled_fused_int8_step_equals_eager(quantized):
    from videollama.inference.generate import COMPILED

    x = ids(b=1, t=5, seed=4)
    eager = generate(quantized, x, max_new_tokens=12)
    compiled = generate(quantized, x, max_new_tokens=12, compile=True)
    assert "failed" not in COMPILED, COMPILED.get("failed")
    assert torch.equal(compiled, eager)


def test_reduction_chunks():
    from videollama.inference.int8_impls import reduction_chunks

    assert [reduction_chunks(k) for k in (64, 2048, 4096, 4097, 5632, 8192, 11008)] == [1, 1, 1, 17, 2, 2, 4]


@pytest.mark.slow
def test_compiled_int8_linear_long_rows_and_norm_input_equal_the_float_product():
    """The compiled Int8Linear: rows longer than 4096 (summed in chunks) and an RMSNorm input
    (kept out of the loop by videollama::written) give x @ (int8 * scale).T, as a float matmul."""
    from videollama.inference.quantize import Int8Linear

    torch.manual_seed(0)
    for n, k in [(24, 5632), (40, 256)]:
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        scale = torch.rand(n) / 100
        lin = Int8Linear(w, scale)
        norm_w = torch.rand(k)

        def f(x, lin=lin, norm_w=norm_w):
            return lin(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm_w)

        x = torch.randn(3, 1, k)
        want = torch.nn.functional.linear(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm_w,
                                          w.float() * scale[:, None])
        with torch.inference_mode():
            got = torch.compile(f, dynamic=False)(x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
