"""Rounding methods that turn a plan's choices into integer codes, and the layer-by-layer driver.

Every method returns :class:`~.base.QuantizedWeight` (codes, fp16 scales, integer zeros):
``rtn_quantize`` (round to nearest), ``gptq`` (error compensation through H^-1), GSQ and
DiscQuant (learned rounding, through :func:`~.apply.quantize_layers`). ``fake_quantize`` and
``rtn_dequantize`` keep serving the RTN evaluation path.
"""

from .base import QuantizedWeight, SegmentedWeight
from .config import RoundingConfig
from .gptq import gptq
from .rtn import Runs, fake_quantize, rtn_dequantize, rtn_error, rtn_quantize

__all__ = ["QuantizedWeight", "RoundingConfig", "Runs", "SegmentedWeight", "fake_quantize", "gptq", "rtn_dequantize",
           "rtn_error", "rtn_quantize"]
