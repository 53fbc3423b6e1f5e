"""Allocation: an error table from calibration text (or a saved one), solved into a plan for a budget.

Example::

    import bitalloc
    plan = bitalloc.allocate("./my-model", budget="2.5bpp", calib="data.txt")
    plan.save("plan.json")
    cal = bitalloc.CalibrationConfig(tokens=16384, include_lm_head=True)
    points = bitalloc.frontier("./my-model", [2.5, 3.0], calib="data.txt", calibration=cal)

torch and transformers are imported only by the steps that run the model, so re-solving a saved
error table (``allocate --scores``) starts in well under a second.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from .. import __version__
from ..allocator import Assignment, Problem, solve as run_solver
from ..allocator.frontier import FrontierPoint, sweep
from ..allocator.units import segments_of
from ..budget import GGUF_LAYOUT, STORAGE_LAYOUT, Budget, parse_budget
from ..errors import BitallocError, ScoresError
from ..model.calib import EVAL_TOKENS
from ..plan import (LOCKED_BITS, BudgetInfo, CalibrationInfo, Candidate, ConstraintsInfo, Entry, ModelInfo, Plan,
                    ScoresInfo, SolverInfo)
from ..progress import SILENT, Tracker
from ..sensitivity.table import ErrorTable
from .config import CalibrationConfig, SolveConfig, check_seqlen
from .context import ModelContext

if TYPE_CHECKING:
    from ..model.checkpoint import Checkpoint

GRADIENT_MIN_SEQUENCES = 32


def writes_outputs() -> bool:
    """Whether this process writes results: always, except on ranks other than 0 of a torchrun launch,
    which compute their share of the calibration pass and leave writing to rank 0. Read from torchrun's
    environment, so it is known before the group is joined and without importing torch."""
    return int(os.environ.get("WORLD_SIZE", "1")) <= 1 or os.environ.get("RANK", "0") == "0"


def compute_scores(model: str | Path, calib: str | Path, calibration: Optional[CalibrationConfig] = None,
                   track: Tracker = SILENT, *, imatrix: Optional[str | Path] = None) -> ErrorTable:
    """One calibration pass: every score family's predicted error of every unit at every candidate.

    Launched by torchrun (``torchrun --nproc-per-node N $(which bitalloc) scores ...``), the pass is
    spread over the processes (``model.distributed``) and every rank returns the same table. ``imatrix``:
    where to write llama.cpp's importance matrix from the same pass (``--target llamacpp``), written here
    because the checkpoint and its inventory are open here.
    """
    calibration = _with_imatrix(calibration or CalibrationConfig(), imatrix)
    ctx = ModelContext.build(model, calibration, SolveConfig())
    table = _measure(ctx, calib, calibration, track, with_combined=True)
    _write_imatrix(ctx, table, imatrix)
    return table


def _with_imatrix(calibration: CalibrationConfig, imatrix: Optional[str | Path]) -> CalibrationConfig:
    """``calibration`` collecting the activation sums an importance matrix needs when one is to be written."""
    return replace(calibration, imatrix=True) if imatrix is not None and not calibration.imatrix else calibration


def _write_imatrix(ctx: ModelContext, table: ErrorTable, imatrix: Optional[str | Path]) -> None:
    """Write ``table``'s importance matrix to ``imatrix`` when asked, on the one process that writes outputs."""
    if imatrix is not None and writes_outputs():
        from .imatrix import write_imatrix

        write_imatrix(table, ctx.ckpt, ctx.inv, imatrix)


def calibration_ids(ckpt: "Checkpoint", calib: str | Path, calibration: CalibrationConfig):
    """(hashed tokens, [n, seqlen] windows) of the calibration text, as every calibration pass samples them."""
    from ..model.calib import calibration_windows, tokenize_hashed

    check_seqlen(ckpt, calibration.seqlen)
    tokens = tokenize_hashed(ckpt.path, calib, calibration.tokens)
    return tokens, calibration_windows(tokens.ids, calibration.tokens, calibration.seqlen, calibration.seed)


