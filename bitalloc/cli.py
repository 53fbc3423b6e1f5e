"""Command line: ``allocate`` and ``bitalloc <command>``, a thin typer layer over :mod:`bitalloc.api`.

Exit codes: 0 success; 2 bad input (missing or corrupt files, unsupported architecture,
unparsable or infeasible budget, unwritable output, plan for another model), reported as
one line on stderr with nothing written; 1 an internal error (a bug: please report it with
the traceback).
"""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path
from typing import Callable, Optional

import typer

from .errors import BitallocError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Mixed-precision bit allocation for LLM weights, solved exactly under a budget.")

EXIT_USAGE = 2


def _user_errors(fn: Callable) -> Callable:
    """Turn BitallocError into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        warnings.formatwarning = lambda msg, *a, **k: f"warning: {msg}\n"
        try:
            return fn(*args, **kwargs)
        except BitallocError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(EXIT_USAGE) from None

    return wrapper


def _parse_candidates(text: str):
    from .plan import Candidate

    try:
        return [Candidate(bits=int(b), group_size=int(g)) for b, g in
                (item.split("g") if "g" in item else (item, "128") for item in text.split(","))]
    except ValueError:
        raise BitallocError(f"cannot parse --candidates {text!r}: use e.g. '2,3,4,8' or '2g64,3g128,4g128'") from None


_SOLVER_HELP = "auto (exact; Lagrangian beyond 2e5 groups) | ilp | lagrangian | closed-form | greedy."
_SCORE_HELP = ("Predictor the solver minimises: gradient (default) | fisher | hessian | hessian_diag | baq | spectral | "
               "importance | combined (docs/sensitivity.md).")
_GRANULARITY_HELP = "tensor (default) | expert (one width per MoE expert) | slab (per 128 input columns)."
_PIN_HELP = "Fix tensors matching REGEX (re.search on the tensor name): 'REGEX=BITS' or 'REGEX=BITSgGROUP'. Repeatable."


def _constraints(pin: list[str], min_bits: Optional[int], max_bits: Optional[int], role_bits: list[str],
                 bits_range: list[str]):
    from .allocator import Constraints

    return Constraints(tuple(pin), min_bits, max_bits, tuple(role_bits), tuple(bits_range))


def _time_table(path: Optional[Path]) -> Optional[dict[str, float]]:
    if path is None:
        return None
    try:
        table = json.loads(path.read_text())
        return {str(k): float(v) for k, v in table.items()}
    except (OSError, ValueError, AttributeError, TypeError):
        raise BitallocError(f"cannot read time table {path}: expected JSON {{candidate id: seconds per parameter}}") from None


@app.command("allocate")
@_user_errors
def allocate_cmd(
    model: Path = typer.Argument(..., help="Local model directory (config.json + safetensors)."),
    budget: str = typer.Option(..., "--budget", "-b", help="'2.5bpp', '2.5', or a size of quantized tensors: '900MB', '3GiB'."),
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the plan JSON."),
    calib: Optional[Path] = typer.Option(None, "--calib", help="Calibration text: .txt, .jsonl ('text'), optionally .xz/.gz."),
    scores: Optional[Path] = typer.Option(None, "--scores", help="Re-solve from a saved error table instead of calibrating."),
    save_scores: Optional[Path] = typer.Option(None, "--save-scores", help="Save the computed error table here."),
    candidates: str = typer.Option("2,3,4,8", help="Bit widths (optionally with group: '2g64,4g128'); default group 128."),
    solver: str = typer.Option("auto", help=_SOLVER_HELP),
    score: Optional[str] = typer.Option(None, "--score", help=_SCORE_HELP),
    granularity: str = typer.Option("tensor", help=_GRANULARITY_HELP),
    pin: list[str] = typer.Option([], "--pin", help=_PIN_HELP),
    min_bits: Optional[int] = typer.Option(None, help="Lowest bit width any unpinned tensor may get."),
    max_bits: Optional[int] = typer.Option(None, help="Highest bit width any unpinned tensor may get."),
    role_bits: list[str] = typer.Option([], "--role-bits", help="Per-role range 'ROLE=LO:HI' (e.g. attn_v=4:8). Repeatable."),
    bits_range: list[str] = typer.Option([], "--bits-range", help="Range for tensors matching REGEX: 'REGEX=LO:HI' (per layer: 'layers\\.0\\.=4:8'). Repeatable."),
    time_table: Optional[Path] = typer.Option(None, help="JSON {candidate id: kernel seconds per parameter}."),
    time_budget: Optional[float] = typer.Option(None, help="Total kernel seconds allowed (needs --time-table)."),
    calib_tokens: int = typer.Option(32768, help="Calibration tokens (windows of --seqlen)."),
    seqlen: int = typer.Option(512, help="Calibration window length in tokens."),
    seed: int = typer.Option(0, help="Seed for calibration window sampling and the solver."),
    include_lm_head: bool = typer.Option(False, help="Quantize lm_head too (locked by default)."),
    include_embeddings: bool = typer.Option(False, help="Quantize the token embedding too (locked by default)."),
    device: str = typer.Option("auto", help="'cpu', 'cuda', 'cuda:N' or 'auto'."),
    time_limit: float = typer.Option(60.0, help="Solver time limit in seconds; the plan reports the gap if it is hit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or summary."),
) -> None:
    """Choose bits for every tensor so that the model meets the budget exactly."""
    from .api import allocate
    from .plan import check_writable
    from .progress import tracker

    check_writable(output)
    if save_scores is not None:
        check_writable(save_scores)
    with tracker(quiet) as track:
        plan = allocate(model, budget, calib=calib, scores=scores, candidates=_parse_candidates(candidates),
                        calib_tokens=calib_tokens, seqlen=seqlen, seed=seed, include_lm_head=include_lm_head,
                        include_embeddings=include_embeddings, device=device, save_scores=save_scores,
                        solver=solver, constraints=_constraints(pin, min_bits, max_bits, role_bits, bits_range),
                        granularity=granularity, time_table=_time_table(time_table), time_budget=time_budget, time_limit_s=time_limit,
                        score=score, track=track)
    plan.save(output)
    if not quiet:
        typer.echo(plan.summary())
        typer.echo(f"\nwrote {output}" + (f" and {save_scores}" if save_scores else ""))


@app.command("frontier")
@_user_errors
def frontier_cmd(
    model: Path = typer.Argument(..., help="Local model directory."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for plan-<bpp>.json, frontier.csv, frontier.png."),
    calib: Optional[Path] = typer.Option(None, "--calib", help="Calibration text (one sensitivity pass for all budgets)."),
    scores: Optional[Path] = typer.Option(None, "--scores", help="A saved error table instead of --calib."),
    start: float = typer.Option(2.0, "--from", help="First budget (bpp)."),
    stop: float = typer.Option(4.5, "--to", help="Last budget (bpp)."),
    step: float = typer.Option(0.125, "--step", help="Budget step (bpp)."),
    eval_text: Optional[Path] = typer.Option(None, "--eval", help="Also measure held-out perplexity of every plan."),
    eval_tokens: int = typer.Option(32768, help="Tokens of --eval text (first N, windows of 512)."),
    candidates: str = typer.Option("2,3,4,8", help="Bit widths (optionally with group)."),
    solver: str = typer.Option("auto", help=_SOLVER_HELP),
    score: Optional[str] = typer.Option(None, "--score", help=_SCORE_HELP),
    granularity: str = typer.Option("tensor", help=_GRANULARITY_HELP),
    pin: list[str] = typer.Option([], "--pin", help=_PIN_HELP),
    min_bits: Optional[int] = typer.Option(None),
    max_bits: Optional[int] = typer.Option(None),
    role_bits: list[str] = typer.Option([], "--role-bits"),
    bits_range: list[str] = typer.Option([], "--bits-range"),
    calib_tokens: int = typer.Option(32768),
    seqlen: int = typer.Option(512),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Solve every budget of a sweep from one sensitivity pass; write plans, a CSV and a plot."""
    from .api import frontier
    from .frontier import budgets, write_frontier
    from .progress import tracker

    if output.exists() and not output.is_dir():
        raise BitallocError(f"cannot write {output}: it exists and is not a directory")
    targets = budgets(start, stop, step)
    with tracker(quiet) as track:
        points = frontier(model, targets, calib=calib, scores=scores, candidates=_parse_candidates(candidates),
                          calib_tokens=calib_tokens, seqlen=seqlen, seed=seed, device=device, solver=solver,
                          granularity=granularity, score=score,
                          constraints=_constraints(pin, min_bits, max_bits, role_bits, bits_range), eval_text=eval_text,
                          eval_tokens=eval_tokens, track=track)
    written = write_frontier(output, points)
    if not quiet:
        for p in points:
            ppl = "" if p.perplexity is None else f"  ppl {p.perplexity:.4f}"
            typer.echo(f"{p.target_bpp:>6g} bpp -> {p.plan.budget.achieved_bpp:.4f}  predicted "
                       f"{p.plan.solver.objective:.5f}  {p.plan.solver.status}{ppl}")
        typer.echo(f"wrote {len(written)} files to {output}")


