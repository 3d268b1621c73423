"""The int8 weight-only product ``(x @ weight.T) * scale`` (weight int8 [N, K], one float scale per
output row), in each of the ways :class:`~videollama.inference.quantize.Int8Linear` can compute it:

* ``kernel``: our kernel, the operator ``videollama::int8_linear``
  (:mod:`videollama.inference.int8_kernel`), eagerly and inside ``torch.compile``;
* ``aten``: ``torch.ops.aten._weight_int8pack_mm``;
* ``fused``: inside a compiled step (up to FUSED_MAX_ROWS rows) a reduction inductor fuses into one
  loop over the int8 weight (:func:`_fused`); otherwise ``dequant``;
* ``dequant``: ``x @ weight.to(float).T * scale`` (torchao's formula: writes the float weight).

Which is fastest depends on the CPU and on the code generated for it:
:mod:`videollama.inference.tuning` measures them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from videollama.model.layers import written

IMPLS = ("kernel", "aten", "fused", "dequant")
# Rows (batch x tokens) up to which a linear counts as decoding: one impl for decode steps, one
# for prompts (whose products are compute-bound, where a float matmul can win).
DECODE_MAX_ROWS = 16
FUSED_MAX_ROWS = DECODE_MAX_ROWS


def product(impl: str, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(x [..., K] @ weight [N, K].T) * scale [N] by implementation ``impl`` (one of IMPLS)."""
    if impl == "kernel":  # chosen only where int8_kernel.available() and x is float32 on the CPU
        return torch.ops.videollama.int8_linear(x, weight, scale)
    if impl == "aten":
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), weight, scale.to(x.dtype))  # [M, N]
        return y.view(*x.shape[:-1], weight.shape[0])
    if impl == "fused" and torch.compiler.is_compiling() and x.numel() // x.shape[-1] <= FUSED_MAX_ROWS:
        return _fused(x, weight, scale)
    return F.linear(x, weight.to(x.dtype)) * scale.to(x.dtype)


def _fused(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The product as a reduction inductor fuses: [..., 1, K] * [N, K] summed over K, one loop over
    the int8 weight converting in registers; nothing [..., N, K] is ever written. A reduction
    longer than 4096 makes inductor's C++ backend switch to cascade summation, several times
    slower: such a K is summed as g chunks of K / g. (The int8 weight is viewed before the
    conversion: a view of the converted weight makes inductor write the whole float weight out.)"""
    n, k = weight.shape
    x = written(x)  # computed once, not once per output row
    g = reduction_chunks(k)
    if g == 1:
        y = (x.unsqueeze(-2) * weight.to(x.dtype)).sum(-1)
    else:
        xs = x.reshape(*x.shape[:-1], 1, g, k // g)  # [..., 1, g, K/g]
        y = (xs * weight.view(n, g, k // g).to(x.dtype)).sum(-1).sum(-1)
    return y * scale.to(x.dtype)


def reduction_chunks(k: int, longest: int = 4096) -> int:
    """The fewest equal chunks g that split a reduction of length k into chunks <= longest (1 if
    none divides evenly: one cascade-summed loop, slower but exact)."""
    return next((g for g in range(1, k // 2 + 1) if k % g == 0 and k // g <= longest), 1)


def candidates(device: torch.device, dtype: torch.dtype) -> list[str]:
    """The implementations that can run eagerly for inputs of ``dtype`` on ``device``."""
    out = []
    if device.type == "cpu" and dtype == torch.float32:
        from videollama.inference import int8_kernel

        if int8_kernel.available():
            out.append("kernel")
    try:  # ATen has it for some devices and dtypes only
        product("aten", torch.ones(1, 8, device=device, dtype=dtype), torch.ones(8, 8, device=device,
                dtype=torch.int8), torch.ones(8, device=device, dtype=dtype))
        out.append("aten")
    except (RuntimeError, NotImplementedError):
        pass
    return [*out, "dequant"]
