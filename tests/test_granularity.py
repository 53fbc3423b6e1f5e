"""Expert and column-slab granularity: finer decisions can only lower the optimum, and plans stay exact."""

import json

import pytest

import bitalloc
from bitalloc.api import CalibrationConfig, SolveConfig
from bitalloc.errors import ConstraintError, PlanError
from bitalloc.plan import Candidate, Plan


def test_slab_errors_sum_to_tensor_errors(llama_scores):
    t = llama_scores
    for name in t.tensors:
        assert t.slabs(name).sum(0) == pytest.approx(t.errors[t.row(name)], rel=1e-12)


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    """Inputs of 256 and 512 columns: 2 and 4 slabs per tensor."""
    from .conftest import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("wide") / "llama", "llama", hidden_size=256,
                            intermediate_size=512, head_dim=64)


def test_slab_plans_are_exact_and_no_worse(wide_llama, calib_file, heldout_file, tmp_path):
    scores = bitalloc.compute_scores(wide_llama, calib_file, CalibrationConfig(tokens=512, seqlen=128))
    tensor = bitalloc.allocate(wide_llama, "3.0", scores=scores)
    slab = bitalloc.allocate(wide_llama, "3.0", scores=scores, solve=SolveConfig(granularity="slab"))
    assert slab.solver.granularity == "slab" and slab.solver.status == "optimal"
    assert slab.solver.objective <= tensor.solver.objective * (1 + 1e-9)
    assert slab.budget.achieved_bpp <= 3.0
    p = slab.save(tmp_path / "slab.json")
    again = Plan.load(p)
    assert again == slab
    segmented = [e for e in again.entries if e.segments]
    assert segmented  # some tensors mix widths across their slabs
    for e in segmented:
        assert e.segments[0].start == 0 and e.segments[-1].stop == e.shape[-1]
    r = bitalloc.evaluate(wide_llama, heldout_file, plan=again, tokens=512, seqlen=128)
    assert r.perplexity > 1


def test_broken_segments_are_refused(tiny_llama, llama_scores, tmp_path):
    plan = bitalloc.allocate(tiny_llama, "3.0", scores=llama_scores)
    data = json.loads(plan.to_json())
    e = next(x for x in data["entries"] if not x["locked"] and x["shape"][-1] == 128)
    e["segments"] = [{"start": 0, "stop": 64, "bits": e["bits"], "group_size": 128},
                     {"start": 96, "stop": 128, "bits": e["bits"], "group_size": 128}]
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(PlanError, match="tile the input columns"):
        Plan.load(tmp_path / "bad.json")


def test_expert_granularity_ties_each_expert(tiny_moe, moe_scores):
    tensor = bitalloc.allocate(tiny_moe, "3.0", scores=moe_scores)
    expert = bitalloc.allocate(tiny_moe, "3.0", scores=moe_scores, solve=SolveConfig(granularity="expert"))
    assert expert.solver.objective >= tensor.solver.objective * (1 - 1e-9)
    by_expert = {}
    for e in expert.entries:
        if e.expert is not None:
            by_expert.setdefault((e.layer, e.expert), set()).add(e.bits)
    assert by_expert and all(len(b) == 1 for b in by_expert.values())


def test_slab_needs_groups_that_fit(tiny_llama, llama_scores):
    cands = [Candidate(bits=b, group_size=256) for b in (2, 4)]
    with pytest.raises(ConstraintError, match="divide 128"):
        bitalloc.allocate(tiny_llama, "3.0", scores=llama_scores, calibration=CalibrationConfig(candidates=tuple(cands)),
                          solve=SolveConfig(granularity="slab"))
