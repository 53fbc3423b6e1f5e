"""Budgets: parsing user strings and the exact bit accounting behind "bpp".

Definition used everywhere in bitalloc, the bytes that compressed-tensors' ``pack-quantized``
checkpoints (what ``bitalloc quantize`` writes, what vLLM reads) store: a quantized tensor of
shape [rows, cols] at ``bits`` with group size ``g`` stores ``rows * cols * bits`` code bits, one
16-bit scale per group of ``g`` input columns and, for asymmetric candidates, one zero point per
group packed at the code width: ``rows * ceil(cols / g) * (16 + bits)`` overhead bits (symmetric:
``* 16``). Its bits per parameter (bpp) are the total divided by ``rows * cols``; for
``cols % g == 0`` that is ``bits + (16 + bits) / g`` (2.140625, 3.1484375, 4.15625, 8.1875 at
g = 128; symmetric ``bits + 16 / g``). A budget in bpp is the total over all counted (unlocked)
tensors divided by their parameter count; a byte budget is the total size of those tensors once
quantized. (Plans of version 1 priced a 16-bit zero for every group; ``plan.Plan.load`` re-prices them.)

Plans for llama.cpp (layout ``gguf``) are priced in ggml types instead (:data:`GGML_TYPES`): a row of
``cols`` weights is stored in ``cols / block_size`` blocks of ``type_size`` bytes each, scales included,
which is what llama.cpp's size and bits-per-weight figures count.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from .errors import BudgetError

SCALE_BITS = 16  # one fp16/bf16 scale per group
BASIS_BITS = 16  # shared spectral bases (BitsMoE) and factor rows kept unquantized are stored in fp16/bf16
STORAGE_LAYOUT = "compressed-tensors"  # what the formula below prices; recorded in every plan
GGUF_LAYOUT = "gguf"  # plans for llama.cpp: ggml types, budgets in GGUF file bytes

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
MAX_BPP = 32  # bits per parameter above fp32 storage is not a budget but a typo
_MAX_BUDGET_CHARS = 64  # longer is not a budget; also keeps the message one short line
MAX_BUDGET_BYTES = 2**60  # an exabyte of weights: larger is a typo, and 1e300TB overflows float to inf
_BUDGET_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def tensor_bits(rows, cols, bits: int, group_size: int, symmetric: bool = False):
    """Exact storage of quantized [rows, cols] tensors, in bits (codes + scales + zero points).

    The one storage formula of bitalloc: plans, problems, importers and reports all price through it.
    ``rows`` and ``cols`` may be ints or integer numpy arrays (many tensors at once).
    """
    groups = rows * -(-cols // group_size)
    return rows * cols * bits + groups * (SCALE_BITS + (0 if symmetric else bits))


@dataclass(frozen=True)
class GgmlType:
    """One ggml tensor type: ``block_size`` consecutive weights of a row are stored in ``type_size`` bytes."""

    name: str
    type_id: int  # the ggml_type enum value that GGUF files store
    block_size: int
    type_size: int

    @property
    def bits_per_weight(self) -> float:
        """Storage per weight, scales included: what llama.cpp's size and bpw figures count."""
        return 8 * self.type_size / self.block_size


GGML_TYPES: dict[str, GgmlType] = {t.name: t for t in (
    GgmlType("F32", 0, 1, 4),
    GgmlType("F16", 1, 1, 2),
    GgmlType("BF16", 30, 1, 2),
    GgmlType("Q4_0", 2, 32, 18),
    GgmlType("Q8_0", 8, 32, 34),
    GgmlType("Q2_K", 10, 256, 84),
    GgmlType("Q3_K", 11, 256, 110),
    GgmlType("Q4_K", 12, 256, 144),
    GgmlType("Q5_K", 13, 256, 176),
    GgmlType("Q6_K", 14, 256, 210),
)}


def ggml_bits(rows, cols, qtype: str):
    """Exact storage of [rows, cols] tensors as the ggml type ``qtype``, in bits (ints or integer arrays).

    A row that is not a whole number of blocks cannot be stored as ``qtype`` (llama-quantize would fall
    back to another type); it is priced here as if padded to whole blocks, and refused where candidates
    are allowed (:func:`ggml_row_allowed`).
    """
    t = GGML_TYPES[qtype]
    return rows * -(-cols // t.block_size) * t.type_size * 8


def ggml_row_allowed(qtype: str, cols: int) -> bool:
    """Whether rows of ``cols`` weights can be stored as ``qtype`` (blocks never straddle rows)."""
    return cols > 0 and cols % GGML_TYPES[qtype].block_size == 0


def factor_bits(rows, cols, width: int, group_size: int, symmetric: bool = False):
    """Storage of ``rows`` spectral rank rows of ``cols`` entries each at ``width`` (BitsMoE factor slabs), in bits.

    Width 0 drops the rows (nothing stored); width ``BASIS_BITS`` keeps them in fp16 (no scales); any other
    width stores integer codes priced by :func:`tensor_bits`, groups running along the row.
    """
    if width == 0:
        return 0 * rows * cols
    if width == BASIS_BITS:
        return rows * cols * BASIS_BITS
    return tensor_bits(rows, cols, width, group_size, symmetric)


def nominal_bpp(bits: int, group_size: int, symmetric: bool = False) -> float:
    """Bits per parameter of a candidate for tensors whose width is a multiple of the group."""
    return tensor_bits(1, group_size, bits, group_size, symmetric) / group_size


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
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise BudgetError(f"budget {text!r} is not a string or a number: use e.g. '2.5bpp', '2.5', '900MB' or '3GiB'")
    if isinstance(text, (int, float)):
        text = str(text)
    m = _BUDGET_RE.match(text) if len(text) <= _MAX_BUDGET_CHARS else None
    if not m:
        raise BudgetError(f"cannot parse budget {text[:_MAX_BUDGET_CHARS]!r}: use e.g. '2.5bpp', '2.5', '900MB' or "
                          "'3GiB'")
    number, unit = float(m.group(1)), m.group(2).lower()
    if unit in ("", "bpp", "bpw"):
        if not 0 < number <= MAX_BPP:
            raise BudgetError(f"budget {text!r} is not a plausible bits-per-parameter value (0 < bpp <= {MAX_BPP})")
        return Budget(number, "bpp", text)
    if unit not in _BYTE_UNITS:
        raise BudgetError(f"unknown budget unit {m.group(2)!r} in {text!r}: use bpp, B, kB, MB, GB, KiB, MiB or GiB")
    size = number * _BYTE_UNITS[unit]
    if not 1 <= size <= MAX_BUDGET_BYTES:  # also catches 1e300TB, which overflows to inf
        raise BudgetError(f"budget {text!r} must be a size between 1 B and {MAX_BUDGET_BYTES // 2**50} PiB")
    return Budget(size, "bytes", text)
