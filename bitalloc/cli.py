"""Command line: ``allocate`` and ``bitalloc <command>``, a thin typer layer over :mod:`bitalloc.api`.

Exit codes: 0 success; 2 bad input (missing or corrupt files, unsupported architecture,
unparsable or infeasible budget, unwritable output, plan for another model), reported as
one line on stderr with nothing written; 1 an internal error (a bug: please report it with
the traceback).

Every option is declared once: the calibration options (shared by ``allocate``, ``frontier`` and
``scores``) and the solve options (``allocate`` and ``frontier``) are added to each command by a
decorator that hands them over as one :class:`~bitalloc.api.CalibrationConfig` or
:class:`~bitalloc.api.SolveConfig`, with the defaults of those configs.
"""

# No ``from __future__ import annotations`` here: typer reads these annotations at run time.

import functools
import inspect
import json
import signal
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Optional

import typer

from .errors import BitallocError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Mixed-precision bit allocation for LLM weights, solved exactly under a budget.")

EXIT_USAGE = 2


@contextmanager
def _plain_warnings() -> Iterator[None]:
    """Warnings as ``warning: ...`` lines for this command only (the process-wide format is restored)."""
    before = warnings.formatwarning
    warnings.formatwarning = lambda msg, *a, **k: f"warning: {msg}\n"
    try:
        yield
    finally:
        warnings.formatwarning = before


class _Terminated(BaseException):
    """SIGTERM or SIGHUP, raised in the main thread as SIGINT raises KeyboardInterrupt.

    A BaseException, so ``except Exception`` cannot swallow it, and every ``finally`` on the way out runs:
    the run's work directory and half-written temporary files are removed. Python's default for these
    signals is to die on the spot, leaving gigabytes of activation stores behind.
    """

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_TERMINATING = tuple(s for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)


@contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGTERM and SIGHUP raise :class:`_Terminated` while the command runs (previous handlers restored after).

    The first one raises; repeats are ignored so that cleanup (removing one directory) is not cut short.
    A signal the process already ignores stays ignored (``nohup bitalloc ...`` must survive a hangup).
    """

    def handler(signum: int, frame: Any) -> None:
        for s in previous:
            signal.signal(s, signal.SIG_IGN)
        raise _Terminated(signum)

    try:
        previous = {s: signal.signal(s, handler) for s in _TERMINATING if signal.getsignal(s) is not signal.SIG_IGN}
    except ValueError:  # only the main thread may set handlers; elsewhere the process keeps its own
        previous = {}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _user_errors(fn: Callable) -> Callable:
    """Turn BitallocError into one line on stderr and exit code 2; SIGTERM/SIGHUP into one line and 128 + signal."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _plain_warnings():
            try:
                with _signals_raise():
                    return fn(*args, **kwargs)
            except BitallocError as exc:
                typer.echo(f"error: {exc}", err=True)
                raise typer.Exit(EXIT_USAGE) from None
            except _Terminated as exc:
                typer.echo(f"error: stopped by {signal.Signals(exc.signum).name}; nothing written, temporary files "
                           "removed", err=True)
                raise typer.Exit(128 + exc.signum) from None

    return wrapper


@dataclass(frozen=True)
class _Option:
    """One option as typer reads it: parameter name, Annotated type and default."""

    name: str
    annotation: Any
    default: Any


def _options(target: str, options: tuple[_Option, ...], build: Callable[..., Any]) -> Callable[[Callable], Callable]:
    """Add ``options`` to a command's parameters and pass them to it as ``target=build(**values)``.

    The command declares ``target`` as a keyword-only parameter; typer sees the options instead.
    """
    names = [o.name for o in options]

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            values = {n: kwargs.pop(n) for n in names}
            return fn(*args, **kwargs, **{target: build(**values)})

        sig = inspect.signature(fn)
        params = [p for p in sig.parameters.values() if p.name != target]
        params += [inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, annotation=o.annotation, default=o.default)
                   for o in options]
        wrapper.__signature__ = sig.replace(parameters=params)
        wrapper.__annotations__ = {**{k: v for k, v in fn.__annotations__.items() if k != target},
                                   **{o.name: o.annotation for o in options}}
        del wrapper.__wrapped__  # typer must read the new signature, not the command's own
        return wrapper

    return decorate


