"""Weight-only quantization for inference: :func:`quantize_model` (modes none / int8 / int4).

int8: torchao's ``quantize_(model, Int8WeightOnlyConfig())`` quantizes every ``nn.Linear`` of the
decoder (self-attention, MLPs, the gated cross-attention blocks) and the lm_head: symmetric,
one scale per output row. The vision encoder and resampler stay in float32 (they run once per
video, not once per token, and are a small part of the per-token weight traffic); so do the
embedding (a lookup: one row per token) and the norms and gates.

Each quantized linear becomes an :class:`Int8Linear` (torchao's int8 values and scales) whose
product is computed by one of the implementations of :mod:`videollama.inference.int8_impls` (our
C kernel, ATen's int8 weight-pack matmul, inductor's fused reduction, dequantize-then-matmul).
Which one is fastest depends on the CPU's instruction set and on the code generated for it, so it
is measured, not assumed (bench/results/int8.md has the figures on the machines we had):
``kernel="auto"`` (the default) times the eager ones on each weight shape at one and at eight
rows (decoding) and at 64 rows (a prompt), and keeps the fastest for each; the compiled decode
step later offers the fused reduction too (:func:`videollama.inference.tuning.prepare_compiled`).
The choices are kept per host and shape in our cache directory (:mod:`videollama.inference.host`),
so a second load measures nothing. ``kernel="torchao"`` keeps torchao's tensor subclass.

int4: torchao 0.18 has no int4 weight-only kernel for a float32 CPU model (its formats need
the mslk package, an XPU/NPU device, or CUDA bfloat16 tinygemm); on such a platform the
mode is refused with a one-line ValueError saying so. On CUDA with a bfloat16 model the
tinygemm format (``tile_packed_to_4d``, groups of 128) is used.
"""

from __future__ import annotations

import torch
from torch import nn

from videollama.inference.int8_impls import DECODE_MAX_ROWS, IMPLS, candidates, product

MODES = ("none", "int8", "int4")
KERNELS = ("auto", *IMPLS, "torchao")


class Int8Linear(nn.Module):
    """y = (x @ weight.T) * scale with weight int8 [N, K] and scale float [N] (no bias).

    ``impl`` computes rows <= DECODE_MAX_ROWS eagerly, ``compiled_impl`` (default: impl) inside
    torch.compile, ``prefill_impl`` (default: impl) more rows; each one of IMPLS."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, *, impl: str = "fused",
                 compiled_impl: str | None = None, prefill_impl: str | None = None) -> None:
        super().__init__()
        if weight.dtype != torch.int8 or weight.dim() != 2 or scale.numel() != weight.shape[0]:
            raise ValueError(f"Int8Linear needs an int8 [N, K] weight and N scales, got {weight.dtype} "
                             f"{tuple(weight.shape)} and {scale.numel()} scales")
        for name in (impl, compiled_impl, prefill_impl):
            if name is not None and name not in IMPLS:
                raise ValueError(f"Int8Linear impl must be one of {', '.join(IMPLS)}, not {name!r}")
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.impl, self.compiled_impl, self.prefill_impl = impl, compiled_impl or impl, prefill_impl or impl
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("scale", scale.reshape(-1).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., K] -> [..., N] in x's dtype."""
        rows = x.numel() // x.shape[-1]
        if rows > DECODE_MAX_ROWS:
            impl = self.prefill_impl
        else:
            impl = self.compiled_impl if torch.compiler.is_compiling() else self.impl
        return product(impl, x, self.weight, self.scale)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only, "
                f"impl={self.impl}, compiled={self.compiled_impl}, prefill={self.prefill_impl}")


def _targets(model: nn.Module) -> set[str]:
    """Qualified names of the linears to quantize: the decoder's and the lm_head. Not the time
    code's projection (decoder.media_time): it runs once per video, not per token, holds 2P x D
    weights, and int8 would coarsen the absolute times it writes into the latents."""
    names = {f"decoder.{n}" for n, m in model.decoder.named_modules()
             if isinstance(m, nn.Linear) and not n.startswith("media_time.")}
    if isinstance(getattr(model, "lm_head", None), nn.Linear):
        names.add("lm_head")
    return names


