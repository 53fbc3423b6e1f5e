"""Sensitivity: how much the model's loss grows when each unit is quantized, by four score families.

``collect.measure_errors`` runs one calibration pass and returns an error table holding every
family's predictions (``hessian``, ``hessian_diag``, ``baq``, ``spectral``, ``importance``,
``fisher``, ``gradient``) and their measured-truth calibration ``combined``; docs/sensitivity.md
gives each formula, its cost and how well it ranks units against measured truth.
"""

from ..scores import DEFAULT_SCORE
from .collect import FORMULAS, measure_errors

SCORE_NAMES = tuple(FORMULAS)

__all__ = ["DEFAULT_SCORE", "FORMULAS", "SCORE_NAMES", "measure_errors"]