def _calibration_options(only: Optional[tuple[str, ...]] = None) -> Callable[[Callable], Callable]:
    """The calibration options (``only`` these, when given; the others keep their defaults)."""
    from .api.config import TARGETS, CalibrationConfig, candidates_text, parse_candidates

    d = CalibrationConfig()

    def build(candidates: Optional[str] = None, calib_tokens: int = d.tokens, seqlen: int = d.seqlen,
              seed: int = d.seed, include_lm_head: Optional[bool] = None,
              include_embeddings: Optional[bool] = None, device: str = d.device,
              workdir: Optional[Path] = None, rounding: str = d.rounding, target: str = d.target,
              resume: bool = d.resume) -> CalibrationConfig:
        return CalibrationConfig(tokens=calib_tokens, seqlen=seqlen, seed=seed, device=device,
                                 include_lm_head=include_lm_head, include_embeddings=include_embeddings,
                                 candidates=None if candidates is None else tuple(parse_candidates(candidates)),
                                 workdir=None if workdir is None else str(workdir), rounding=rounding, target=target,
                                 resume=resume)

    opt = typer.Option
    options = (
        _Option("target", Annotated[str, opt(help="What the plan is for: compressed-tensors (bits + groups) or llamacpp "
                                                  "(ggml types, budgets in GGUF file bytes or llama.cpp's bpw; README "
                                                  "'llama.cpp').")], d.target),
        _Option("candidates", Annotated[Optional[str], opt(
            help="Bit widths, optionally with group: '2,3,4,8' or '2g64,4g128' (default group 128); with --target "
                 "llamacpp ggml types. Default: "
                 + "; ".join(f"{t} {candidates_text(c)}" for t, c in TARGETS.items()) + ".")], None),
        _Option("calib_tokens", Annotated[int, opt(help="Calibration tokens (windows of --seqlen).")], d.tokens),
        _Option("seqlen", Annotated[int, opt(help="Calibration window length in tokens.")], d.seqlen),
        _Option("seed", Annotated[int, opt(help="Seed for calibration window sampling and the solver.")], d.seed),
        _Option("include_lm_head", Annotated[Optional[bool], opt(
            "--include-lm-head/--no-include-lm-head",
            help="Quantize lm_head too (default: locked; quantized with --target llamacpp).")], None),
        _Option("include_embeddings", Annotated[Optional[bool], opt(
            "--include-embeddings/--no-include-embeddings",
            help="Quantize the token embedding too (default: locked; quantized with --target llamacpp).")], None),
        _Option("device", Annotated[str, opt(help="'cpu', 'cuda', 'cuda:N' or 'auto'.")], d.device),
        _Option("workdir", Annotated[Optional[Path], opt(help="Directory in which the run's work directory "
                                                              "(activation stores, removed at the end) is made; "
                                                              "default $TMPDIR.")], d.workdir),
        _Option("rounding", Annotated[str, opt(help="Whose weight error the table predicts: rtn, or gptq (a plan made "
                                                    "for `quantize --method gptq`; docs/sensitivity.md).")],
                d.rounding),
        _Option("resume", Annotated[bool, opt(help="Keep per-layer checkpoints of the calibration pass in --workdir "
                                                   "(default $TMPDIR) and continue an interrupted pass from them.")],
                d.resume),
    )
    return _options("calibration", tuple(o for o in options if only is None or o.name in only), build)


