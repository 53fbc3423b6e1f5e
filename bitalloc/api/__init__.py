"""The public functions: ``allocate`` a budget, sweep a ``frontier``, ``compute_scores``, ``evaluate`` a plan,
``import_config`` from another quantizer, ``quantize`` a model by a plan into a pack-quantized checkpoint and
``load_quantized`` / ``evaluate_quantized`` it. The CLI is a thin layer over them.

Settings travel as two frozen configs (:class:`CalibrationConfig`, :class:`SolveConfig`) whose
defaults are the only ones in the code. Importing this package does not import torch: the steps that
run the model import it when they run.
"""

from ..allocator import Constraints
from ..allocator.frontier import FrontierPoint, budgets
from ..sensitivity.table import ErrorTable
from .allocate import allocate, build_plan, compute_scores, frontier, writes_outputs
from .config import CalibrationConfig, SolveConfig
from .context import ModelContext

load_scores = ErrorTable.load  # a saved error table, validated

# name -> module of this package; these import torch, so they load on first use and
# ``import bitalloc.api`` stays light (the re-solve path never imports torch)
_LAZY = {"evaluate": "evaluation", "import_config": "importer", "quantize": "quantization", "load_quantized": "quantization",
         "evaluate_quantized": "quantization", "is_quantized_checkpoint": "quantization",
         "RoundingConfig": "quantization", "write_imatrix": "imatrix"}

__all__ = ["CalibrationConfig", "Constraints", "FrontierPoint", "ModelContext", "SolveConfig", "allocate", "budgets",
           "build_plan", "compute_scores", "frontier", "load_scores", "writes_outputs", *sorted(_LAZY)]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'bitalloc.api' has no attribute {name!r}")
