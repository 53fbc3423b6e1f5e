"""Unpacked codes of one quantized linear: what every layout is converted from and to."""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUPS = (32, 64, 128)


@dataclass(frozen=True)
class Codes:
    """Unpacked integer form of one quantized linear: the common currency of all layouts.

    ``codes`` uint8 ``[out, in]`` and ``zeros`` uint8 ``[out, groups]`` hold unsigned codes;
    ``scales`` ``[out, groups]`` is fp16 or bf16 (the activation dtype the layer serves).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int

    def __post_init__(self) -> None:
        check_format(self.bits, self.group_size)
        out, inp = self.codes.shape
        groups = -(-inp // self.group_size)
        if tuple(self.scales.shape) != (out, groups) or tuple(self.zeros.shape) != (out, groups):
            raise ValueError(f"scales/zeros must be [{out}, {groups}] for a [{out}, {inp}] weight "
                             f"in groups of {self.group_size}, got {tuple(self.scales.shape)} "
                             f"and {tuple(self.zeros.shape)}")
        if self.scales.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"scales must be float16 or bfloat16, got {self.scales.dtype}")
        top = 1 << self.bits
        for name, t in (("codes", self.codes), ("zeros", self.zeros)):
            if t.dtype != torch.uint8 or (t.numel() and int(t.max()) >= top):
                raise ValueError(f"{name} must be uint8 in 0..{top - 1}")

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))


def check_format(bits: int, group_size: int) -> None:
    """Refuse widths and groups the kernels are not built for, naming what is."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if group_size not in SUPPORTED_GROUPS:
        raise ValueError(f"group_size must be one of {SUPPORTED_GROUPS}, got {group_size}")