def _solve_options() -> Callable[[Callable], Callable]:
    from .api.config import SolveConfig

    d = SolveConfig()

    def build(solver: str, score: str, granularity: str, pin: list[str], min_bits: Optional[int],
              max_bits: Optional[int], role_bits: list[str], bits_range: list[str], time_table: Optional[Path],
              time_budget: Optional[float], time_limit: float, method: str, rank_slab: int,
              decompose: str) -> SolveConfig:
        from .api import Constraints

        return SolveConfig(solver=solver, score=score, granularity=granularity,
                           constraints=Constraints(tuple(pin), min_bits, max_bits, tuple(role_bits), tuple(bits_range)),
                           time_table=_time_table(time_table), time_budget=time_budget, time_limit_s=time_limit,
                           method=method, rank_slab=rank_slab, decompose=decompose)

    opt = typer.Option
    return _options("solve", (
        _Option("solver", Annotated[str, opt(help="auto (exact; Lagrangian beyond 2e5 groups) | ilp | lagrangian | "
                                                  "closed-form | greedy.")], d.solver),
        _Option("score", Annotated[str, opt(help="Predictor the solver minimises: gradient (default) | fisher | hessian "
                                                 "| hessian_diag | baq | spectral | importance | combined "
                                                 "(docs/sensitivity.md).")], d.score),
        _Option("granularity", Annotated[str, opt(help="tensor (default) | expert (one width per MoE expert) | slab "
                                                       "(per 128 input columns).")], d.granularity),
        _Option("pin", Annotated[list[str], opt(help="Fix tensors matching REGEX (re.search on the tensor name): "
                                                     "'REGEX=BITS' or 'REGEX=BITSgGROUP'. Repeatable.")], []),
        _Option("min_bits", Annotated[Optional[int], opt(help="Lowest bit width any unpinned tensor may get.")], None),
        _Option("max_bits", Annotated[Optional[int], opt(help="Highest bit width any unpinned tensor may get.")], None),
        _Option("role_bits", Annotated[list[str], opt(help="Per-role range 'ROLE=LO:HI' (e.g. attn_v=4:8). "
                                                           "Repeatable.")], []),
        _Option("bits_range", Annotated[list[str], opt(help="Range for tensors matching REGEX: 'REGEX=LO:HI' (per "
                                                            "layer: 'layers\\.0\\.=4:8'). Repeatable.")], []),
        _Option("time_table", Annotated[Optional[Path], opt(help="JSON {candidate id: kernel seconds per "
                                                                 "parameter}.")], None),
        _Option("time_budget", Annotated[Optional[float], opt(help="Total kernel seconds allowed (needs "
                                                                   "--time-table).")], d.time_budget),
        _Option("time_limit", Annotated[float, opt(help="Solver time limit in seconds; the plan reports the gap if "
                                                        "it is hit.")], d.time_limit_s),
        _Option("method", Annotated[str, opt(help="per-tensor (default) | bitsmoe (MoE experts as a shared SVD basis "
                                                  "plus factor slabs; needs --calib; docs/bitsmoe.md).")], d.method),
        _Option("rank_slab", Annotated[int, opt(help="--method bitsmoe: ranks per slab (one width per slab and "
                                                     "expert).")], d.rank_slab),
        _Option("decompose", Annotated[str, opt(help="--method bitsmoe: auto (default: each MoE layer decomposed "
                                                     "only where the solve finds it pays, else per tensor) | all "
                                                     "(every MoE layer, BitsMoE as published).")], d.decompose),
    ), build)


def _time_table(path: Optional[Path]) -> Optional[dict[str, float]]:
    if path is None:
        return None
    try:
        table = json.loads(path.read_text())
        return {str(k): float(v) for k, v in table.items()}
    except (OSError, ValueError, AttributeError, TypeError):
        raise BitallocError(f"cannot read time table {path}: expected JSON {{candidate id: seconds per parameter}}") from None


ModelArg = Annotated[Path, typer.Argument(help="Local model directory (config.json + safetensors).")]
Calib = Annotated[Optional[Path], typer.Option("--calib", help="Calibration text: .txt, .jsonl ('text'), "
                                                                "optionally .xz/.gz.")]
Scores = Annotated[Optional[Path], typer.Option("--scores", help="Re-solve from a saved error table instead of "
                                                                  "calibrating.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or summary.")]
Imatrix = Annotated[Optional[Path], typer.Option("--imatrix", help="Write llama.cpp's importance matrix (GGUF) from "
                                                                   "the calibration pass, for `llama-quantize "
                                                                   "--imatrix`; the errors predicted are then "
                                                                   "those of quantizing with it (--target llamacpp).")]
# ``ctx.params`` holds every option as given, also those an options decorator turned into a config:
# ``--time-table`` becomes a mapping in SolveConfig, but its file is still an input the output policy protects.


