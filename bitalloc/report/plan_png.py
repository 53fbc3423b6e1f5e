"""A picture of a plan: bits by layer x role (x expert for MoE), the bits histogram, target vs achieved."""

from __future__ import annotations

import io
from collections import Counter

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from ..plan import Plan, Role
from .decomposition import decomposition_png

_ROLE_ORDER = [r.value for r in Role]


def render(plan: Plan) -> bytes:
    """PNG bytes; drawn on a private Figure, so matplotlib's global backend is left alone. A BitsMoE plan
    is drawn as its per-layer decomposition report (``decomposition.py``)."""
    if plan.decomposition is not None:
        return decomposition_png(plan)
    entries = [e for e in plan.entries if not e.locked and e.layer is not None]
    layers = sorted({e.layer for e in entries})
    experts = sorted({e.expert for e in entries if e.expert is not None})
    dense_roles = [r for r in _ROLE_ORDER if any(e.role.value == r and e.expert is None for e in entries)]
    expert_roles = [r for r in _ROLE_ORDER if any(e.role.value == r and e.expert is not None for e in entries)]
    panels = 1 + len(expert_roles)
    fig = Figure(figsize=(4 + 3.2 * panels, 4.8), dpi=110)
    grid = fig.add_gridspec(1, panels + 1, width_ratios=[max(len(dense_roles), 1)] + [len(experts) or 1] * len(expert_roles) + [3])
    cmap = matplotlib.colormaps["viridis"]
    widths = sorted({e.bits for e in entries}) or [plan.candidates[0].bits]
    vmin, vmax = min(widths), max(widths)

    def heat(ax, mat, xticks, title, first):
        im = ax.imshow(mat, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax)
        ax.set_xticks(range(len(xticks)), xticks, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(layers)), [str(x) for x in layers] if first else [], fontsize=8)
        if first:
            ax.set_ylabel("layer")
        ax.set_title(title, fontsize=10)
        for (i, j), v in np.ndenumerate(mat):
            if np.isfinite(v) and mat.size <= 400:
                ax.text(j, i, f"{v:g}", ha="center", va="center", fontsize=7, color="white" if v < (vmin + vmax) / 2 else "black")
        return im

    ax0 = fig.add_subplot(grid[0, 0])
    mat = np.full((len(layers), max(len(dense_roles), 1)), np.nan)
    for e in entries:
        if e.expert is None:
            mat[layers.index(e.layer), dense_roles.index(e.role.value)] = e.bits
    im = heat(ax0, mat, dense_roles, "bits by layer x role", True)
    heat_axes = [ax0]
    for k, role in enumerate(expert_roles):
        ax = fig.add_subplot(grid[0, 1 + k])
        heat_axes.append(ax)
        m = np.full((len(layers), len(experts)), np.nan)
        for e in entries:
            if e.expert is not None and e.role.value == role:
                m[layers.index(e.layer), experts.index(e.expert)] = e.bits
        heat(ax, m, [str(x) for x in experts], f"{role} by expert", False)
    fig.colorbar(im, ax=heat_axes, shrink=0.8, pad=0.02, label="bits", ticks=widths)
    axh = fig.add_subplot(grid[0, -1])
    params: Counter = Counter()
    for e in plan.entries:
        if not e.locked:
            params[e.bits] += e.numel
    axh.bar([str(w) for w in sorted(params)], [params[w] / 1e6 for w in sorted(params)], color=cmap(0.6))
    axh.set_xlabel("bits")
    axh.set_ylabel("parameters (M)")
    b = plan.budget
    axh.set_title(f"target {b.target}\nachieved {b.achieved_bpp:.3f} bpp", fontsize=10)
    fig.suptitle(f"{plan.model.path} - {plan.solver.name} ({plan.solver.status}), "
                 f"predicted {plan.solver.objective:.4f} nats", fontsize=11)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()
