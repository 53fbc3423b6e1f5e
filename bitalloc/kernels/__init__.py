"""Packed low-bit linear layers: compressed-tensors I/O, the kernels' layout, Triton kernels, and the torch
module of MoE experts stored as a shared basis plus quantized factors (``lowrank_experts``).

Self-contained: nothing here imports the rest of bitalloc. Imports are lazy so that the torch
reference and ``QuantLinear`` on CPU need neither Triton nor compressed-tensors, and a GPU box
with only torch and triton runs the kernels and benchmarks without compressed-tensors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Codes": "codes", "pack": "packing", "unpack": "packing", "KernelWeight": "layout",
    "repack": "layout", "unrepack": "layout", "QuantLinear": "quant_linear",
    "FactorSlab": "lowrank_experts", "SharedBasisFactors": "lowrank_experts", "LowRankExperts": "lowrank_experts",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .codes import Codes  # noqa: F401
    from .layout import KernelWeight, repack, unrepack  # noqa: F401
    from .lowrank_experts import FactorSlab, LowRankExperts, SharedBasisFactors  # noqa: F401
    from .packing import pack, unpack  # noqa: F401
    from .quant_linear import QuantLinear  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'bitalloc.kernels' has no attribute {name!r}")
