"""BitsMoE: shared bases and factors, the slab surrogate, the linked solve, plans with a decomposition, eval."""

from __future__ import annotations

import itertools
import json

import jsonschema
import numpy as np
import pytest
import torch

import bitalloc
from bitalloc.allocator import build_problem, solve
from bitalloc.allocator.bitsmoe import SlabBlock, joint_problem
from bitalloc.allocator.linked import LinkedProblem, solve_linked
from bitalloc.api.config import CalibrationConfig, SolveConfig
from bitalloc.budget import parse_budget, tensor_bits
from bitalloc.errors import BudgetError, PlanError
from bitalloc.export import export_plan
from bitalloc.model.inventory import Unit
from bitalloc.plan import SCHEMA_PATH, SPECTRAL_WIDTHS, Plan, Role
from bitalloc.rounding.lowrank import factors, quantize_factor, reconstruct, shared_basis, space_matrix
from bitalloc.sensitivity.bitsmoe import ExpertBlock, output_error, surrogate

from .conftest import revalidated, with_factor_widths

CAL = CalibrationConfig(tokens=512, seqlen=128)
BITSMOE = SolveConfig(method="bitsmoe", rank_slab=16, decompose="all")  # every layer: the decomposed path


def _experts(side: str, n_experts: int = 4, n: int = 24, d: int = 40, seed: int = 0):
    """Random expert weights and input covariances of one block (gate-like or down-like shapes)."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, d) if side == "input" else (d, n)
    weights = [torch.randn(*shape, generator=g) * (1 + e) for e in range(n_experts)]
    in_f = shape[1]
    sigmas = []
    for e in range(n_experts):
        a = torch.randn(in_f, in_f, generator=g, dtype=torch.float64)
        sigmas.append(a @ a.T / in_f + 0.1 * torch.eye(in_f, dtype=torch.float64))
    role = Role.expert_gate if side == "input" else Role.expert_down
    units = tuple(Unit(f"model.layers.0.mlp.experts.{e}.x.weight", f"m{e}", shape, role, 0, e) for e in range(n_experts))
    return ExpertBlock(0, "gate" if side == "input" else "down", side, units), weights, sigmas


@pytest.mark.parametrize("side", ["input", "output"])
def test_reconstruction_is_exact_with_every_slab_at_16_bit(side):
    _, weights, _ = _experts(side)
    xs = [space_matrix(w, side) for w in weights]
    basis, _ = shared_basis(xs, [0.1, 0.2, 0.3, 0.4])
    for w, f in zip(weights, factors(basis, xs)):
        w16 = reconstruct(basis, quantize_factor(f, [(0, 16, 16), (16, basis.shape[0], 16)], 128, False), side)
        # the factors' fp16 rounding is the only error left: well below fp16's relative precision of the weight
        assert float((w16 - w).norm() / w.norm()) < 1e-3
        dropped = reconstruct(basis, quantize_factor(f, [(0, basis.shape[0], 0)], 128, False), side)
        assert float(dropped.abs().max()) == 0.0


def test_surrogate_equals_measured_error_on_the_output_side():
    """Down: basis rows are orthonormal, so the per-rank sum is the measured activation-weighted error."""
    block, weights, sigmas = _experts("output")
    cands = [bitalloc.Candidate(bits=2, group_size=128)]
    sb = surrogate(block, weights, sigmas, np.array([5, 6, 7, 8]), cands, SPECTRAL_WIDTHS, 8, 128, False)
    xs = [space_matrix(w, "output") for w in weights]
    basis, _ = shared_basis(xs, sb.shares.tolist())
    rng = np.random.default_rng(0)
    for e, (w, f, sigma) in enumerate(zip(weights, factors(basis, xs), sigmas)):
        pick = rng.integers(0, len(SPECTRAL_WIDTHS), len(sb.slab_bounds))
        slabs = [(a, z, SPECTRAL_WIDTHS[k]) for (a, z), k in zip(sb.slab_bounds, pick)]
        measured = output_error(reconstruct(basis, quantize_factor(f, slabs, 128, False), "output") - w, sigma)
        predicted = sum(sb.slab_error[e, s, k] for s, k in enumerate(pick))
        assert predicted == pytest.approx(measured, rel=5e-3)
        assert sb.output_mse[e, 0] == pytest.approx(output_error(bitalloc.rounding.rtn.rtn_error(w, 2, 128), sigma))


def test_surrogate_equals_measured_error_of_one_dropped_rank_on_the_input_side():
    """Gate/up: one rank's error is exact (the surrogate only drops cross terms between ranks)."""
    block, weights, sigmas = _experts("input")
    sb = surrogate(block, weights, sigmas, np.array([5, 6, 7, 8]), [], SPECTRAL_WIDTHS, 1, 128, False)
    xs = [space_matrix(w, "input") for w in weights]
    basis, _ = shared_basis(xs, sb.shares.tolist())
    f, w, sigma = factors(basis, xs)[2], weights[2], sigmas[2]
    for k in (0, 7, basis.shape[0] - 1):
        slabs = [(0, k, 16), (k, k + 1, 0), (k + 1, basis.shape[0], 16)]
        slabs = [s for s in slabs if s[1] > s[0]]
        measured = output_error(reconstruct(basis, quantize_factor(f, slabs, 128, False), "input") - w, sigma)
        assert sb.slab_error[2, k, SPECTRAL_WIDTHS.index(0)] == pytest.approx(measured, rel=2e-2)