@app.command("allocate")
@_user_errors
@_calibration_options()
@_solve_options()
def allocate_cmd(
    ctx: typer.Context,
    model: ModelArg,
    budget: Annotated[str, typer.Option("--budget", "-b", help="'2.5bpp', '2.5', or a size of quantized tensors: "
                                                               "'900MB', '3GiB'.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the plan JSON.")],
    calib: Calib = None,
    scores: Scores = None,
    save_scores: Annotated[Optional[Path], typer.Option("--save-scores", help="Save the computed error table "
                                                                              "here.")] = None,
    imatrix: Imatrix = None,
    quiet: Quiet = False,
    *, calibration, solve,
) -> None:
    """Choose bits for every tensor so that the model meets the budget exactly."""
    from .api import allocate, writes_outputs
    from .api.outputs import Inputs, check_output_files
    from .progress import tracker

    inputs = Inputs.of({"the --calib text": calib, "the --scores file": scores,
                        "the --time-table file": ctx.params["time_table"]}, models=[model])
    check_output_files(inputs, output, save_scores, imatrix)
    quiet = quiet or not writes_outputs()
    with tracker(quiet) as track:
        plan = allocate(model, budget, calib, scores=scores, calibration=calibration, solve=solve,
                        save_scores=save_scores, imatrix=imatrix, track=track)
    if not writes_outputs():  # another torchrun rank: its share is done, rank 0 writes
        return
    plan.save(output)
    if not quiet:
        typer.echo(plan.summary())
        typer.echo(f"\nwrote {output}" + "".join(f" and {p}" for p in (save_scores, imatrix) if p))


@app.command("frontier")
@_user_errors
@_calibration_options()
@_solve_options()
def frontier_cmd(
    ctx: typer.Context,
    model: ModelArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for plan-<bpp>.json, frontier.csv, "
                                                                "frontier.png.")],
    calib: Calib = None,
    scores: Scores = None,
    start: Annotated[float, typer.Option("--from", help="First budget (bpp).")] = 2.0,
    stop: Annotated[float, typer.Option("--to", help="Last budget (bpp).")] = 4.5,
    step: Annotated[float, typer.Option("--step", help="Budget step (bpp).")] = 0.125,
    eval_text: Annotated[Optional[Path], typer.Option("--eval", help="Also measure held-out perplexity of every "
                                                                     "plan.")] = None,
    eval_tokens: Annotated[int, typer.Option(help="Tokens of --eval text (first N, windows of 512).")] = 32768,
    quiet: Quiet = False,
    *, calibration, solve,
) -> None:
    """Solve every budget of a sweep from one sensitivity pass; write plans, a CSV and a plot."""
    from .api import budgets, frontier, writes_outputs
    from .api.outputs import Inputs, check_output_dir
    from .progress import tracker
    from .report.frontier import FRONTIER_FILES, write_frontier

    inputs = Inputs.of({"the --calib text": calib, "the --scores file": scores, "the --eval text": eval_text,
                        "the --time-table file": ctx.params["time_table"]}, models=[model])
    check_output_dir(output, inputs, FRONTIER_FILES)
    targets = budgets(start, stop, step)
    quiet = quiet or not writes_outputs()
    with tracker(quiet) as track:
        points = frontier(model, targets, calib, scores=scores, calibration=calibration, solve=solve,
                          eval_text=eval_text, eval_tokens=eval_tokens, track=track)
    if not writes_outputs():  # another torchrun rank: its share is done, rank 0 writes
        return
    written = write_frontier(output, points)
    if not quiet:
        for p in points:
            ppl = "" if p.perplexity is None else f"  ppl {p.perplexity:.4f}"
            typer.echo(f"{p.target_bpp:>6g} bpp -> {p.plan.budget.achieved_bpp:.4f}  predicted "
                       f"{p.plan.solver.objective:.5f}  {p.plan.solver.status}{ppl}")
        typer.echo(f"wrote {len(written)} files to {output}")


@app.command("scores")
@_user_errors
@_calibration_options()
def scores_cmd(
    model: ModelArg,
    calib: Annotated[Path, typer.Option("--calib", help="Calibration text.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the error table (.safetensors).")],
    imatrix: Imatrix = None,
    quiet: Quiet = False,
    *, calibration,
) -> None:
    """Compute and save the error table only; `allocate --scores` re-solves any budget from it."""
    from .api import compute_scores, writes_outputs
    from .api.outputs import Inputs, check_output_files
    from .progress import tracker

    check_output_files(Inputs.of({"the --calib text": calib}, models=[model]), output, imatrix)
    quiet = quiet or not writes_outputs()
    with tracker(quiet) as track:
        table = compute_scores(model, calib, calibration, track, imatrix=imatrix)
    if not writes_outputs():  # another torchrun rank: its share is done, rank 0 writes
        return
    table.save(output)
    if not quiet:
        typer.echo(f"wrote {output}: {len(table.tensors)} tensors x {len(table.candidates)} candidates; "
                   f"scores {', '.join(sorted(table.scores))} (default {table.score})")
        times = ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in table.meta.get("timings", {}).items())
        typer.echo(f"timings: {times}")
        if "peak_device_gib" in table.meta:
            typer.echo(f"peak GPU memory per process (GiB): {table.meta['peak_device_gib']}")


