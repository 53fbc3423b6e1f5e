"""The bits-vs-error frontier: every budget of a sweep solved from one error table.

``sweep`` re-solves the same table for each budget (the sensitivity pass runs once), skipping
budgets that the candidates cannot reach; ``write_frontier`` writes each plan, a CSV with one row
per budget and a PNG of predicted error (and measured perplexity when given) against bpp.
"""

from __future__ import annotations

import csv
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .errors import BudgetError
from .plan import Plan, atomic_write_bytes, atomic_write_text

CSV_COLUMNS = ("target_bpp", "achieved_bpp", "predicted_error", "solver", "status", "gap", "seconds", "plan",
               "perplexity")


@dataclass
class FrontierPoint:
    target_bpp: float
    plan: Plan
    perplexity: Optional[float] = None

    @property
    def filename(self) -> str:
        return f"plan-{self.target_bpp:g}.json"


def budgets(start: float, stop: float, step: float) -> list[float]:
    if step <= 0 or stop < start:
        raise BudgetError(f"empty sweep: --from {start} --to {stop} --step {step}")
    n = int(np.floor((stop - start) / step + 1e-9)) + 1
    return [round(start + i * step, 10) for i in range(n)]


def sweep(solve_one, targets: Sequence[float]) -> list[FrontierPoint]:
    """``solve_one(bpp) -> Plan`` for every target; unreachable budgets are skipped with a warning."""
    points = []
    for t in targets:
        try:
            points.append(FrontierPoint(t, solve_one(t)))
        except BudgetError as exc:
            warnings.warn(f"skipping {t:g} bpp: {exc}", stacklevel=2)
    if not points:
        raise BudgetError("no budget of the sweep is reachable with these candidates")
    return points


def write_frontier(directory: Path, points: Sequence[FrontierPoint]) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = [p.plan.save(directory / p.filename) for p in points]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_COLUMNS)
    for p in points:
        s = p.plan.solver
        w.writerow([f"{p.target_bpp:g}", f"{p.plan.budget.achieved_bpp:.6f}", f"{s.objective:.8g}", s.name, s.status,
                    "" if s.gap is None else f"{s.gap:.3g}", f"{s.seconds:.4f}", p.filename,
                    "" if p.perplexity is None else f"{p.perplexity:.6f}"])
    written.append(atomic_write_text(directory / "frontier.csv", buf.getvalue()))
    written.append(atomic_write_bytes(directory / "frontier.png", frontier_png(points)))
    return written


def frontier_png(points: Sequence[FrontierPoint]) -> bytes:
    """Predicted error (and measured perplexity where known) against achieved bpp."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [p.plan.budget.achieved_bpp for p in points]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.plot(x, [p.plan.solver.objective for p in points], "o-", color="tab:blue", label="predicted loss increase")
    ax.set_yscale("log")
    ax.set_xlabel("bits per parameter (scales and zeros included)")
    ax.set_ylabel("predicted loss increase (nats)", color="tab:blue")
    ax.grid(True, which="both", alpha=0.3)
    measured = [(xi, p.perplexity) for xi, p in zip(x, points) if p.perplexity is not None]
    if measured:
        ax2 = ax.twinx()
        ax2.plot(*zip(*measured), "s--", color="tab:red", label="held-out perplexity")
        ax2.set_ylabel("held-out perplexity (RTN)", color="tab:red")
    ax.set_title(f"{Path(points[0].plan.model.path).name}: frontier ({points[0].plan.solver.name})")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