def test_linked_solver_is_optimal_by_enumeration():
    rng = np.random.default_rng(1)
    # group 0: basis (drop / keep, 40 bits); groups 1-3: slabs linked to it; group 4: a free tensor
    cost = np.array([[0, 0, 0], [9, 4, 1], [7, 3, 2], [5, 2, 0.5], [6, 2, 1]], float) + rng.random((5, 3)) * 0.1
    bits = np.array([[0, 0, 40], [0, 10, 20], [0, 10, 20], [0, 10, 20], [5, 15, 30]], np.int64)
    allowed = np.array([[1, 0, 1]] + [[1, 1, 1]] * 4, bool)
    links = [(g, 0, 2) for g in (1, 2, 3)]
    for budget in (5, 40, 60, 75, 95, 140):
        p = LinkedProblem([str(i) for i in range(5)], cost, bits, allowed, 50, links, budget)
        best = min((p.objective(np.array(c)) for c in itertools.product(range(3), repeat=5)
                    if p.feasible(np.array(c))), default=None)
        a = solve_linked(p, time_limit_s=10)
        assert p.feasible(a.choice) and a.status == "optimal"
        assert a.objective == pytest.approx(best)


def _hybrid_instance(seed: int):
    """A joint problem small enough to enumerate: one dense tensor, MoE layer 0 with two experts and layer 1 with
    one, each layer one block of one 2-rank slab, two candidates and widths 0 / 2 / 16."""
    rng = np.random.default_rng(seed)
    cands = [bitalloc.Candidate(bits=b, group_size=8) for b in (2, 4)]
    names = ["dense", "l0.e0", "l0.e1", "l1.e0"]
    errors = np.array([[3.0, 0.5], *rng.uniform(1, 8, (3, 1)) * [[1.0, 0.3]]])
    tensors = build_problem(names, [(4, 128), (4, 8), (4, 8), (4, 8)], errors, cands, [], None)
    blocks = [SlabBlock("layers.0.gate", 0, 2, (2,), 4, 8), SlabBlock("layers.1.gate", 1, 1, (2,), 4, 8)]
    costs = [rng.uniform(0, 2, (b.n_experts, 1, 1)) * [[[6.0, 1.0, 0.0]]] for b in blocks]  # width 0 / 2 / 16
    layer_of = [None, 0, 0, 1]
    return tensors, layer_of, blocks, costs


def _enumerate(p: LinkedProblem) -> tuple[float, np.ndarray]:
    """The optimum of ``p`` over every allowed choice, vectorized (about 10^5 of them here)."""
    combos = np.array(list(itertools.product(*[np.flatnonzero(row) for row in p.allowed])), dtype=np.int64)
    rows = np.arange(p.num_groups)
    ok = p.bits[rows, combos].sum(1) <= p.budget_bits
    for c, parent, on in p.links:
        ok &= (p.bits[c, combos[:, c]] == 0) | (combos[:, parent] == on)
    for g, c, h, d in p.equivalences:
        ok &= (combos[:, g] == c) == (combos[:, h] == d)
    cost = np.where(ok, p.cost[rows, combos].sum(1), np.inf)
    return float(cost.min()), combos[int(cost.argmin())]