@app.command("eval")
@_user_errors
def eval_cmd(
    model: Path = typer.Argument(..., help="Local model directory."),
    text: Path = typer.Option(..., "--text", help="Held-out text (.txt/.jsonl, optionally .xz); never the calibration file."),
    plan: Optional[Path] = typer.Option(None, "--plan", help="Plan JSON to apply with RTN."),
    bits: Optional[int] = typer.Option(None, "--bits", help="Uniform RTN bits instead of a plan."),
    group: int = typer.Option(128, "--group", help="Group size for --bits."),
    tokens: int = typer.Option(32768, help="Evaluate the first N tokens."),
    seqlen: int = typer.Option(512, help="Window length."),
    device: str = typer.Option("auto", help="'cpu', 'cuda', 'cuda:N' or 'auto'."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Held-out perplexity after RTN fake-quantization (fixed protocol, see docs/eval.md)."""
    from .api import evaluate
    from .progress import tracker

    if plan is not None and bits is not None:
        raise BitallocError("give either --plan or --bits, not both")
    with tracker(quiet) as track:
        r = evaluate(model, text, plan=plan, bits=bits, group_size=group, tokens=tokens, seqlen=seqlen,
                     device=device, track=track)
    if as_json:
        typer.echo(json.dumps({"perplexity": r.perplexity, "loss": r.loss, "tokens": r.tokens, "seconds": r.seconds,
                               "label": r.label, "plan": str(plan) if plan else None}))
    else:
        typer.echo(f"{r.label}: perplexity {r.perplexity:.4f} (loss {r.loss:.4f}, {r.tokens} tokens, {r.seconds:.1f} s)")


@app.command("scores")
@_user_errors
def scores_cmd(
    model: Path = typer.Argument(..., help="Local model directory."),
    calib: Path = typer.Option(..., "--calib", help="Calibration text."),
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the error table (.safetensors)."),
    candidates: str = typer.Option("2,3,4,8", help="Bit widths (optionally with group)."),
    calib_tokens: int = typer.Option(32768),
    seqlen: int = typer.Option(512),
    seed: int = typer.Option(0),
    include_lm_head: bool = typer.Option(False),
    include_embeddings: bool = typer.Option(False),
    device: str = typer.Option("auto"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Compute and save the error table only; `allocate --scores` re-solves any budget from it."""
    from .api import compute_scores
    from .plan import check_writable
    from .progress import tracker

    check_writable(output)
    with tracker(quiet) as track:
        table = compute_scores(model, calib, _parse_candidates(candidates), calib_tokens, seqlen, seed,
                               include_lm_head, include_embeddings, device, track)
    table.save(output)
    if not quiet:
        typer.echo(f"wrote {output}: {len(table.tensors)} tensors x {len(table.candidates)} candidates; "
                   f"scores {', '.join(sorted(table.scores))} (default {table.score})")
        times = ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in table.meta.get("timings", {}).items())
        typer.echo(f"timings: {times}")


@app.command("show")
@_user_errors
def show_cmd(plan: Path = typer.Argument(..., help="Plan JSON.")) -> None:
    """Validate a plan and print its summary."""
    from .plan import Plan

    typer.echo(Plan.load(plan).summary())


@app.command("export")
@_user_errors
def export_cmd(
    plan: Path = typer.Argument(..., help="Plan JSON."),
    to: str = typer.Option(..., "--to", help="gptqmodel | compressed-tensors | llmcompressor-recipe | llamacpp | autoround | torchao."),
    output: Path = typer.Option(..., "--output", "-o", help="File to write."),
) -> None:
    """Write the plan as another quantizer's config (README: 'Use your plan with ...')."""
    from .export import export_plan
    from .plan import Plan, atomic_write_text, check_writable

    check_writable(output)
    text, notes = export_plan(Plan.load(plan), to)
    atomic_write_text(output, text)
    for n in notes:
        typer.echo(f"note: {n}", err=True)
    typer.echo(f"wrote {output}")


@app.command("import")
@_user_errors
def import_cmd(
    config: Path = typer.Argument(..., help="GPTQModel quantize_config, compressed-tensors config or AutoRound layer_config (JSON)."),
    model: Path = typer.Option(..., "--model", help="The model the config quantizes."),
    output: Path = typer.Option(..., "--output", "-o", help="Plan JSON to write."),
    scores: Optional[Path] = typer.Option(None, "--scores", help="Error table to fill in predicted errors."),
) -> None:
    """Read another quantizer's config into a plan (exact bits per tensor)."""
    from .importer import import_config
    from .plan import check_writable

    check_writable(output)
    plan = import_config(config, model, scores)
    plan.save(output)
    typer.echo(f"wrote {output}: {plan.budget.achieved_bpp:.4f} bpp ({plan.solver.name})")


@app.command("diff")
@_user_errors
def diff_cmd(
    a: Path = typer.Argument(..., help="First plan."),
    b: Path = typer.Argument(..., help="Second plan."),
    scores: Optional[Path] = typer.Option(None, "--scores", help="Error table: show each plan's predicted error."),
) -> None:
    """Per-layer differences, bpp and predicted error of two plans of one model."""
    from .diff import diff_plans
    from .plan import Plan
    from .scores import ErrorTable

    table = ErrorTable.load(scores) if scores is not None else None
    typer.echo(diff_plans(Plan.load(a), Plan.load(b), table, (a.name, b.name)))


@app.command("report")
@_user_errors
def report_cmd(
    plans: list[Path] = typer.Argument(..., help="One plan, or several plans of one model for a frontier plot."),
    png: Path = typer.Option(..., "--png", help="Image to write."),
) -> None:
    """One plan: heatmap of bits by layer x role (and expert), histogram, target vs achieved.
    Several plans: their predicted error against achieved bpp (the frontier)."""
    from .frontier import FrontierPoint, frontier_png
    from .plan import Plan, atomic_write_bytes, check_writable
    from .report import render

    check_writable(png)
    loaded = [Plan.load(p) for p in plans]
    if len(loaded) == 1:
        atomic_write_bytes(png, render(loaded[0]))
    else:
        points = sorted((FrontierPoint(p.budget.achieved_bpp, p) for p in loaded), key=lambda x: x.target_bpp)
        atomic_write_bytes(png, frontier_png(points))
    typer.echo(f"wrote {png}")


def main() -> None:
    app()


def allocate_main() -> None:
    """The ``allocate`` console script: ``bitalloc allocate`` as a command of its own."""
    single = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    single.command()(allocate_cmd)
    single()