def _measure(ctx: ModelContext, calib: str | Path, calibration: CalibrationConfig, track: Tracker,
             with_combined: bool) -> ErrorTable:
    from ..model import distributed
    from ..model.layerwise import resolve_device, run_workdir
    from ..rounding.config import RoundingConfig
    from ..sensitivity.collect import measure_errors

    resolve_device(calibration.device)  # a bad device fails before tokenizing
    _, device = distributed.init_from_env(calibration.device)  # under torchrun: join the group, pick this rank's GPU
    with run_workdir(calibration.workdir) as workdir:  # an unusable --workdir fails before tokenizing too
        tokens, windows = calibration_ids(ctx.ckpt, calib, calibration)
        table = measure_errors(ctx.ckpt, ctx.inv, windows, list(calibration.candidates), device=device,
                               track=track, workdir=workdir, seed=calibration.seed, with_combined=with_combined,
                               rounding=RoundingConfig() if calibration.rounding == "gptq" else None,
                               imatrix=calibration.imatrix,
                               resume=(calibration.workdir or tempfile.gettempdir()) if calibration.resume else None)
    table.meta["calibration"] = {"file": str(calib), "sha256": tokens.sha256, "tokens": int(windows.numel()),
                                 "seqlen": calibration.seqlen, "seed": calibration.seed}
    return table


def allocate(model: str | Path, budget: str | float, calib: Optional[str | Path] = None, *,
             scores: Optional[str | Path | ErrorTable] = None, calibration: Optional[CalibrationConfig] = None,
             solve: Optional[SolveConfig] = None, save_scores: Optional[str | Path] = None,
             imatrix: Optional[str | Path] = None, track: Tracker = SILENT) -> Plan:
    """Choose bits for every tensor of ``model`` so that the total meets ``budget`` exactly.

    Args:
        model: local Hugging Face model directory (config.json + safetensors).
        budget: ``"2.5bpp"``, ``2.5`` or a byte size (``"900MB"``, ``"3GiB"``) of the quantized tensors.
        calib: calibration text (.txt, .jsonl, optionally .xz/.gz); needed unless ``scores`` is given.
        scores: a saved error table (path or object) to re-solve without recomputing sensitivities.
        calibration: how the calibration pass runs (tokens, seqlen, seed, device, include flags, candidates).
        solve: solver, score, granularity, constraints, time table/budget, time limit (see :class:`SolveConfig`).
        save_scores: where to save the error table computed from ``calib``.
        imatrix: where to write llama.cpp's importance matrix from the calibration pass (``--target
            llamacpp``; the plan then predicts the errors of ``llama-quantize --imatrix`` with it).
    Returns:
        The validated :class:`Plan`; nothing is written unless ``save_scores`` or ``imatrix`` is set.
    """
    t_start = time.perf_counter()
    calibration, solve = _with_imatrix(calibration or CalibrationConfig(), imatrix), solve or SolveConfig()
    ctx = ModelContext.build(model, calibration, solve)
    parsed = parse_budget(budget)
    if solve.method == "bitsmoe":
        from .bitsmoe import allocate_bitsmoe

        return allocate_bitsmoe(ctx, parsed, calib, scores, calibration, save_scores, track, t_start)
    problem = ctx.problem(parsed)  # an unreachable budget fails before the (long) calibration pass
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    table = _table(ctx, calib, scores, calibration, solve, track)
    if scores is None:
        timings["sensitivity_s"] = time.perf_counter() - t0
        if save_scores is not None and writes_outputs():
            table.save(save_scores)
    _write_imatrix(ctx, table, imatrix)
    plan = _solve(ctx, problem, table, parsed, calibration.seed, track)
    return plan.model_copy(update={"timings": {**timings, "solve_s": plan.solver.seconds,
                                               "total_s": time.perf_counter() - t_start}})