@pytest.mark.parametrize("seed", [0, 1])
def test_hybrid_solve_is_optimal_by_enumeration_and_never_worse_than_per_tensor(seed):
    tensors, layer_of, blocks, costs = _hybrid_instance(seed)
    problem, layout = joint_problem(tensors, layer_of, blocks, costs, (0, 2, 16), 8, False)
    modes = set()
    for bpp in (3.7, 4.3, 4.8, 5.3, 5.8, 6.4, 6.9):  # cheapest 3.58 (all dropped), per tensor 4.25 to 6.5
        p = problem.with_budget(parse_budget(f"{bpp}bpp"))
        best, _ = _enumerate(p)
        a = solve_linked(p, time_limit_s=10)
        assert p.feasible(a.choice) and a.status == "optimal"
        assert a.objective == pytest.approx(best, abs=1e-9)
        chosen = layout.decode(a.choice)
        modes.add(tuple(chosen.decomposed.values()))
        # a decomposed layer's tensors are absent, a per-tensor layer's slabs store nothing
        for g, layer in enumerate(layer_of):
            assert (chosen.tensors[g] < 0) == (layer is not None and chosen.decomposed[layer])
        for blk, kept, widths in zip(blocks, chosen.kept, chosen.widths):
            assert chosen.decomposed[blk.layer] or (not kept.any() and not widths.any())
        try:
            per_tensor = solve(tensors.with_budget(parse_budget(f"{bpp}bpp")), "ilp")
        except BudgetError:  # below the cheapest per-tensor plan: only a decomposition fits
            continue
        hint = layout.embed(per_tensor.choice)
        assert p.feasible(hint) and p.objective(hint) == pytest.approx(per_tensor.objective)
        assert a.objective <= per_tensor.objective + 1e-12
        assert solve_linked(p, 10, hint=hint).objective == pytest.approx(best, abs=1e-9)
    assert any(len(set(m)) == 2 for m in modes)  # some budget stores one layer decomposed and the other per tensor


def test_decompose_all_leaves_no_layer_per_tensor():
    tensors, layer_of, blocks, costs = _hybrid_instance(0)
    problem, layout = joint_problem(tensors, layer_of, blocks, costs, (0, 2, 16), 8, False, decompose_all=True)
    p = problem.with_budget(parse_budget("6bpp"))
    a = solve_linked(p, 10)
    chosen = layout.decode(a.choice)
    assert all(chosen.decomposed.values()) and (chosen.tensors[1:] < 0).all() and a.objective == _enumerate(p)[0]


@pytest.fixture(scope="module")
def bitsmoe_plan(tiny_moe, calib_file, moe_scores):
    return bitalloc.allocate(tiny_moe, "3.5bpp", calib_file, scores=moe_scores, calibration=CAL, solve=BITSMOE)


@pytest.mark.parametrize("budget", ["2.5bpp", "3.5bpp", "5bpp"])
def test_hybrid_plan_never_predicts_worse_than_the_per_tensor_plan(budget, tiny_moe, calib_file, moe_scores):
    """The default --method bitsmoe: the per-tensor plan is one of its feasible points, priced from the same table."""
    per_tensor = bitalloc.allocate(tiny_moe, budget, scores=moe_scores)
    hybrid = bitalloc.allocate(tiny_moe, budget, calib_file, scores=moe_scores, calibration=CAL,
                               solve=SolveConfig(method="bitsmoe", rank_slab=16))
    assert hybrid.budget.target_bits == per_tensor.budget.target_bits
    assert hybrid.budget.achieved_bpp <= hybrid.budget.target_bits / hybrid.budget.counted_params
    assert hybrid.solver.objective <= per_tensor.solver.objective * (1 + 1e-12)
    decomposed = {b.layer for b in hybrid.decomposition.blocks} if hybrid.decomposition else set()
    for e in hybrid.entries:  # a layer's experts are all decomposed, or all ordinary per-tensor entries
        assert e.decomposed == (e.expert is not None and e.layer in decomposed)
        assert e.decomposed or e.locked or e.candidate in hybrid.candidates