@app.command("quantize")
@_user_errors
@_calibration_options(only=("calib_tokens", "seqlen", "seed", "device", "workdir"))
def quantize_cmd(
    model: ModelArg,
    plan: Annotated[Path, typer.Option("--plan", help="Plan JSON (from `allocate`) that sets every tensor's width.")],
    calib: Annotated[Path, typer.Option("--calib", help="Calibration text for the rounding method.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory to write (compressed-tensors "
                                                                "pack-quantized; must not exist).")],
    method: Annotated[str, typer.Option("--method", help="rtn | gptq | gsq | discquant (docs/rounding.md); plans "
                                                         "made with --method bitsmoe: rtn.")] = "gptq",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output directory.")] = False,
    quiet: Quiet = False,
    *, calibration,
) -> None:
    """Quantize MODEL as the plan says into a checkpoint that transformers and `bitalloc eval` load (a BitsMoE
    plan's decomposed experts: `bitalloc eval` and `load_quantized` only; docs/checkpoint.md)."""
    from .api import quantize
    from .progress import tracker

    with tracker(quiet) as track:
        out = quantize(model, plan, method, calib, out=output, calibration=calibration, overwrite=overwrite,
                       track=track)
    if not quiet:
        typer.echo(f"wrote {out} ({method})")


