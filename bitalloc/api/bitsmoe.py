"""``allocate --method bitsmoe``: each MoE layer's experts decomposed (a shared basis plus quantized spectral
slabs) or per tensor, whichever the one exact solve finds better.

Steps: the error table (per-tensor scores, as the default method computes them, or a saved one) ->
the spectral pass (``sensitivity.bitsmoe``: bases, factors, the surrogate of every slab at every width)
-> the surrogate in the table's loss units -> one linked knapsack over every tensor's per-tensor candidates,
the experts' factor slabs, the bases' slabs and one decomposed-or-not switch per MoE layer
(``allocator.bitsmoe``, ``allocator.linked``), started from the per-tensor plan -> a plan whose
``decomposition`` section lists the decomposed layers (none: no section). docs/bitsmoe.md explains each step.

Loss units: for every expert tensor, the table predicts a loss increase err(c) for RTN of the whole
tensor at each candidate c, and the spectral pass measures the output error mse(c) of that same
rounding. Their ratio, sum_c err(c) / sum_c mse(c), converts that expert's slab errors into the
table's units, so slabs and attention tensors are priced by one predictor and compete in one solve.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from ..allocator import Assignment, Problem, solve as run_solver
from ..allocator.bitsmoe import JointLayout, SlabBlock, joint_problem
from ..allocator.linked import LinkedProblem, solve_linked
from ..budget import Budget
from ..errors import BitallocError, BudgetError, ConstraintError
from ..plan import (SLAB_WIDTH, SPECTRAL_WIDTHS, BudgetInfo, Decomposition, DecomposedBlock, Entry, FactorSlab, Plan,
                    SolverInfo)
from ..progress import Tracker
from ..sensitivity.table import ErrorTable
from .config import CalibrationConfig, SolveConfig
from .context import ModelContext

if TYPE_CHECKING:
    from ..sensitivity.bitsmoe import SpectralBlock

FACTOR_GROUP = SLAB_WIDTH  # factor rows are quantized in groups of 128, asymmetric: the default candidates' layout
FACTOR_SYMMETRIC = False


def allocate_bitsmoe(ctx: ModelContext, budget: Budget, calib: Optional[str | Path],
                     scores: Optional[str | Path | ErrorTable], calibration: CalibrationConfig,
                     save_scores: Optional[str | Path], track: Tracker, t_start: float) -> Plan:
    """The BitsMoE plan of ``ctx``'s model at ``budget`` (see the module docstring)."""
    from ..model.layerwise import run_workdir
    from ..rounding.lowrank import block_rank, slab_bounds
    from ..sensitivity.bitsmoe import expert_blocks, measure_spectral
    from .allocate import _table, build_plan, calibration_ids

    solve = ctx.solve
    blocks = expert_blocks(ctx.inv.quantized)
    _check_supported(ctx, calib, bool(blocks))
    tensor_layer = _group_layers(ctx)
    bounds = [slab_bounds(block_rank(b.basis_dim, b.factor_cols, len(b.units)), solve.rank_slab) for b in blocks]
    specs = [SlabBlock(f"layers.{b.layer}.{b.projection}", b.layer, len(b.units), tuple(z - a for a, z in bb),
                       b.factor_cols, b.basis_dim) for b, bb in zip(blocks, bounds)]

    def joint(tensors: Problem, costs: list[np.ndarray]) -> tuple[LinkedProblem, JointLayout]:
        problem, layout = joint_problem(tensors, tensor_layer, specs, costs, SPECTRAL_WIDTHS, FACTOR_GROUP,
                                        FACTOR_SYMMETRIC, solve.decompose == "all")
        return problem.with_budget(budget), layout

    # an unreachable budget fails before the (long) calibration passes
    joint(ctx.structure, [np.zeros((s.n_experts, len(s.slab_rows), len(SPECTRAL_WIDTHS))) for s in specs])

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    table = _table(ctx, calib, scores, calibration, solve, track)
    if scores is None:
        timings["sensitivity_s"] = time.perf_counter() - t0
        if save_scores is not None:
            table.save(save_scores)
    t0 = time.perf_counter()
    with run_workdir(calibration.workdir) as workdir:
        _, windows = calibration_ids(ctx.ckpt, calib, calibration)
        spectral, spectral_times = measure_spectral(ctx.ckpt, blocks, windows, ctx.candidates, SPECTRAL_WIDTHS,
                                                    solve.rank_slab, FACTOR_GROUP, FACTOR_SYMMETRIC,
                                                    calibration.device, track, workdir)
    timings["spectral_s"] = time.perf_counter() - t0
    timings.update(spectral_times)

    costs = [loss_units(sb.slab_error, sb.output_mse, [u.tensor for u in sb.block.units], table, ctx)
             for sb in spectral]
    per_tensor = ctx.with_table(ctx.structure, table)
    problem, layout = joint(per_tensor, costs)
    task = track.task("solve (bitsmoe, CP-SAT)", 1)
    hint = None if solve.decompose == "all" else _per_tensor_choice(per_tensor, budget, solve, calibration.seed)
    assignment = solve_linked(problem, solve.time_limit_s, calibration.seed,
                              None if hint is None else layout.embed(hint))
    task.advance()
    chosen = layout.decode(assignment.choice)

    decomposed = {layer for layer, d in chosen.decomposed.items() if d}
    stored = _without_experts(ctx, decomposed)
    stored_problem = stored.with_table(stored.structure, table)
    index = {name: g for g, name in enumerate(per_tensor.group_names)}
    stored_choice = np.array([chosen.tensors[index[name]] for name in stored_problem.group_names], dtype=np.int64)
    base = build_plan(stored, replace(stored_problem, budget_bits=problem.budget_bits),
                      Assignment(stored_choice, assignment.solver, assignment.status, 0.0), table, budget)
    decomposition = Decomposition(rank_slab=solve.rank_slab, group_size=FACTOR_GROUP, symmetric=FACTOR_SYMMETRIC,
                                  blocks=[_block(sb, bb, k, w, c) for sb, bb, k, w, c
                                          in zip(spectral, bounds, chosen.kept, chosen.widths, costs)
                                          if sb.block.layer in decomposed]) if decomposed else None
    entries = _entries(ctx, base, decomposition, table)
    counted = [e for e in entries if not e.locked]
    bits = sum(e.storage_bits for e in counted) + (decomposition.storage_bits if decomposition else 0)
    locked_bits = sum(e.storage_bits for e in entries if e.locked)
    params = sum(e.numel for e in counted)
    timings.update(solve_s=assignment.seconds, total_s=time.perf_counter() - t_start)
    per_tensor_layers = sorted(set(chosen.decomposed) - decomposed)
    return Plan.model_validate({
        **base.model_dump(), "entries": entries, "tie_groups": ctx.inv.tie_groups, "decomposition": decomposition,
        "timings": timings,
        "budget": BudgetInfo(target=budget.text, unit=budget.unit, target_bits=problem.budget_bits,
                             achieved_bpp=bits / params, achieved_bytes=(bits + 7) // 8, counted_params=params,
                             total_bytes=(bits + locked_bits + 7) // 8),
        "solver": SolverInfo(name=assignment.solver, status=assignment.status, objective=assignment.objective,
                             bound=assignment.bound, gap=assignment.gap, seconds=assignment.seconds,
                             objective_scale=assignment.objective_scale, granularity="slab",
                             note=f"bitsmoe: MoE layers {_layers(sorted(decomposed))} decomposed (shared bases + "
                                  f"factor slabs of {solve.rank_slab} ranks), {_layers(per_tensor_layers)} per tensor"),
    })


def _layers(layers: list[int]) -> str:
    return ",".join(map(str, layers)) if layers else "none"


def _per_tensor_choice(per_tensor: Problem, budget: Budget, solve: SolveConfig, seed: int) -> Optional[np.ndarray]:
    """The default method's solution at ``budget`` (None where that budget is outside its reach): a feasible point
    of the joint problem that the joint solve must match or beat."""
    try:
        problem = per_tensor.with_budget(budget)
    except BudgetError:
        return None
    return run_solver(problem, solve.solver, time_limit_s=solve.time_limit_s, seed=seed).choice


def _group_layers(ctx: ModelContext) -> list[Optional[int]]:
    """The MoE layer whose experts each group of the per-tensor problem holds (None: a dense group)."""
    units, owner = ctx.inv.quantized, ctx.units.owner
    out = []
    for name, members in zip(ctx.structure.group_names, ctx.structure.members):
        layers = {units[owner[m]].layer if units[owner[m]].expert is not None else None for m in members}
        if len(layers) != 1:
            raise ConstraintError(f"{name} ties tensors of different MoE layers (or experts with dense tensors); "
                                  "--method bitsmoe stores each layer's experts decomposed or per tensor as a whole")
        out.append(layers.pop())
    return out


def loss_units(slab_error: np.ndarray, output_mse: np.ndarray, tensors: list[str], table: ErrorTable,
               ctx: ModelContext) -> np.ndarray:
    """[E, S, W] slab errors in the table's units: each expert's by sum_c err(c) / sum_c mse(c) of its tensor."""
    cols = [table.column(c) for c in ctx.candidates]
    out = np.empty_like(slab_error)
    for e, tensor in enumerate(tensors):
        err = table.errors[table.row(tensor), cols]
        mse = float(output_mse[e].sum())
        out[e] = slab_error[e] * (float(err.sum()) / mse if mse > 0 else 0.0)
    return out


def _check_supported(ctx: ModelContext, calib: Optional[str | Path], has_experts: bool) -> None:
    """Refuse settings the BitsMoE path does not honour, rather than ignoring them."""
    s = ctx.solve
    if not has_experts:
        raise BitallocError(f"--method bitsmoe needs MoE experts; {ctx.ckpt.path} ({ctx.inv.arch}) has none")
    if calib is None:
        raise BitallocError("--method bitsmoe needs --calib (the spectral pass reads the routed activations); "
                            "--scores may be given too, to reuse the per-tensor error table")
    if s.granularity != "tensor" or s.solver not in ("auto", "ilp") or s.time_budget is not None:
        raise ConstraintError("--method bitsmoe solves exactly with CP-SAT over tensors and spectral slabs: leave "
                              "--granularity, --solver and --time-budget at their defaults")
    expert_rows = np.array([u.expert is not None for u in ctx.inv.quantized])
    if expert_rows.any() and not ctx.allowed[expert_rows].all():
        raise ConstraintError("--method bitsmoe chooses expert widths per spectral slab; pins and bit bounds that "
                              "reach expert tensors cannot apply to it (restrict them to other tensors)")


def _without_experts(ctx: ModelContext, layers: set[int]) -> ModelContext:
    """``ctx`` without the MoE experts of ``layers`` (the decomposed ones): the per-tensor part of the plan."""
    keep = [u.expert is None or u.layer not in layers for u in ctx.inv.quantized]
    units = [u for u in ctx.inv.units if u.expert is None or u.layer not in layers]
    names = {u.tensor for u in units}
    inv = replace(ctx.inv, units=units, tie_groups=[g for g in ctx.inv.tie_groups if set(g.members) <= names])
    return ModelContext.from_inventory(ctx.ckpt, inv, ctx.candidates, ctx.solve, ctx.allowed[np.array(keep, bool)])


def _block(sb: "SpectralBlock", bounds: list[tuple[int, int]], kept: np.ndarray, widths: np.ndarray, cost: np.ndarray) -> DecomposedBlock:
    b = sb.block
    prefix = b.units[0].tensor.split(".mlp.experts.")[0]
    drop = SPECTRAL_WIDTHS.index(0)
    return DecomposedBlock(
        layer=b.layer, projection=b.projection, side=b.side,
        basis=f"{prefix}.mlp.experts.{b.projection}_proj.shared_basis",
        experts=[u.tensor for u in b.units], routing_share=[float(x) for x in sb.shares], rank=sb.rank,
        basis_dim=b.basis_dim, factor_cols=b.factor_cols,
        slabs=[FactorSlab(start=a, stop=z, basis_kept=bool(kept[s]), widths=[int(x) for x in widths[:, s]],
                          energy=[float(x) for x in cost[:, s, drop]]) for s, (a, z) in enumerate(bounds)])


def _entries(ctx: ModelContext, base: Plan, decomposition: Optional[Decomposition], table: ErrorTable) -> list[Entry]:
    """Every unit in inventory order: the per-tensor plan's entries, and one decomposed entry per expert tensor of
    a decomposed layer."""
    dense = base.entry_map()
    factor_bits = {t: blk.expert_bits(e, decomposition.group_size, decomposition.symmetric)
                   for blk in decomposition.blocks for e, t in enumerate(blk.experts)} if decomposition else {}
    out = []
    for u in ctx.inv.units:
        if u.tensor in dense:
            out.append(dense[u.tensor])
            continue
        r = table.row(u.tensor)
        pred = {c.id: float(table.errors[r, table.column(c)]) for c in ctx.candidates}
        out.append(Entry(tensor=u.tensor, module=u.module, shape=list(u.shape), numel=u.numel, layer=u.layer,
                         role=u.role, expert=u.expert, source=u.source, bits=0, bpp=factor_bits[u.tensor] / u.numel,
                         predicted_error=pred, decomposed=True))
    return out
