"""The public Python API: ``allocate`` a budget, ``evaluate`` a plan. The CLI is a thin layer over it.

Example::

    import bitalloc
    plan = bitalloc.allocate("./my-model", budget="2.5bpp", calib="data.txt")
    plan.save("plan.json")
    print(plan.summary())
    print(bitalloc.evaluate("./my-model", "heldout.txt", plan=plan).perplexity)
"""

from __future__ import annotations

import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from . import __version__
from .allocator import SOLVERS, Assignment, Constraints, Problem, build_problem, solve
from .budget import Budget, parse_budget
from .data import CALIB_SEQLEN, CALIB_TOKENS, EVAL_SEQLEN, EVAL_TOKENS, calibration_windows, file_sha256, tokenize
from .errors import BitallocError, ConstraintError, ScoresError
from .model.checkpoint import Checkpoint
from .model.inventory import Inventory, build_inventory
from .plan import (DEFAULT_CANDIDATES, LOCKED_BITS, BudgetInfo, CalibrationInfo, Candidate, ConstraintsInfo, Entry,
                   ModelInfo, Plan, Role, ScoresInfo, SolverInfo)
from .progress import SILENT, Tracker
from .scores import DEFAULT_SCORE, ErrorTable
from .units import decision_errors, decision_units, segments_of

if TYPE_CHECKING:
    from .eval import EvalResult
    from .frontier import FrontierPoint

# torch and transformers are imported only by the steps that run the model, so re-solving a
# saved error table (allocate --scores) starts in well under a second.


def compute_scores(model: str | Path, calib: str | Path, candidates: Sequence[Candidate] = DEFAULT_CANDIDATES,
                   calib_tokens: int = CALIB_TOKENS, seqlen: int = CALIB_SEQLEN, seed: int = 0,
                   include_lm_head: bool = False, include_embeddings: bool = False, device: str = "auto",
                   track: Tracker = SILENT) -> ErrorTable:
    """One calibration pass: every score family's predicted error of every unit at every candidate."""
    ckpt = Checkpoint(model)
    inv = build_inventory(ckpt, include_lm_head, include_embeddings)
    return _measure(ckpt, inv, calib, list(candidates), calib_tokens, seqlen, seed, device, track, True)


def _measure(ckpt: Checkpoint, inv: Inventory, calib: str | Path, candidates: list[Candidate], calib_tokens: int,
             seqlen: int, seed: int, device: str, track: Tracker, with_combined: bool) -> ErrorTable:
    from .model.layerwise import resolve_device
    from .sensitivity import measure_errors

    resolve_device(device)  # a bad device fails before tokenizing
    windows = calibration_windows(tokenize(ckpt.path, calib), calib_tokens, seqlen, seed)
    table = measure_errors(ckpt, inv, windows, candidates, device=device, track=track, seed=seed,
                           with_combined=with_combined)
    table.meta["calibration"] = {"file": str(calib), "sha256": file_sha256(calib), "tokens": int(windows.numel()),
                                 "seqlen": seqlen, "seed": seed}
    return table


