"""bitalloc: mixed-precision bit allocation for LLM weight quantization, solved exactly under a budget."""

__version__ = "0.1.0"

from .api import allocate, build_plan, compute_scores, evaluate  # noqa: E402
from .errors import BitallocError  # noqa: E402
from .plan import Candidate, Plan  # noqa: E402
from .scores import ErrorTable  # noqa: E402

__all__ = ["BitallocError", "Candidate", "ErrorTable", "Plan", "__version__", "allocate", "build_plan",
           "compute_scores", "evaluate"]
