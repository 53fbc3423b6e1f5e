"""Per-layer report of a BitsMoE plan: which MoE layers are decomposed and which per tensor, ranks kept, energy in
the kept basis, widths per expert vs routing."""

from __future__ import annotations

import io

import numpy as np
from matplotlib.figure import Figure

from ..plan import DecomposedBlock, Decomposition, Plan


def kept_energy_share(block: DecomposedBlock) -> float:
    """Share of the experts' energy (predicted loss of dropping every rank) that lies in the kept basis ranks."""
    total = sum(sum(s.energy) for s in block.slabs)
    kept = sum(sum(s.energy) for s in block.slabs if s.basis_kept)
    return kept / total if total > 0 else 0.0


def expert_bpp(block: DecomposedBlock, d: Decomposition) -> np.ndarray:
    """[E] factor bits of each expert per parameter of its original weight (the basis not included)."""
    return np.array([block.expert_bits(e, d.group_size, d.symmetric) / (block.basis_dim * block.factor_cols)
                     for e in range(len(block.experts))])


def layer_modes(plan: Plan) -> tuple[list[int], list[int]]:
    """(decomposed, per-tensor) MoE layers: the solve stores each layer's experts one way or the other."""
    decomposed = {b.layer for b in plan.decomposition.blocks} if plan.decomposition else set()
    experts = {e.layer for e in plan.entries if e.expert is not None}
    return sorted(decomposed), sorted(experts - decomposed)


def modes_line(plan: Plan) -> str:
    decomposed, per_tensor = layer_modes(plan)
    return (f"MoE layers decomposed: {', '.join(map(str, decomposed)) or 'none'}; "
            f"per tensor: {', '.join(map(str, per_tensor)) or 'none'}")


def decomposition_rows(plan: Plan) -> list[str]:
    """Which layers are decomposed, then one line per decomposed layer and projection: rank kept, energy share
    kept, basis bpp, widths per expert."""
    d = plan.decomposition
    if d is None:
        return []
    lines = [modes_line(plan), "", "| layer | proj | rank kept | energy in kept basis | basis bits / expert param | factor bpp per expert "
             "(routing share) |", "|---|---|---|---|---|---|"]
    for b in d.blocks:
        params = len(b.experts) * b.basis_dim * b.factor_cols
        per = " ".join(f"{x:.2f} ({p:.2f})" for x, p in zip(expert_bpp(b, d), b.routing_share))
        lines.append(f"| {b.layer} | {b.projection} | {b.rank_kept}/{b.rank} | {kept_energy_share(b):.4f} | "
                     f"{b.basis_bits() / params:.3f} | {per} |")
    return lines


def decomposition_png(plan: Plan) -> bytes:
    """Left: factor bpp of every expert against its routing share; right: ranks kept per layer and projection."""
    d = plan.decomposition
    if d is None:
        raise ValueError("the plan has no decomposition")
    fig = Figure(figsize=(11, 4.4), dpi=110)
    ax, bx = fig.subplots(1, 2)
    markers = {"gate": "o", "up": "s", "down": "^"}
    for proj, marker in markers.items():
        blocks = [b for b in d.blocks if b.projection == proj]
        if blocks:
            ax.scatter(np.concatenate([b.routing_share for b in blocks]),
                       np.concatenate([expert_bpp(b, d) for b in blocks]), marker=marker, alpha=0.7, label=proj)
    ax.set_xlabel("routing share (calibration tokens)")
    ax.set_ylabel("factor bits per expert parameter")
    ax.set_title("widths per expert vs routing frequency (decomposed layers)")
    ax.legend()
    decomposed, per_tensor = layer_modes(plan)
    layers = sorted(decomposed + per_tensor)
    for k, proj in enumerate(markers):
        kept = [next((b.rank_kept / b.rank for b in d.blocks if b.layer == i and b.projection == proj), 0.0)
                for i in layers]
        bx.bar(np.arange(len(layers)) + (k - 1) * 0.27, kept, width=0.27, label=proj)
    bx.set_xticks(range(len(layers)), [f"{i}\n(pt)" if i in per_tensor else str(i) for i in layers])
    bx.set_xlabel("MoE layer (pt: stored per tensor, not decomposed)")
    bx.set_ylabel("share of ranks kept in the shared basis")
    bx.set_ylim(0, 1)
    bx.set_title(f"ranks kept ({d.rank_slab} per slab); {modes_line(plan)}", fontsize=8)
    bx.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()
