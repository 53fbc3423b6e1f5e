"""Sensitivity: how much the model's loss grows when each unit is quantized."""

from .fisher import FORMULA, PREDICTOR, measure_errors

__all__ = ["FORMULA", "PREDICTOR", "measure_errors"]
