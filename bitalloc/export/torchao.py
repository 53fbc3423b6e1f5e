"""torchao ``FqnToConfig``-style JSON: exact module FQNs to weight-only int configs (``None`` = skip)."""

from __future__ import annotations

from typing import Any

from ..plan import Plan
from .rules import locked_linear_modules, quantized_entries

TOOL = "torchao FqnToConfig"
_DTYPES = {b: f"torch.int{b}" if b < 8 else "torch.int8" for b in range(1, 9)}


def export(plan: Plan) -> dict[str, Any]:
    out: dict[str, Any] = {"_default": None}
    for e in quantized_entries(plan, TOOL):
        out[e.module] = {"_type": "IntxWeightOnlyConfig", "weight_dtype": _DTYPES[e.bits],
                         "granularity": {"_type": "PerGroup", "group_size": e.group_size},
                         "mapping_type": "SYMMETRIC" if e.symmetric else "ASYMMETRIC"}
    for module in locked_linear_modules(plan):
        out[module] = None
    return out
