"""``torch.ops.bitalloc.quant_linear``: the quantized linear as one opaque op.

Registered with ``torch.library.custom_op`` and a fake (meta) implementation, so ``torch.compile``
traces through a model without graph breaks and without looking inside Triton. On CUDA it runs
the Triton kernels (``dispatch``); on CPU the fp32 torch reference. Triton is imported only when
a CUDA tensor arrives: a CPU-only install never needs it, and a CUDA call without it fails with
the import error instead of silently running the slow reference.
"""

from __future__ import annotations

import torch

from . import reference
from .layout import KernelWeight


def quant_linear_impl(x: torch.Tensor, qweight: torch.Tensor, scale_zero: torch.Tensor, bits: int,
                      group_size: int, in_features: int) -> torch.Tensor:
    """``x @ W.T`` for ``x [..., in_features]``; the output has ``x``'s dtype."""
    kw = KernelWeight(qweight, scale_zero, bits, group_size, in_features, qweight.shape[0])
    if not x.is_cuda:
        return reference.kernel_linear(x, kw)
    from . import dispatch  # CUDA needs Triton: an ImportError here is the loud failure we want

    x2 = x.reshape(-1, in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape[0], kw.out_features, dtype=x.dtype, device=x.device)
    return dispatch.matmul(x2, kw, out).view(*x.shape[:-1], kw.out_features)


@torch.library.custom_op("bitalloc::quant_linear", mutates_args=())
def quant_linear(x: torch.Tensor, qweight: torch.Tensor, scale_zero: torch.Tensor, bits: int,
                 group_size: int, in_features: int) -> torch.Tensor:
    return quant_linear_impl(x, qweight, scale_zero, bits, group_size, in_features)


@quant_linear.register_fake
def _(x: torch.Tensor, qweight: torch.Tensor, scale_zero: torch.Tensor, bits: int,
      group_size: int, in_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))
