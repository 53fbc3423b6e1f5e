"""Quantizers that apply a plan's choices to weights."""

from .rtn import Runs, fake_quantize, rtn_dequantize, rtn_error

__all__ = ["Runs", "fake_quantize", "rtn_dequantize", "rtn_error"]
