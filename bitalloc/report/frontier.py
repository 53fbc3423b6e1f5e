"""A frontier on disk: one plan per budget, a CSV with one row per budget, and a plot of predicted
error (and measured perplexity when given) against achieved bpp."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Sequence

from matplotlib.figure import Figure

from ..allocator.frontier import FrontierPoint
from ..errors import OutputError, PlanError
from ..plan import atomic_write_bytes, atomic_write_text

CSV_COLUMNS = ("target_bpp", "achieved_bpp", "predicted_error", "solver", "status", "gap", "seconds", "plan",
               "perplexity")


# what write_frontier creates or replaces in its directory (fnmatch patterns), for the output policy's check
FRONTIER_FILES = ("plan-*.json", "frontier.csv", "frontier.png")


def write_frontier(directory: Path, points: Sequence[FrontierPoint]) -> list[Path]:
    """Every plan as ``plan-<bpp>.json``, ``frontier.csv`` and ``frontier.png`` in ``directory``."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {directory}: {exc.strerror}") from None
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
    if len({(p.plan.model.config_sha256, p.plan.model.index_sha256) for p in points}) > 1:
        raise PlanError("the plans are for different models; report plans of one model")
    x = [p.plan.budget.achieved_bpp for p in points]
    fig = Figure(figsize=(7, 4.2), dpi=120)
    ax = fig.add_subplot()
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
    return buf.getvalue()