def allocate(model: str | Path, budget: str | float, calib: Optional[str | Path] = None,
             scores: Optional[str | Path | ErrorTable] = None, candidates: Sequence[Candidate] = DEFAULT_CANDIDATES,
             calib_tokens: int = CALIB_TOKENS, seqlen: int = CALIB_SEQLEN, seed: int = 0,
             include_lm_head: bool = False, include_embeddings: bool = False, device: str = "auto",
             save_scores: Optional[str | Path] = None, solver: str = "auto",
             constraints: Optional[Constraints] = None, granularity: str = "tensor",
             time_table: Optional[dict[str, float]] = None, time_budget: Optional[float] = None,
             time_limit_s: float = 60.0, score: Optional[str] = None, track: Tracker = SILENT) -> Plan:
    """Choose bits for every tensor of ``model`` so that the total meets ``budget`` exactly.

    Args:
        model: local Hugging Face model directory (config.json + safetensors).
        budget: ``"2.5bpp"``, ``2.5`` or a byte size (``"900MB"``, ``"3GiB"``) of the quantized tensors.
        calib: calibration text (.txt, .jsonl, optionally .xz/.gz); needed unless ``scores`` is given.
        scores: a saved error table (path or object) to re-solve without recomputing sensitivities.
        save_scores: where to save the error table computed from ``calib``.
        solver: ``auto`` (exact up to 2e5 groups, Lagrangian beyond), ``ilp``, ``lagrangian``,
            ``closed-form`` (BAQ water-filling) or ``greedy``.
        constraints: pins (``"lm_head=8"``; a pin on lm_head or the embedding unlocks it), bit bounds.
        granularity: ``tensor`` (default), ``expert`` (one width per MoE expert) or ``slab`` (per
            128-column slab; the plan then carries ``segments``).
        time_table, time_budget: seconds per parameter of each candidate id, and the total allowed.
        score: which predictor the solver minimises (``fisher``, ``gradient``, ``hessian``, ``baq``,
            ``spectral``, ``importance``, ``combined``, ...; docs/sensitivity.md); default: the best measured.
    Returns:
        The validated :class:`Plan`; nothing is written unless ``save_scores`` is set.
    """
    t_start = time.perf_counter()
    score = score or DEFAULT_SCORE
    if solver not in SOLVERS:
        raise ConstraintError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    ckpt = Checkpoint(model)
    constraints = constraints or Constraints()
    inv = _inventory(ckpt, include_lm_head, include_embeddings, constraints)
    parsed = parse_budget(budget)
    candidates = list(candidates)
    units = inv.quantized
    allowed = constraints.allowed([u.tensor for u in units], [u.role.value for u in units], candidates,
                                  _aliases(inv))
    time_per_param = _time_per_param(time_table, candidates) if time_budget is not None else None
    needs_errors = [u.tensor for u, row in zip(units, allowed) if row.sum() > 1]
    # Fail on an infeasible budget or contradictory constraints before the (long) calibration pass.
    du = decision_units(inv, granularity, candidates)
    build_problem(du.names, du.shapes, np.zeros((len(du.names), len(candidates))), candidates, du.ties, parsed,
                  allowed[du.owner], time_per_param, time_budget)
    timings: dict[str, float] = {}
    if scores is not None:
        table = scores if isinstance(scores, ErrorTable) else ErrorTable.load(scores)
        table.check_matches(ckpt.config_sha256, ckpt.index_sha256, candidates, needs_errors)
        if calib is not None:  # both given: the table must come from this calibration text
            table.check_calibration(file_sha256(calib), seqlen, seed)
    elif calib is not None:
        from .sensitivity import SCORE_NAMES

        if score not in SCORE_NAMES:  # before the long pass
            raise ScoresError(f"unknown score {score!r}; choose one of {', '.join(SCORE_NAMES)}")
        t0 = time.perf_counter()
        # the measured sample behind `combined` is only paid for when it is asked for
        table = _measure(ckpt, inv, calib, candidates, calib_tokens, seqlen, seed, device, track, score == "combined")
        timings["sensitivity_s"] = time.perf_counter() - t0
        if save_scores is not None:
            table.save(save_scores)
    else:
        raise BitallocError("give calibration text (--calib) or a saved score file (--scores)")
    table = table.using(score)
    _warn_if_noisy(table)
    problem = problem_from_table(inv, table, candidates, parsed, allowed, time_per_param, time_budget, granularity)
    task = track.task(f"solve ({solver})", 1)
    assignment = solve(problem, solver, time_limit_s=time_limit_s, seed=seed)
    task.advance()
    timings["solve_s"] = assignment.seconds
    timings["total_s"] = time.perf_counter() - t_start
    info = None if constraints.empty and time_budget is None else ConstraintsInfo(
        pins=list(constraints.pins), min_bits=constraints.min_bits, max_bits=constraints.max_bits,
        role_bits=list(constraints.role_bits), bits_ranges=list(constraints.bits_ranges), time_budget=time_budget)
    return build_plan(ckpt, inv, problem, assignment, table, parsed, timings, constraints, info, granularity)


GRADIENT_MIN_SEQUENCES = 32