@app.command("eval")
@_user_errors
def eval_cmd(
    model: ModelArg,
    text: Annotated[Path, typer.Option("--text", help="Held-out text (.txt/.jsonl, optionally .xz); never the "
                                                      "calibration file.")],
    plan: Annotated[Optional[Path], typer.Option("--plan", help="Plan JSON to apply with RTN.")] = None,
    bits: Annotated[Optional[int], typer.Option("--bits", help="Uniform RTN bits instead of a plan.")] = None,
    group: Annotated[int, typer.Option("--group", help="Group size for --bits.")] = 128,
    tokens: Annotated[int, typer.Option(help="Evaluate the first N tokens.")] = 32768,
    seqlen: Annotated[int, typer.Option(help="Window length.")] = 512,
    device: Annotated[str, typer.Option(help="'cpu', 'cuda', 'cuda:N' or 'auto'.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    quiet: Quiet = False,
) -> None:
    """Held-out perplexity (fixed protocol, see docs/eval.md): of MODEL after RTN fake-quantization by a plan
    or uniform bits, or of a checkpoint written by `bitalloc quantize` as it is stored."""
    from .api import evaluate, evaluate_quantized, is_quantized_checkpoint
    from .progress import tracker

    if plan is not None and bits is not None:
        raise BitallocError("give either --plan or --bits, not both")
    quantized = is_quantized_checkpoint(model)
    if quantized and (plan is not None or bits is not None):
        raise BitallocError(f"{model} is already quantized; evaluate it without --plan or --bits")
    with tracker(quiet) as track:
        if quantized:
            r = evaluate_quantized(model, text, tokens=tokens, seqlen=seqlen, device=device, track=track)
        else:
            r = evaluate(model, text, plan=plan, bits=bits, group_size=group, tokens=tokens, seqlen=seqlen,
                         device=device, track=track)
    if as_json:
        typer.echo(json.dumps({"perplexity": r.perplexity, "loss": r.loss, "tokens": r.tokens, "seconds": r.seconds,
                               "label": r.label, "plan": str(plan) if plan else None}))
    else:
        typer.echo(f"{r.label}: perplexity {r.perplexity:.4f} (loss {r.loss:.4f}, {r.tokens} tokens, {r.seconds:.1f} s)")


PlanArg = Annotated[Path, typer.Argument(help="Plan JSON.")]


@app.command("show")
@_user_errors
def show_cmd(plan: PlanArg) -> None:
    """Validate a plan and print its summary."""
    from .plan import Plan

    typer.echo(Plan.load(plan).summary())


@app.command("export")
@_user_errors
def export_cmd(
    plan: PlanArg,
    to: Annotated[str, typer.Option("--to", help="gptqmodel | compressed-tensors | llmcompressor-recipe | llamacpp | "
                                                 "autoround | torchao.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="File to write.")],
    input_gguf: Annotated[Optional[str], typer.Option("--input-gguf", help="llamacpp: the f16 GGUF to quantize, for "
                                                                           "the printed command.")] = None,
    output_gguf: Annotated[Optional[str], typer.Option("--output-gguf", help="llamacpp: the GGUF to write, for the "
                                                                             "printed command.")] = None,
    imatrix: Annotated[Optional[str], typer.Option("--imatrix", help="llamacpp: the importance matrix the plan was "
                                                                     "made with (allocate --imatrix).")] = None,
) -> None:
    """Write the plan as another quantizer's config (README: 'Use your plan with ...'); for llamacpp, also
    print the llama-quantize command that applies it."""
    from .api.outputs import Inputs, check_output_file
    from .export import export_plan, llamacpp_command
    from .plan import Plan, atomic_write_text

    if to != "llamacpp" and (input_gguf or output_gguf or imatrix):
        raise BitallocError("--input-gguf, --output-gguf and --imatrix are for --to llamacpp")
    check_output_file(output, Inputs.of({"the plan": plan}))
    loaded = Plan.load(plan)
    text, notes = export_plan(loaded, to)
    atomic_write_text(output, text)
    for n in notes:
        typer.echo(f"note: {n}", err=True)
    typer.echo(f"wrote {output}")
    if to == "llamacpp":
        typer.echo(llamacpp_command(loaded, str(output), input_gguf, output_gguf, imatrix))


@app.command("import")
@_user_errors
def import_cmd(
    config: Annotated[Path, typer.Argument(help="GPTQModel quantize_config, compressed-tensors config or AutoRound "
                                                "layer_config (JSON).")],
    model: Annotated[Path, typer.Option("--model", help="The model the config quantizes.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Plan JSON to write.")],
    scores: Annotated[Optional[Path], typer.Option("--scores", help="Error table to fill in predicted "
                                                                    "errors.")] = None,
) -> None:
    """Read another quantizer's config into a plan (exact bits per tensor)."""
    from .api import import_config
    from .api.outputs import Inputs, check_output_file

    check_output_file(output, Inputs.of({"the imported config": config, "the --scores file": scores}, models=[model]))
    plan = import_config(config, model, scores)
    plan.save(output)
    typer.echo(f"wrote {output}: {plan.budget.achieved_bpp:.4f} bpp ({plan.solver.name})")


@app.command("diff")
@_user_errors
def diff_cmd(
    a: Annotated[Path, typer.Argument(help="First plan.")],
    b: Annotated[Path, typer.Argument(help="Second plan.")],
    scores: Annotated[Optional[Path], typer.Option("--scores", help="Error table: show each plan's predicted "
                                                                    "error.")] = None,
) -> None:
    """Per-layer differences, bpp and predicted error of two plans of one model."""
    from .api import load_scores
    from .plan import Plan
    from .report.diff import diff_plans

    table = load_scores(scores) if scores is not None else None
    typer.echo(diff_plans(Plan.load(a), Plan.load(b), table, (a.name, b.name)))


@app.command("report")
@_user_errors
def report_cmd(
    plans: Annotated[list[Path], typer.Argument(help="One plan, or several plans of one model for a frontier plot.")],
    png: Annotated[Path, typer.Option("--png", help="Image to write.")],
) -> None:
    """One plan: heatmap of bits by layer x role (and expert), histogram, target vs achieved.
    Several plans: their predicted error against achieved bpp (the frontier)."""
    from .api import FrontierPoint
    from .api.outputs import Inputs, check_output_file
    from .plan import Plan, atomic_write_bytes
    from .report.frontier import frontier_png
    from .report.plan_png import render

    check_output_file(png, Inputs.of({"a plan given": plans}))
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


if __name__ == "__main__":  # python -m bitalloc.cli (what torchrun -m runs)
    main()
