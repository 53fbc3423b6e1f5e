"""``QuantLinear``: one linear layer at its own width, holding the kernels' layout as buffers."""

from __future__ import annotations

import torch
from torch import nn

from .codes import Codes, check_format
from .layout import COLS, TILE, KernelWeight, repack
from .ops import quant_linear, quant_linear_impl


class QuantLinear(nn.Module):
    """``y = x @ W.T (+ bias)`` with ``W`` stored at ``bits`` per weight in groups of ``group_size``.

    Buffers: ``qweight`` (int32, ``layout.py``'s tiled planes), ``scale_zero`` (fp16/bf16 pairs),
    ``bias`` (optional). Eager calls go straight to the kernel launcher (one output allocation,
    no other work a CUDA graph would hide); under ``torch.compile`` the same computation is the
    opaque custom op ``torch.ops.bitalloc.quant_linear``. CUDA graphs capture it as is, once each
    shape has been run (autotuned) before capture.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 bias: bool = False, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        check_format(bits, group_size)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        tiles = -(-in_features // TILE)
        self.register_buffer("qweight", torch.zeros(out_features, tiles * bits * COLS,
                                                    dtype=torch.int32, device=device))
        self.register_buffer("scale_zero", torch.zeros(out_features, tiles * TILE // group_size, 2,
                                                       dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias
                             else None)

    @classmethod
    def from_codes(cls, codes: Codes, bias: torch.Tensor | None = None) -> QuantLinear:
        """Build from unpacked codes (repacked into the kernel layout here, once)."""
        out, inp = codes.shape
        layer = cls(inp, out, codes.bits, codes.group_size, bias is not None, codes.scales.dtype,
                    codes.codes.device)
        kw = repack(codes)
        layer.qweight.copy_(kw.qweight)
        layer.scale_zero.copy_(kw.scale_zero)
        if bias is not None:
            layer.bias.copy_(bias)
        return layer

    @classmethod
    def from_packed(cls, tensors: dict[str, torch.Tensor], bits: int, group_size: int,
                    bias: torch.Tensor | None = None) -> QuantLinear:
        """Build from one module's compressed-tensors ``pack-quantized`` tensors."""
        from .packing import unpack  # compressed-tensors (pydantic, transformers): only when reading one

        return cls.from_codes(unpack(tensors, bits, group_size), bias)

    def kernel_weight(self) -> KernelWeight:
        return KernelWeight(self.qweight, self.scale_zero, self.bits, self.group_size,
                            self.in_features, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        op = quant_linear if torch.compiler.is_compiling() else quant_linear_impl
        y = op(x, self.qweight, self.scale_zero, self.bits, self.group_size, self.in_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, group_size={self.group_size}, bias={self.bias is not None}")