def _int4_unavailable(model: nn.Module) -> str | None:
    """Why int4 cannot run here, or None when it can (CUDA and a bfloat16 model)."""
    p = next(model.decoder.parameters())
    if p.device.type != "cuda":
        return (f"int4 weight-only quantization needs a CUDA GPU: torchao's int4 kernels have no path for "
                f"a {p.device.type} model (plain int4 needs the mslk package, plain_int32 is XPU/NPU only, "
                "tile_packed_to_4d is CUDA bfloat16 tinygemm); use int8 here")
    if p.dtype != torch.bfloat16:
        return f"int4 weight-only quantization needs a bfloat16 model (torchao tinygemm), this one is {p.dtype}"
    return None


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str, *, kernel: str = "auto") -> nn.Module:
    """Quantize ``model`` (a VideoLlama) in place for inference and return it.

    mode: "none" (unchanged), "int8" (weight-only, per output row) or "int4" (CUDA bfloat16 only,
    else ValueError). kernel, for int8: "auto" (each weight shape's fastest implementation on this
    host, measured once and kept), one of IMPLS for every linear (ValueError where it cannot run),
    or "torchao" (torchao's own Int8Tensor weights). A tied lm_head is untied: it gets its int8
    copy and the embedding keeps its float32 table.
    """
    if mode not in MODES:
        raise ValueError(f"quantize mode must be one of {', '.join(MODES)}, not {mode!r}")
    if kernel not in KERNELS:
        raise ValueError(f"quantize kernel must be one of {', '.join(KERNELS)}, not {kernel!r}")
    if mode == "none":
        return model
    if any(isinstance(m, Int8Linear) for m in model.modules()) or any(
            hasattr(p, "qdata") for p in model.parameters()):
        raise ValueError("this model is quantized already")
    if mode == "int4":
        why = _int4_unavailable(model)
        if why:
            raise ValueError(why)
    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except ImportError as e:
        raise ValueError(f"quantize {mode} needs torchao (pip install 'videollama[quant]'): {e}") from e

    model.eval()
    targets = _targets(model)
    if getattr(model, "lm_head", None) is not None and model.lm_head.weight is model.decoder.embed_tokens.weight:
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)
    if mode == "int4":
        config = Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d",
                                      set_inductor_config=False)
    else:
        config = Int8WeightOnlyConfig(set_inductor_config=False)
    quantize_(model, config, filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn in targets)
    if mode == "int8" and kernel != "torchao":
        _to_int8_linears(model, targets, kernel)
    return model


def _to_int8_linears(model: nn.Module, targets: set[str], kernel: str) -> None:
    """Replace each of torchao's int8 linears named in ``targets`` by an :class:`Int8Linear`
    computing with ``kernel`` (or, "auto", what :func:`~videollama.inference.tuning.choose_int8`
    measured fastest for its shape)."""
    from videollama.inference import tuning

    if kernel == "kernel":
        from videollama.inference import int8_kernel

        if not int8_kernel.available():
            raise ValueError(f"quantize kernel 'kernel': our int8 kernel {int8_kernel.kernel_status()}")
    for name in sorted(targets):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lin = getattr(parent, child)
        w = lin.weight
        if lin.bias is not None or not hasattr(w, "qdata"):
            raise ValueError(f"{name}: torchao did not give an int8 weight-only tensor ({type(w).__name__})")
        qdata, scale = w.qdata.detach().contiguous(), w.scale.detach().float().reshape(-1).contiguous()
        if kernel == "auto":
            dtype = w.scale.dtype  # the model's compute dtype
            choice = tuning.choose_int8(qdata, scale, dtype, candidates(qdata.device, dtype))
            impls = {"impl": choice["decode"], "prefill_impl": choice["prefill"]}
        else:
            impls = {"impl": kernel}
        setattr(parent, child, Int8Linear(qdata.clone(), scale.clone(), **impls))


def weight_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer (torchao tensors: their int8 data and scales), each
    tensor counted once."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        parts = [getattr(t, a) for a in ("qdata", "scale", "zero_point") if getattr(t, a, None) is not None]
        for p in parts or [t]:
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
    return total
