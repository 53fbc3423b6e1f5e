"""Pick the kernel for a batch size; the crossovers are measured (``benchmarks/kernels.py``).

* ``M <= GEMV_MAX_M``: the CUDA-core GEMV (weights streamed once; tensor cores would idle).
* ``M <= GEMM_MAX_M``: the fused ``tl.dot`` GEMM (weights decoded once per M tile).
* above: dequantize once into a scratch fp16/bf16 weight and let cuBLAS multiply; the only path
  that allocates beyond the output (the scratch weight), taken where the matmul dominates.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import torch

from . import triton_gemm, triton_gemv
from .launch import Launch, aligned
from .layout import COLS, TILE, KernelWeight, plane_format

GEMV_MAX_M = triton_gemv.MAX_M
GEMM_MAX_M = 64  # measured: at M = 128 dequantize + cuBLAS 95 us vs the GEMM 365 us (8192 x 8192, 4-bit)


@lru_cache(maxsize=None)
def _constants(bits: int, group_size: int) -> dict[str, int]:
    pf = plane_format(bits)
    return {"BITS": bits, "GROUP": group_size, "VWORDS": pf.vwords, "CPW": pf.codes_per_word,
            "SPACING": pf.spacing, "CODE_BITS": pf.code_bits, "COLS": COLS, "TILE": TILE}


def constants(kw: KernelWeight) -> dict[str, int]:
    """Compile-time constants of a layer's width and group, computed once per (bits, group)."""
    return _constants(kw.bits, kw.group_size)


def path(m: int) -> str:
    """The kernel a batch of ``m`` rows runs on: ``gemv``, ``gemm`` or ``dequant`` (+ cuBLAS)."""
    if m <= GEMV_MAX_M:
        return "gemv"
    return "gemm" if m <= GEMM_MAX_M else "dequant"


# (kernel, batch, dtype, device, strides, shape, width, group) -> the bound kernel and its args
_LAUNCHES: dict[tuple, tuple[Launch, Callable[..., tuple]]] = {}


def matmul(x: torch.Tensor, kw: KernelWeight, out: torch.Tensor) -> torch.Tensor:
    """``out = x @ W.T`` for a 2-D ``x`` (unit stride along K) on the kernel the batch calls for.

    GEMV and GEMM calls after the first of a signature skip triton's launch path (``launch.py``).
    """
    m = x.shape[0]
    kind = path(m)
    if kind == "dequant":
        return torch.matmul(x, triton_gemm.dequantize(kw, x.dtype, constants(kw)).t(), out=out)
    key = (kind, m, x.dtype, x.device, x.stride(0), out.stride(0), kw.qweight.stride(0),
           kw.scale_zero.stride(0), kw.out_features, kw.in_features, kw.bits, kw.group_size)
    tensors = (x, out, kw.qweight, kw.scale_zero)
    hit = _LAUNCHES.get(key)
    if hit is not None and aligned(*tensors):
        fast, args = hit
        fast(*args(x, kw, out))
        return out
    run, args = ((triton_gemv.gemv, triton_gemv.args) if kind == "gemv"
                 else (triton_gemm.gemm, triton_gemm.args))
    bound = run(x, kw, out, constants(kw))
    if bound is not None and aligned(*tensors):
        _LAUNCHES[key] = (bound, args)
    return out