def _warn_if_noisy(table: ErrorTable) -> None:
    """The ``gradient`` score averages n_seq squared dot products per unit; with few sequences it is noisy.

    Measured on llama-dense-16m: Spearman with the truth 0.92 at 64 sequences, 0.85 at 8, while
    ``fisher`` (a sum over all weights) stays at 0.97 (docs/sensitivity.md).
    """
    n = table.meta.get("calib_sequences")
    if table.score == "gradient" and n is not None and n < GRADIENT_MIN_SEQUENCES:
        warnings.warn(f"only {n} calibration sequences: the gradient score is noisy below "
                      f"{GRADIENT_MIN_SEQUENCES}; use more --calib-tokens or --score fisher", stacklevel=3)


def _aliases(inv: Inventory) -> dict[str, list[str]]:
    """With tied embeddings the one embedding tensor is also the output head, so pins on lm_head reach it."""
    if not inv.tied_embeddings:
        return {}
    return {u.tensor: ["lm_head.weight"] for u in inv.units if u.role == Role.embedding}


def _inventory(ckpt: Checkpoint, include_lm_head: bool, include_embeddings: bool, constraints: Constraints) -> Inventory:
    """The inventory, with lm_head / embedding unlocked when a pin names them.

    Pins never reach tensors that are not linear weights (norms, biases, routers): a pattern such
    as ``layers\\.0\\.`` pins the quantizable tensors of layer 0 and leaves its norms alone.
    """
    inv = build_inventory(ckpt, include_lm_head, include_embeddings)
    aliases = _aliases(inv)
    for u in inv.units:
        if u.locked and constraints.pin_for(u.tensor, aliases.get(u.tensor, ())) is not None:
            if u.role == Role.lm_head or (u.role == Role.embedding and inv.tied_embeddings):
                include_lm_head = True
            elif u.role == Role.embedding:
                include_embeddings = True
    inv = build_inventory(ckpt, include_lm_head, include_embeddings)
    constraints.check_all_pins_match([u.tensor for u in inv.quantized], _aliases(inv))
    return inv


def _time_per_param(table: Optional[dict[str, float]], candidates: Sequence[Candidate]) -> list[float]:
    if not table:
        raise ConstraintError("a time budget needs a time table: seconds per parameter for each candidate id")
    missing = [c.id for c in candidates if c.id not in table]
    if missing:
        raise ConstraintError(f"the time table has no entry for candidate(s) {', '.join(missing)}")
    return [float(table[c.id]) for c in candidates]


def problem_from_table(inv: Inventory, table: ErrorTable, candidates: Sequence[Candidate], budget: Budget,
                       allowed: Optional[np.ndarray] = None, time_per_param: Optional[Sequence[float]] = None,
                       time_budget: Optional[float] = None, granularity: str = "tensor") -> Problem:
    """The solver's problem for ``inv``'s unlocked tensors at ``granularity``; ``allowed`` is per tensor."""
    candidates = list(candidates)
    du = decision_units(inv, granularity, candidates)
    if allowed is None:
        allowed = np.ones((len(inv.quantized), len(candidates)), dtype=bool)
    errors = decision_errors(du, inv, table, candidates, allowed[du.owner])
    return build_problem(du.names, du.shapes, errors, candidates, du.ties, budget, allowed[du.owner], time_per_param,
                         time_budget)