def test_budget_is_exact_with_the_basis_counted(bitsmoe_plan):
    plan = bitsmoe_plan
    d = plan.decomposition
    assert d is not None and plan.solver.status == "optimal"
    total = 0
    for e in plan.entries:
        if e.locked or e.decomposed:
            continue
        total += sum(tensor_bits(e.shape[0], b - a, c.bits, c.group_size, c.symmetric) for a, b, c in e.column_choices())
    for b in d.blocks:
        for s in b.slabs:
            rows = s.stop - s.start
            total += rows * b.basis_dim * 16 if s.basis_kept else 0
            for w in s.widths:
                total += 0 if w == 0 else rows * b.factor_cols * 16 if w == 16 else \
                    tensor_bits(rows, b.factor_cols, w, d.group_size, d.symmetric)
    params = sum(e.numel for e in plan.entries if not e.locked)
    assert total / params == pytest.approx(plan.budget.achieved_bpp, abs=1e-12)
    assert total <= parse_budget("3.5bpp").total_bits(params) == plan.budget.target_bits
    assert {t for b in d.blocks for t in b.experts} == {e.tensor for e in plan.entries if e.role.value.startswith("expert")}


def test_plan_round_trips_validates_and_refuses_broken_blocks(bitsmoe_plan, tmp_path):
    path = bitsmoe_plan.save(tmp_path / "p.json")
    assert Plan.load(path) == bitsmoe_plan
    jsonschema.validate(json.loads(path.read_text()), json.loads(SCHEMA_PATH.read_text()))
    data = json.loads(path.read_text())
    blk = data["decomposition"]["blocks"][0]
    blk["slabs"][0]["basis_kept"], blk["slabs"][0]["widths"][0] = False, 4
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(PlanError, match="not kept in the basis"):
        Plan.load(tmp_path / "bad.json")
    data = json.loads(path.read_text())
    data["decomposition"] = None
    (tmp_path / "bad2.json").write_text(json.dumps(data))
    with pytest.raises(PlanError, match="no decomposition"):
        Plan.load(tmp_path / "bad2.json")


def test_exporters_refuse_a_decomposition(bitsmoe_plan):
    with pytest.raises(PlanError, match="cannot express"):
        export_plan(bitsmoe_plan, "gptqmodel")


def _experts_unquantized(plan: Plan) -> Plan:
    """The plan's dense choices with the experts locked at 16 bit instead of decomposed."""
    data = plan.model_dump()
    data["decomposition"] = None
    for e in data["entries"]:
        if e["decomposed"]:
            e.update(decomposed=False, locked=True, bits=16, reason="test: experts unquantized")
    return revalidated(data)


def test_eval_applies_the_decomposition(bitsmoe_plan, tiny_moe, heldout_file):
    def ppl(p):
        return bitalloc.evaluate(tiny_moe, heldout_file, plan=p, tokens=512, seqlen=128, device="cpu").perplexity

    ref = ppl(_experts_unquantized(bitsmoe_plan))
    at16, dropped = ppl(with_factor_widths(bitsmoe_plan, 16)), ppl(with_factor_widths(bitsmoe_plan, 0))
    assert at16 == pytest.approx(ref, rel=1e-4)  # factors and basis in fp16: the experts as they were
    assert abs(dropped - ref) > 100 * abs(at16 - ref)  # no expert at all: eval did apply the widths


def test_cli_refuses_what_bitsmoe_cannot_honour(tiny_moe, tiny_llama, calib_file, moe_scores, tmp_path):
    from typer.testing import CliRunner

    from bitalloc.cli import app

    from .conftest import expect_user_error

    scores = moe_scores.save(tmp_path / "s.safetensors")
    out = tmp_path / "p.json"

    def run(*args):
        return CliRunner().invoke(app, [str(a) for a in args])

    expect_user_error(run("allocate", tiny_moe, "-b", "3", "--scores", scores, "--method", "bitsmoe", "-o", out),
                      "needs --calib", written=out)
    expect_user_error(run("allocate", tiny_moe, "-b", "3", "--scores", scores, "--method", "nope", "-o", out),
                      "unknown method", written=out)
    expect_user_error(run("allocate", tiny_moe, "-b", "3", "--calib", calib_file, "--method", "bitsmoe",
                          "--pin", r"experts\.0\.=8", "-o", out), "pins and bit bounds", written=out)
    expect_user_error(run("allocate", tiny_llama, "-b", "3", "--calib", calib_file, "--method", "bitsmoe", "-o", out),
                      "needs MoE experts", written=out)
    expect_user_error(run("frontier", tiny_moe, "--scores", scores, "--method", "bitsmoe", "-o", tmp_path / "f"),
                      "per-tensor plans only")
