"""Budgets: parsing user strings and the exact bit accounting behind "bpp".

Definition used everywhere in bitalloc: a quantized tensor of shape [rows, cols] at
``bits`` with group size ``g`` stores ``rows * cols * bits`` code bits plus one fp16
scale and one fp16 zero per group of ``g`` input columns, i.e.
``rows * ceil(cols / g) * 32`` overhead bits. Its bits per parameter (bpp) are the
total divided by ``rows * cols``; for ``cols % g == 0`` that is ``bits + 32 / g``
(2.25, 3.25, 4.25, 8.25 at g = 128). A budget in bpp is the total over all counted
(unlocked) tensors divided by their parameter count; a byte budget is the total
size of those tensors once quantized.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from .errors import BudgetError

SCALE_BITS = 16  # one fp16 scale per group
ZERO_BITS = 16  # one fp16 zero point per group (asymmetric); bits for symmetric candidates too,
# kept so that every candidate is priced by the same storage layout.

_BYTE_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_BUDGET_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def tensor_bits(rows, cols, bits: int, group_size: int):
    """Exact storage of quantized [rows, cols] tensors, in bits (codes + scales + zeros).

    The one storage formula of bitalloc: plans, problems, importers and reports all price through it.
    ``rows`` and ``cols`` may be ints or integer numpy arrays (many tensors at once).
    """
    groups = rows * -(-cols // group_size)
    return rows * cols * bits + groups * (SCALE_BITS + ZERO_BITS)


def nominal_bpp(bits: int, group_size: int) -> float:
    """Bits per parameter of a candidate for tensors whose width is a multiple of the group."""
    return tensor_bits(1, group_size, bits, group_size) / group_size


@dataclass(frozen=True)
class Budget:
    """A parsed budget: either bits per counted parameter or bytes of quantized weights."""

    value: float
    unit: Literal["bpp", "bytes"]
    text: str

    def total_bits(self, counted_params: int) -> int:
        """The budget as an integer number of bits for ``counted_params`` parameters."""
        if self.unit == "bpp":
            return math.floor(self.value * counted_params + 1e-9)
        return math.floor(self.value * 8)


def parse_budget(text: str | float) -> Budget:
    """Parse ``2.5bpp``, ``2.5`` (bpp) or a byte size such as ``900MB`` or ``3GiB``.

    Decimal units (kB, MB, GB) are powers of 1000 and binary units (KiB, MiB, GiB) powers
    of 1024, as on disk listings; a bare ``B`` means bytes.
    """
    if isinstance(text, (int, float)):
        text = str(text)
    m = _BUDGET_RE.match(text)
    if not m:
        raise BudgetError(f"cannot parse budget {text!r}: use e.g. '2.5bpp', '2.5', '900MB' or '3GiB'")
    number, unit = float(m.group(1)), m.group(2).lower()
    if unit in ("", "bpp", "bpw"):
        if not 0 < number <= 32:
            raise BudgetError(f"budget {text!r} is not a plausible bits-per-parameter value (0 < bpp <= 32)")
        return Budget(number, "bpp", text)
    if unit not in _BYTE_UNITS:
        raise BudgetError(f"unknown budget unit {m.group(2)!r} in {text!r}: use bpp, B, kB, MB, GB, KiB, MiB or GiB")
    if number <= 0:
        raise BudgetError(f"budget {text!r} must be positive")
    return Budget(number * _BYTE_UNITS[unit], "bytes", text)