def _table(ctx: ModelContext, calib: Optional[str | Path], scores: Optional[str | Path | ErrorTable],
           calibration: CalibrationConfig, solve: SolveConfig, track: Tracker) -> ErrorTable:
    """The error table to solve from, set to ``solve.score``: loaded and checked, or computed from ``calib``."""
    if scores is not None:
        table = scores if isinstance(scores, ErrorTable) else ErrorTable.load(scores)
        table.check_matches(ctx.ckpt.config_sha256, ctx.ckpt.index_sha256, ctx.candidates, ctx.needs_errors)
        made_for = table.meta.get("rounding", "rtn")
        if made_for != calibration.rounding:
            raise ScoresError(f"the score file predicts {made_for.upper()}'s errors, not {calibration.rounding.upper()}'s; "
                              f"use --rounding {made_for} or recompute with --calib")
        if bool(table.meta.get("imatrix")) != calibration.imatrix:
            raise ScoresError("the score file predicts llama-quantize's errors "
                              + ("with" if table.meta.get("imatrix") else "without")
                              + " an importance matrix; " + ("drop --imatrix" if not calibration.imatrix else
                                                              "recompute with --calib --imatrix FILE"))
        if calib is not None:  # both given: the table must come from this calibration text
            from ..model.calib import file_sha256

            table.check_calibration(file_sha256(calib), calibration.seqlen, calibration.seed)
    elif calib is not None:
        from ..sensitivity.collect import SCORE_NAMES

        if solve.score not in SCORE_NAMES:  # before the long pass
            raise ScoresError(f"unknown score {solve.score!r}; choose one of {', '.join(SCORE_NAMES)}")
        # the measured sample behind `combined` is only paid for when it is asked for
        table = _measure(ctx, calib, calibration, track, with_combined=solve.score == "combined")
    else:
        raise BitallocError("give calibration text (--calib) or a saved score file (--scores)")
    table = table.using(solve.score)
    _warn_if_weak(table)
    return table


def _solve(ctx: ModelContext, problem: Problem, table: ErrorTable, budget: Budget, seed: int, track: Tracker) -> Plan:
    problem = ctx.with_table(problem, table)
    task = track.task(f"solve ({ctx.solve.solver})", 1)
    assignment = run_solver(problem, ctx.solve.solver, time_limit_s=ctx.solve.time_limit_s, seed=seed)
    task.advance()
    return build_plan(ctx, problem, assignment, table, budget)


def _warn_if_weak(table: ErrorTable) -> None:
    """Say when the chosen score rests on less than it should.

    ``gradient`` averages n_seq squared dot products per unit, so with few sequences it is noisy
    (measured on llama-dense-16m: Spearman with the truth 0.92 at 64 sequences, 0.85 at 8, while
    ``fisher``, a sum over all weights, stays at 0.97; docs/sensitivity.md). ``combined`` falls back to
    ``fisher`` when too few units could be sampled to fit it.
    """
    n = table.meta.get("calib_sequences")
    if table.score == "gradient" and n is not None and n < GRADIENT_MIN_SEQUENCES:
        warnings.warn(f"only {n} calibration sequences: the gradient score is noisy below "
                      f"{GRADIENT_MIN_SEQUENCES}; use more --calib-tokens or --score fisher", stacklevel=4)
    note = (table.meta.get("combined") or {}).get("note")
    if table.score == "combined" and note:
        warnings.warn(f"the combined score could not be fitted ({note})", stacklevel=4)


