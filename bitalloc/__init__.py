"""bitalloc: mixed-precision bit allocation for LLM weight quantization, solved exactly under a budget.

The public API is imported lazily, so ``import bitalloc.plan`` (pure data) or the sensitivity
pass does not pull in the solvers, and the solvers never pull in torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "allocate": "api", "build_plan": "api", "compute_scores": "api", "evaluate": "api", "frontier": "api",
    "import_config": "api", "CalibrationConfig": "api", "SolveConfig": "api", "quantize": "api",
    "load_quantized": "api", "RoundingConfig": "api",
    "BitallocError": "errors", "Candidate": "plan", "Plan": "plan", "ErrorTable": "sensitivity.table",
}
__all__ = ["__version__", *sorted(_EXPORTS)]

if TYPE_CHECKING:
    from .api import (CalibrationConfig, RoundingConfig, SolveConfig, allocate, build_plan,  # noqa: F401
                      compute_scores, evaluate, frontier, import_config, load_quantized, quantize)
    from .errors import BitallocError  # noqa: F401
    from .plan import Candidate, Plan  # noqa: F401
    from .sensitivity.table import ErrorTable  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'bitalloc' has no attribute {name!r}")
