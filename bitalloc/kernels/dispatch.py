"""Pick the kernel for a batch size; the crossovers are measured (``benchmarks/kernels.py``).

* ``M <= GEMV_MAX_M``: the CUDA-core GEMV (weights streamed once; tensor cores would idle).
* ``M <= GEMM_MAX_M``: the fused ``tl.dot`` GEMM (weights decoded once per M tile).
* above: dequantize once into a scratch fp16/bf16 weight and let cuBLAS multiply; the only path
  that allocates beyond the output (the scratch weight), taken where the matmul dominates.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from . import triton_gemm, triton_gemv
from .layout import COLS, TILE, KernelWeight, plane_format

GEMV_MAX_M = triton_gemv.MAX_M
GEMM_MAX_M = 128


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


def matmul(x: torch.Tensor, kw: KernelWeight, out: torch.Tensor) -> torch.Tensor:
    """``out = x @ W.T`` for a 2-D ``x`` (unit stride along K) on the kernel the batch calls for."""
    consts = constants(kw)
    kind = path(x.shape[0])
    if kind == "gemv":
        return triton_gemv.gemv(x, kw, out, consts)
    if kind == "gemm":
        return triton_gemm.gemm(x, kw, out, consts)
    return torch.matmul(x, triton_gemm.dequantize(kw, x.dtype, consts).t(), out=out)
