"""The public functions: ``allocate`` a budget, sweep a ``frontier``, ``compute_scores``, ``evaluate`` a plan,
``import_config`` from another quantizer. The CLI is a thin layer over them.

Settings travel as two frozen configs (:class:`CalibrationConfig`, :class:`SolveConfig`) whose
defaults are the only ones in the code. Importing this package does not import torch: the steps that
run the model import it when they run.
"""

from ..allocator import Constraints
from ..allocator.frontier import FrontierPoint, budgets
from ..sensitivity.table import ErrorTable
from .allocate import allocate, build_plan, compute_scores, frontier
from .config import CalibrationConfig, SolveConfig
from .context import ModelContext

load_scores = ErrorTable.load  # a saved error table, validated

__all__ = ["CalibrationConfig", "Constraints", "FrontierPoint", "ModelContext", "SolveConfig", "allocate", "budgets",
           "build_plan", "compute_scores", "evaluate", "frontier", "import_config", "load_scores"]


def __getattr__(name: str):
    """``evaluate`` (torch) and ``import_config`` load on first use, keeping ``import bitalloc.api`` light."""
    if name == "evaluate":
        from .evaluation import evaluate

        return evaluate
    if name == "import_config":
        from .importer import import_config

        return import_config
    raise AttributeError(f"module 'bitalloc.api' has no attribute {name!r}")
