"""AutoRound ``layer_config``: every quantized module by its full name, plus locked linears at 16 bit."""

from __future__ import annotations

from typing import Any

from ..errors import PlanError
from ..plan import Candidate, Plan
from .rules import group_of, locked_linear_modules, quantized_entries

TOOL = "AutoRound layer_config"


def export(plan: Plan) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for e in quantized_entries(plan, TOOL):
        out[e.module] = {"bits": e.bits, "group_size": e.group_size, "sym": e.symmetric, "data_type": "int"}
    for module in locked_linear_modules(plan):
        out[module] = {"bits": 16, "data_type": "float"}
    return out


def resolve(config: dict[str, Any], module: str, in_features: int) -> Candidate | None:
    """The choice of ``module`` in an AutoRound layer_config (bits >= 16: left unquantized; group -1: per channel)."""
    spec = config.get(module)
    if spec is None:
        raise PlanError(f"AutoRound layer_config has no entry for {module}")
    try:
        bits = int(spec["bits"])
        return None if bits >= 16 else Candidate(bits=bits, group_size=group_of(spec.get("group_size", 128), in_features),
                                                 symmetric=bool(spec.get("sym", True)))
    except (KeyError, TypeError, ValueError):
        raise PlanError(f"AutoRound layer_config entry for {module} is not {{bits, group_size, sym}}") from None