def build_plan(ctx: ModelContext, problem: Problem, assignment: Assignment, table: ErrorTable, budget: Budget) -> Plan:
    """Assemble the validated plan for ``assignment`` (any solver or baseline); timings are left empty."""
    inv, constraints = ctx.inv, ctx.solve.constraints
    du = ctx.units
    choices = problem.unit_choices(assignment.choice)
    owner_of = {u.tensor: i for i, u in enumerate(inv.quantized)}
    first_unit: dict[int, int] = {}
    for n, owner in enumerate(du.owner):
        first_unit.setdefault(owner, n)
    entries = []
    for u in inv.units:
        common = dict(tensor=u.tensor, module=u.module, shape=list(u.shape), numel=u.numel, layer=u.layer,
                      role=u.role, expert=u.expert, source=u.source)
        if u.locked:
            entries.append(Entry(**common, bits=LOCKED_BITS, bpp=float(LOCKED_BITS), locked=True, reason=u.reason))
            continue
        segments = segments_of(du, owner_of[u.tensor], choices, problem.candidates)
        if len(segments) == 1:  # the tensor's one choice, ggml type included
            c = problem.candidates[choices[first_unit[owner_of[u.tensor]]]]
        else:
            widest = max(segments, key=lambda g: (g.bits, g.group_size))
            c = Candidate(bits=widest.bits, group_size=widest.group_size, symmetric=widest.symmetric)
        pred = {}
        if table.has(u.tensor):
            r = table.row(u.tensor)
            pred = {cand.id: float(table.errors[r, table.column(cand)]) for cand in problem.candidates}
        pin = constraints.pin_for(u.tensor, ctx.aliases.get(u.tensor, ()))
        e = Entry(**common, bits=c.bits, group_size=c.group_size, symmetric=c.symmetric, ggml=c.ggml, bpp=0.0,
                  predicted_error=pred,
                  reason=f"pinned by '{pin.text}'" if pin else None, segments=segments if len(segments) > 1 else None)
        entries.append(e.model_copy(update={"bpp": e.storage_bits / e.numel}))
    counted_bits = problem.total_bits(assignment.choice)
    locked_bits = sum(e.storage_bits for e in entries if e.locked)
    cal = table.meta.get("calibration")
    ckpt = ctx.ckpt
    file_bytes = ctx.gguf.file_bytes({e.tensor: e.storage_bits for e in entries if not e.locked}) \
        if ctx.is_gguf else None
    return Plan(
        layout=GGUF_LAYOUT if ctx.is_gguf else STORAGE_LAYOUT,
        tool=f"bitalloc {__version__}",
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        model=ModelInfo(path=str(ckpt.path), arch=ckpt.arch, config_sha256=ckpt.config_sha256,
                        index_sha256=ckpt.index_sha256),
        budget=BudgetInfo(target=budget.text, unit=budget.unit, target_bits=problem.budget_bits,
                          achieved_bpp=counted_bits / problem.counted_params, achieved_bytes=(counted_bits + 7) // 8,
                          counted_params=problem.counted_params, total_bytes=(counted_bits + locked_bits + 7) // 8,
                          file_bytes=file_bytes),
        candidates=list(problem.candidates),
        tie_groups=ctx.tie_groups,
        entries=entries,
        solver=SolverInfo(name=assignment.solver, status=assignment.status, objective=assignment.objective,
                          bound=assignment.bound, gap=assignment.gap, seconds=assignment.seconds,
                          objective_scale=assignment.objective_scale, note=assignment.note,
                          granularity=ctx.solve.granularity),
        constraints=_constraints_info(ctx.solve),
        calibration=CalibrationInfo(**cal) if cal else None,
        scores=ScoresInfo(predictor=table.score, formula=table.meta.get("formulas", {}).get(table.score, ""),
                          calibration_loss=table.meta.get("calibration_loss"),
                          rounding=table.meta.get("rounding", "rtn")),
    )


def _constraints_info(solve: SolveConfig) -> Optional[ConstraintsInfo]:
    c = solve.constraints
    if c.empty and solve.time_budget is None:
        return None
    return ConstraintsInfo(pins=list(c.pins), min_bits=c.min_bits, max_bits=c.max_bits, role_bits=list(c.role_bits),
                           bits_ranges=list(c.bits_ranges), time_budget=solve.time_budget)


def frontier(model: str | Path, targets: Sequence[float], calib: Optional[str | Path] = None, *,
             scores: Optional[str | Path | ErrorTable] = None, calibration: Optional[CalibrationConfig] = None,
             solve: Optional[SolveConfig] = None, eval_text: Optional[str | Path] = None, eval_tokens: int = EVAL_TOKENS,
             track: Tracker = SILENT) -> list[FrontierPoint]:
    """Plans for every bpp in ``targets`` from one error table; optionally their held-out perplexity.

    The checkpoint is opened, the inventory and the problem's structure built, and the held-out text
    tokenized once for the whole sweep; budgets the candidates cannot reach are skipped with a warning.
    """
    from .evaluation import Evaluator

    calibration, solve = calibration or CalibrationConfig(), solve or SolveConfig()
    if solve.method != "per-tensor":
        raise BitallocError(f"frontier solves per-tensor plans only; run `allocate --method {solve.method}` per budget")
    ctx = ModelContext.build(model, calibration, solve)
    targets = list(targets)
    table = _table(ctx, calib, scores, calibration, solve, track)
    task = track.task("frontier (solve)", len(targets))

    def solve_one(bpp: float) -> Plan:
        try:
            budget = parse_budget(f"{bpp:g}bpp")
            t0 = time.perf_counter()
            plan = _solve(ctx, ctx.problem(budget), table, budget, calibration.seed, SILENT)
            return plan.model_copy(update={"timings": {"solve_s": plan.solver.seconds,
                                                       "total_s": time.perf_counter() - t0}})
        finally:
            task.advance()

    points = sweep(solve_one, targets)
    if eval_text is not None:
        evaluator = Evaluator(ctx.ckpt, eval_text, tokens=eval_tokens, device=calibration.device)
        for p in points:
            p.perplexity = evaluator.run(plan=p.plan, track=track).perplexity
    return points