def build_plan(ckpt: Checkpoint, inv: Inventory, problem: Problem, assignment: Assignment, table: ErrorTable,
               budget: Budget, timings: Optional[dict[str, float]] = None,
               constraints: Optional[Constraints] = None, constraints_info: Optional[ConstraintsInfo] = None,
               granularity: str = "tensor") -> Plan:
    """Assemble the validated plan for ``assignment`` (any solver or baseline)."""
    du = decision_units(inv, granularity, problem.candidates)
    choices = problem.unit_choices(assignment.choice)
    owner_of = {u.tensor: i for i, u in enumerate(inv.quantized)}
    entries = []
    for u in inv.units:
        common = dict(tensor=u.tensor, module=u.module, shape=list(u.shape), numel=u.numel, layer=u.layer,
                      role=u.role, expert=u.expert, source=u.source)
        if u.locked:
            entries.append(Entry(**common, bits=LOCKED_BITS, bpp=float(LOCKED_BITS), locked=True, reason=u.reason))
            continue
        segments = segments_of(du, owner_of[u.tensor], choices, problem.candidates)
        widest = max(segments, key=lambda g: (g.bits, g.group_size))
        c = Candidate(bits=widest.bits, group_size=widest.group_size, symmetric=widest.symmetric)
        pred = {}
        if table.has(u.tensor):
            r = table.row(u.tensor)
            pred = {cand.id: float(table.errors[r, table.column(cand)]) for cand in problem.candidates}
        pin = constraints.pin_for(u.tensor, _aliases(inv).get(u.tensor, ())) if constraints is not None else None
        e = Entry(**common, bits=c.bits, group_size=c.group_size, symmetric=c.symmetric, bpp=0.0, predicted_error=pred,
                  reason=f"pinned by '{pin.text}'" if pin else None, segments=segments if len(segments) > 1 else None)
        entries.append(e.model_copy(update={"bpp": e.storage_bits / e.numel}))
    counted_bits = problem.total_bits(assignment.choice)
    locked_bits = sum(e.storage_bits for e in entries if e.locked)
    cal = table.meta.get("calibration")
    return Plan(
        tool=f"bitalloc {__version__}",
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        model=ModelInfo(path=str(ckpt.path), arch=ckpt.arch, config_sha256=ckpt.config_sha256,
                        index_sha256=ckpt.index_sha256),
        budget=BudgetInfo(target=budget.text, unit=budget.unit, target_bits=problem.budget_bits,
                          achieved_bpp=counted_bits / problem.counted_params, achieved_bytes=(counted_bits + 7) // 8,
                          counted_params=problem.counted_params, total_bytes=(counted_bits + locked_bits + 7) // 8),
        candidates=list(problem.candidates),
        tie_groups=inv.tie_groups,
        entries=entries,
        solver=SolverInfo(name=assignment.solver, status=assignment.status, objective=assignment.objective,
                          bound=assignment.bound, gap=assignment.gap, seconds=assignment.seconds,
                          objective_scale=assignment.objective_scale, note=assignment.note, granularity=granularity),
        constraints=constraints_info,
        calibration=CalibrationInfo(**cal) if cal else None,
        scores=ScoresInfo(predictor=table.score, formula=table.meta.get("formulas", {}).get(table.score, ""),
                          calibration_loss=table.meta.get("calibration_loss")),
        timings=timings or {},
    )


def frontier(model: str | Path, targets: Sequence[float], calib: Optional[str | Path] = None,
             scores: Optional[str | Path | ErrorTable] = None, eval_text: Optional[str | Path] = None,
             eval_tokens: int = EVAL_TOKENS, track: Tracker = SILENT, **kwargs) -> list["FrontierPoint"]:
    """Plans for every bpp in ``targets`` from one error table; optionally their held-out perplexity.

    ``kwargs`` are passed to :func:`allocate` (candidates, solver, constraints, ...).
    """
    from .frontier import sweep

    if scores is None:
        if calib is None:
            raise BitallocError("give calibration text (--calib) or a saved score file (--scores)")
        keys = ("candidates", "calib_tokens", "seqlen", "seed", "device")
        scores = compute_scores(model, calib, track=track, **{k: kwargs[k] for k in keys if k in kwargs})
    elif not isinstance(scores, ErrorTable):
        scores = ErrorTable.load(scores)
    task = track.task("frontier (solve)", len(targets))

    def solve_one(bpp: float) -> Plan:
        try:
            return allocate(model, f"{bpp:g}bpp", scores=scores, **kwargs)
        finally:
            task.advance()

    points = sweep(solve_one, targets)
    if eval_text is not None:
        device = kwargs.get("device", "auto")
        for p in points:
            p.perplexity = evaluate(model, eval_text, plan=p.plan, tokens=eval_tokens, device=device,
                                    track=track).perplexity
    return points


def evaluate(model: str | Path, text: str | Path, plan: Optional[Plan | str | Path] = None, bits: Optional[int] = None,
             group_size: int = 128, tokens: int = EVAL_TOKENS, seqlen: int = EVAL_SEQLEN, device: str = "auto",
             track: Tracker = SILENT) -> "EvalResult":
    """Held-out perplexity after RTN fake-quantization by ``plan`` or uniform ``bits`` (neither: unquantized)."""
    from .eval import perplexity

    if plan is not None and not isinstance(plan, Plan):
        plan = Plan.load(plan)
    return perplexity(Checkpoint(model), text, plan=plan, bits=bits, group_size=group_size, tokens=tokens,
                      seqlen=seqlen, device=device, track=track)
