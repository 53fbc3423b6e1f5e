"""User constraints: pins by regex, global bit bounds, per-role bit ranges.

Resolved against concrete tensor names before the solver runs, so a plan stores only the
outcome, never the patterns' meaning. Matching is ``re.search`` on the exact checkpoint tensor
name (unanchored, like llama.cpp's ``--tensor-type``; anchor with ``^``/``$``). A pin fixes the
choice and wins over the bounds; two pins that give one tensor different choices, a pin that
matches nothing, and bounds that leave a tensor no candidate are errors, never silently resolved.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ..errors import ConstraintError
from ..plan import Candidate, Role


MAX_BITS = 8  # the widest code a Candidate may have (bits run 1..MAX_BITS)
MAX_GROUP_SIZE = 2**20  # wider than any weight's row: a larger group is a typo, and 10^20 overflows the pricing


def _bits(text: str, what: str) -> int:
    """A bit width from its digits, refused unless 1 <= bits <= MAX_BITS (99 or 10^5000 is a typo)."""
    if len(text) > 3 or not 1 <= int(text) <= MAX_BITS:
        raise ConstraintError(f"{what}: {text[:20]} bits is out of range; use 1 to {MAX_BITS}")
    return int(text)


@dataclass(frozen=True)
class Pin:
    text: str
    pattern: re.Pattern[str]
    bits: int
    group_size: Optional[int]

    def allows(self, c: Candidate) -> bool:
        return c.bits == self.bits and (self.group_size is None or c.group_size == self.group_size)


def parse_pin(text: str) -> Pin:
    """``REGEX=BITS`` or ``REGEX=BITSgGROUP`` (e.g. ``lm_head=8``, ``layers\\.0\\..*=4g64``)."""
    regex, sep, spec = text.rpartition("=")
    m = re.fullmatch(r"(\d+)(?:g(\d+))?", spec.strip())
    if not sep or not regex or not m:
        raise ConstraintError(f"cannot parse pin {text!r}: use REGEX=BITS or REGEX=BITSgGROUP, e.g. 'lm_head=8'")
    try:
        pattern = re.compile(regex)
    except re.error as exc:
        raise ConstraintError(f"pin {text!r} has an invalid regular expression: {exc}") from None
    group = m.group(2)
    if group and (len(group) > 7 or not 1 <= int(group) <= MAX_GROUP_SIZE):
        raise ConstraintError(f"pin {text[:60]!r}: group {group[:20]} is out of range; use 1 to {MAX_GROUP_SIZE}")
    return Pin(text, pattern, _bits(m.group(1), f"pin {text!r}"), int(group) if group else None)


def _parse_range(text: str, what: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*(?::\s*(\d+)\s*)?", text)
    if not m:
        raise ConstraintError(f"cannot parse {what} {text!r}: use BITS or LO:HI")
    lo = _bits(m.group(1), f"{what} {text!r}")
    hi = _bits(m.group(2), f"{what} {text!r}") if m.group(2) else lo
    if lo > hi:
        raise ConstraintError(f"{what} {text!r}: the lower bound exceeds the upper bound")
    return lo, hi


@dataclass(frozen=True)
class Constraints:
    """Pins (``REGEX=BITS``), global ``min_bits``/``max_bits``, ``role_bits`` (``ROLE=LO:HI``) and
    ``bits_ranges`` (``REGEX=LO:HI``, e.g. per layer: ``layers\\.0\\.=4:8``). All bounds that apply
    to a tensor intersect; pins override them."""

    pins: tuple[str, ...] = ()
    min_bits: Optional[int] = None
    max_bits: Optional[int] = None
    role_bits: tuple[str, ...] = ()
    bits_ranges: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for option, value in (("--min-bits", self.min_bits), ("--max-bits", self.max_bits)):
            if value is not None and not (isinstance(value, int) and 1 <= value <= MAX_BITS):
                raise ConstraintError(f"{option} {value!r} is out of range; use 1 to {MAX_BITS}")
        if self.min_bits is not None and self.max_bits is not None and self.min_bits > self.max_bits:
            raise ConstraintError(f"--min-bits {self.min_bits} exceeds --max-bits {self.max_bits}")
        self.parsed_pins()
        self.role_ranges()
        self.regex_ranges()

    @property
    def empty(self) -> bool:
        return not (self.pins or self.role_bits or self.bits_ranges) and self.min_bits is None and self.max_bits is None

    def regex_ranges(self) -> list[tuple[re.Pattern[str], int, int]]:
        out = []
        for item in self.bits_ranges:
            regex, sep, rng = item.rpartition("=")
            if not sep or not regex:
                raise ConstraintError(f"cannot parse bits range {item!r}: use REGEX=LO:HI, e.g. 'layers\\.0\\.=4:8'")
            try:
                pattern = re.compile(regex)
            except re.error as exc:
                raise ConstraintError(f"bits range {item!r} has an invalid regular expression: {exc}") from None
            out.append((pattern, *_parse_range(rng, f"bits range {item!r}")))
        return out

    def parsed_pins(self) -> list[Pin]:
        return [parse_pin(p) for p in self.pins]

    def role_ranges(self) -> dict[str, tuple[int, int]]:
        out = {}
        roles = {r.value for r in Role}
        for item in self.role_bits:
            role, sep, rng = item.partition("=")
            if not sep or role.strip() not in roles:
                raise ConstraintError(f"cannot parse role range {item!r}: use ROLE=LO:HI with ROLE one of "
                                      f"{', '.join(sorted(roles))}")
            out[role.strip()] = _parse_range(rng, f"role range for {role.strip()}")
        return out

    def pin_for(self, name: str, aliases: Sequence[str] = ()) -> Optional[Pin]:
        """The pin that fixes ``name`` (or one of its aliases), if any; contradictory pins raise."""
        hits = [p for p in self.parsed_pins() if any(p.pattern.search(n) for n in (name, *aliases))]
        if len({(p.bits, p.group_size) for p in hits}) > 1:
            raise ConstraintError(f"contradictory pins for {name}: {', '.join(repr(p.text) for p in hits)}")
        return hits[0] if hits else None

    def check_all_pins_match(self, names: Sequence[str], aliases: Optional[dict[str, list[str]]] = None) -> None:
        every = list(names) + [a for v in (aliases or {}).values() for a in v]
        for p in self.parsed_pins():
            if not any(p.pattern.search(n) for n in every):
                raise ConstraintError(f"pin {p.text!r} matches no tensor that can be quantized")

    def allowed(self, names: Sequence[str], roles: Sequence[str], candidates: Sequence[Candidate],
                aliases: Optional[dict[str, list[str]]] = None) -> np.ndarray:
        """[U, C] mask of the candidates each unit may take. ``aliases`` gives other names a tensor
        answers to (a tied embedding is also ``lm_head.weight``)."""
        ranges = self.role_ranges()
        regex_ranges = self.regex_ranges()
        mask = np.ones((len(names), len(candidates)), dtype=bool)
        for i, (name, role) in enumerate(zip(names, roles)):
            pin = self.pin_for(name, (aliases or {}).get(name, ()))
            if pin is not None:
                mask[i] = [pin.allows(c) for c in candidates]
                if not mask[i].any():
                    raise ConstraintError(f"pin {pin.text!r} asks for a choice that is not among the candidates "
                                          f"({', '.join(c.id for c in candidates)})")
                continue
            lo, hi = ranges.get(role, (self.min_bits or 0, self.max_bits or 64))
            lo, hi = max(lo, self.min_bits or 0), min(hi, self.max_bits or 64)
            for pattern, rlo, rhi in regex_ranges:
                if pattern.search(name):
                    lo, hi = max(lo, rlo), min(hi, rhi)
            mask[i] = [lo <= c.bits <= hi for c in candidates]
            if not mask[i].any():
                raise ConstraintError(f"the bit bounds leave {name} ({role}) no candidate among "
                                      f"{', '.join(c.id for c in candidates)}")
        return mask
