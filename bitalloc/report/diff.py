"""Compare two plans of one model: what changed per layer, their sizes, and their predicted errors."""

from __future__ import annotations

from collections import defaultdict
from typing import Optional

from ..errors import PlanError
from ..plan import SLAB_WIDTH, Entry, Plan
from ..sensitivity.table import ErrorTable


def predicted(plan: Plan, table: ErrorTable) -> Optional[float]:
    """Sum over quantized tensors of the table's error at the plan's choice; None if not covered."""
    total = 0.0
    for e in plan.entries:
        if e.locked:
            continue
        if not table.has(e.tensor) or e.candidate not in table.candidates:
            return None
        if e.segments:
            slabs = table.slabs(e.tensor)
            total += sum(float(slabs[g.start // SLAB_WIDTH:-(-g.stop // SLAB_WIDTH), table.column(g.candidate)].sum())
                         for g in e.segments)
        else:
            total += float(table.errors[table.row(e.tensor), table.column(e.candidate)])
    return total


def _bits(e: Entry) -> str:
    if e.locked:
        return "16"
    if e.segments:
        return "/".join(str(g.bits) for g in e.segments)
    return str(e.bits)


def diff_plans(a: Plan, b: Plan, table: Optional[ErrorTable] = None, names: tuple[str, str] = ("A", "B")) -> str:
    if a.model.config_sha256 != b.model.config_sha256 or a.model.index_sha256 != b.model.index_sha256:
        raise PlanError(f"the two plans are for different models ({a.model.path} and {b.model.path}); diff plans "
                        "of one model")
    if table is not None:
        table.check_plan(a)  # another model's errors would price these plans with meaningless numbers
    ea, eb = a.entry_map(), b.entry_map()
    lines = [f"{'':<10}{names[0]:>14}{names[1]:>14}",
             f"{'bpp':<10}{a.budget.achieved_bpp:>14.4f}{b.budget.achieved_bpp:>14.4f}",
             f"{'MB':<10}{a.budget.total_bytes / 1e6:>14.3f}{b.budget.total_bytes / 1e6:>14.3f}"]
    if table is not None:
        pa, pb = predicted(a, table), predicted(b, table)
        fmt = lambda v: f"{v:>14.5f}" if v is not None else f"{'n/a':>14}"  # noqa: E731
        lines.append(f"{'predicted':<10}{fmt(pa)}{fmt(pb)}")
    per_layer: dict[str, list[str]] = defaultdict(list)
    for name in sorted(set(ea) | set(eb)):
        x, y = ea.get(name), eb.get(name)
        bx, by = (_bits(x) if x else "-"), (_bits(y) if y else "-")
        if bx != by:
            layer = x.layer if x is not None else y.layer
            per_layer["-" if layer is None else str(layer)].append(f"{name}: {bx} -> {by}")
    lines.append("")
    if not per_layer:
        lines.append("no tensor differs")
    for layer in sorted(per_layer, key=lambda s: (s != "-", int(s) if s.isdigit() else -1)):
        changes = per_layer[layer]
        lines.append(f"layer {layer}: {len(changes)} tensor(s) differ")
        lines += [f"  {c}" for c in changes]
    return "\n".join(lines)
