"""Weight-only quantization for inference: :func:`quantize_model` (modes none / int8 / int4).

int8: torchao's ``quantize_(model, Int8WeightOnlyConfig())`` quantizes every ``nn.Linear`` of the
decoder (self-attention, MLPs, the gated cross-attention blocks) and the lm_head: symmetric,
one scale per output row. The vision encoder and resampler stay in float32 (they run once per
video, not once per token, and are a small part of the per-token weight traffic); so do the
embedding (a lookup: one row per token) and the norms and gates.

The matrix products: torchao 0.18's weight-only int8 linear computes
``mm(x, int8_weight.t().to(float32)) * scale``, which on a CPU first writes the whole
dequantized float32 weight, then reads it again: at batch 1 it is several times *slower* than
the float32 linear, eager or through ``torch.compile`` (bench/results/quantize.md measures
it). So by default (``kernel="fused"``) each quantized linear becomes an :class:`Int8Linear`
holding torchao's int8 values and scales, whose forward, inside a compiled decode step
(``generate(..., compile=True)``, ``BatchDecoder(compile=True)``), is written as a reduction
that inductor fuses into one loop reading the int8 weight once: a quarter of the float32
bytes. Outside ``torch.compile`` it dequantizes like torchao (correct, not fast).
``kernel="torchao"`` keeps torchao's own tensor subclass, for comparison.

int4: torchao 0.18 has no int4 weight-only kernel for a float32 CPU model (its formats need
the mslk package, an XPU/NPU device, or CUDA bfloat16 tinygemm); on such a platform the
mode is refused with a one-line ValueError saying so. On CUDA with a bfloat16 model the
tinygemm format (``tile_packed_to_4d``, groups of 128) is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("none", "int8", "int4")
KERNELS = ("fused", "torchao")
# Rows (batch x tokens) up to which a compiled Int8Linear uses the fused reduction; above it
# (prefill) the dequantize-then-matmul form, whose matmul is compute-bound anyway.
FUSED_MAX_ROWS = 16


class Int8Linear(nn.Module):
    """y = (x @ weight.T) * scale with weight int8 [N, K] and scale float [N] (no bias)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        if weight.dtype != torch.int8 or weight.dim() != 2 or scale.numel() != weight.shape[0]:
            raise ValueError(f"Int8Linear needs an int8 [N, K] weight and N scales, got {weight.dtype} "
                             f"{tuple(weight.shape)} and {scale.numel()} scales")
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("scale", scale.reshape(-1).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., K] -> [..., N] in x's dtype."""
        if torch.compiler.is_compiling() and x.numel() // x.shape[-1] <= FUSED_MAX_ROWS:
            # [..., 1, K] * [N, K] summed over K: inductor emits one loop over the int8 weight,
            # converting in registers; nothing [..., N, K] is ever written. A reduction longer
            # than 4096 makes inductor's C++ backend switch to cascade summation, several times
            # slower: such a K is summed as g chunks of K / g.
            # (The int8 weight is viewed before the conversion: a view of the converted weight
            # makes inductor write the whole float32 weight out.)
            x = _written(x)
            g = _chunks(self.in_features)
            if g == 1:
                y = (x.unsqueeze(-2) * self.weight.to(x.dtype)).sum(-1)
            else:
                k = self.in_features // g
                xs = x.reshape(*x.shape[:-1], 1, g, k)
                y = (xs * self.weight.view(self.out_features, g, k).to(x.dtype)).sum(-1).sum(-1)
        else:
            y = F.linear(x, self.weight.to(x.dtype))
        return y * self.scale.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


@torch.library.custom_op("videollama::written", mutates_args=())
def _written(x: torch.Tensor) -> torch.Tensor:
    """A copy of x that inductor cannot inline: an Int8Linear's input is computed once, not
    recomputed inside its reduction loop once per output row. Without it, the RMSNorm that feeds
    the q/k/v, gate/up and lm_head projections (a per-element rsqrt and divide) is inlined into
    them, and recomputed for every output row: several times slower."""
    return x.clone()


@_written.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _chunks(k: int, longest: int = 4096) -> int:
    """The fewest equal chunks g that split a reduction of length k into chunks <= longest (1 if
    none divides evenly: one cascade-summed loop, slower but exact)."""
    return next((g for g in range(1, k // 2 + 1) if k % g == 0 and k // g <= longest), 1)


def _targets(model: nn.Module) -> set[str]:
    """Qualified names of the linears to quantize: the decoder's and the lm_head."""
    names = {f"decoder.{n}" for n, m in model.decoder.named_modules() if isinstance(m, nn.Linear)}
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
def quantize_model(model: nn.Module, mode: str, *, kernel: str = "fused") -> nn.Module:
    """Quantize ``model`` (a VideoLlama) in place for inference and return it.

    mode: "none" (unchanged), "int8" (weight-only, per output row) or "int4" (CUDA bfloat16 only,
    else ValueError). kernel, for int8: "fused" (:class:`Int8Linear`, fast inside a compiled decode
    step) or "torchao" (torchao's own Int8Tensor weights). A tied lm_head is untied: it gets its
    int8 copy and the embedding keeps its float32 table.
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
    if mode == "int8" and kernel == "fused":
        for name in sorted(targets):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            lin = getattr(parent, child)
            w = lin.weight
            if lin.bias is not None or not hasattr(w, "qdata"):
                raise ValueError(f"{name}: torchao did not give an int8 weight-only tensor ({type(w).__name__})")
            setattr(parent, child, Int8Linear(w.qdata.detach().clone(), w.scale.detach().float().clone()))
    return model


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
