"""Quantizers that apply a plan's choices to weights."""

from .rtn import rtn_dequantize, rtn_error

__all__ = ["rtn_dequantize", "rtn_error"]
