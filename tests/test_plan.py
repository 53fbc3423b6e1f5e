"""The plan contract: round trips, the shipped JSON Schema, and refusal of inconsistent plans."""

from __future__ import annotations

import json

import jsonschema
import pytest

import bitalloc
from bitalloc.api import CalibrationConfig
from bitalloc.errors import PlanError
from bitalloc.plan import SCHEMA_PATH, Plan, json_schema
from bitalloc.sensitivity.table import ErrorTable


@pytest.fixture(scope="module")
def plan(tiny_moe, calib_file, tmp_path_factory) -> Plan:
    table = bitalloc.compute_scores(tiny_moe, calib_file, CalibrationConfig(tokens=512, seqlen=128))
    path = tmp_path_factory.mktemp("t") / "s.safetensors"
    table.save(path)
    return bitalloc.allocate(tiny_moe, budget="2.75bpp", scores=path)


def test_round_trip(plan, tmp_path):
    p = plan.save(tmp_path / "plan.json")
    again = Plan.load(p)
    assert again == plan
    assert again.to_json() == plan.to_json()
    assert not list(tmp_path.glob(".plan.json.*"))  # no temporary file left behind


def test_version_1_plans_load_re_priced_with_a_note(plan, tmp_path):
    """v1 priced a 16-bit zero per group; v2 prices what compressed-tensors writes. Same choices, fewer bits."""
    old = json.loads(plan.to_json())
    old["version"] = 1
    del old["layout"], old["notes"]
    for e in old["entries"]:
        if not e["locked"]:
            rows, cols = e["numel"] // e["shape"][-1], e["shape"][-1]
            bits = rows * cols * e["bits"] + rows * -(-cols // e["group_size"]) * 32
            e["bpp"] = bits / e["numel"]
    v1_bits = sum(e["bpp"] * e["numel"] for e in old["entries"] if not e["locked"])
    old["budget"]["achieved_bpp"] = v1_bits / old["budget"]["counted_params"]
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(old))
    again = Plan.load(path)
    assert again.version == 2 and again.layout == "compressed-tensors"
    assert [(e.tensor, e.bits, e.group_size) for e in again.entries] == \
        [(e.tensor, e.bits, e.group_size) for e in plan.entries]
    assert again.budget.achieved_bpp == pytest.approx(plan.budget.achieved_bpp)
    assert again.budget.achieved_bpp < old["budget"]["achieved_bpp"]
    assert len(again.notes) == 1 and "re-priced from plan version 1" in again.notes[0]
    assert "note       re-priced" in again.summary()
    old["version"] = 3
    path.write_text(json.dumps(old))
    with pytest.raises(PlanError, match="plan version 3"):
        Plan.load(path)


def test_shipped_schema_is_current_and_validates_plans(plan):
    shipped = json.loads(SCHEMA_PATH.read_text())
    assert shipped == json.loads(json.dumps(json_schema())), "run: python -m bitalloc.plan"
    jsonschema.validate(json.loads(plan.to_json()), shipped)
    bad = json.loads(plan.to_json())
    bad["entries"][0]["bits"] = "four"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, shipped)


def test_moe_plan_contents(plan):
    entries = plan.entry_map()
    e = entries["model.layers.1.mlp.experts.3.down_proj.weight"]
    assert e.expert == 3 and e.layer == 1 and e.role.value == "expert_down" and not e.locked
    assert set(e.predicted_error) == {c.id for c in plan.candidates}
    router = entries["model.layers.0.mlp.gate.weight"]
    assert router.locked and router.reason == "moe_router" and router.bits == 16
    for g in plan.tie_groups:
        assert len({(entries[m].bits, entries[m].group_size) for m in g.members}) == 1
    assert plan.budget.achieved_bpp <= 2.75 and plan.solver.status == "optimal"
    assert "expert_down" in plan.summary()


def _mutate(plan: Plan, tmp_path, fn) -> str:
    data = json.loads(plan.to_json())
    fn(data)
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(data))
    with pytest.raises(PlanError) as exc:
        Plan.load(p)
    return str(exc.value)


def _first_unlocked(d):
    return next(e for e in d["entries"] if not e["locked"])


def test_refuses_unknown_keys(plan, tmp_path):
    assert "extra" in _mutate(plan, tmp_path, lambda d: d.update(colour="blue")).lower()


def test_refuses_bits_outside_candidates(plan, tmp_path):
    assert "not one of the candidates" in _mutate(plan, tmp_path, lambda d: _first_unlocked(d).update(bits=5))


def test_refuses_broken_tie_group(plan, tmp_path):
    def split(d):
        members = set(d["tie_groups"][0]["members"])
        es = [e for e in d["entries"] if e["tensor"] in members]
        es[0]["bits"] = 2 if es[1]["bits"] != 2 else 3
    assert "disagree" in _mutate(plan, tmp_path, split)


def test_refuses_plan_over_budget(plan, tmp_path):
    def all_eight(d):
        for e in d["entries"]:
            if not e["locked"]:
                e["bits"] = 8
    assert "over the budget" in _mutate(plan, tmp_path, all_eight)


def test_refuses_duplicate_tensor(plan, tmp_path):
    assert "more than once" in _mutate(plan, tmp_path, lambda d: d["entries"].append(d["entries"][0]))


def test_error_table_round_trip(tiny_llama, calib_file, tmp_path):
    t = bitalloc.compute_scores(tiny_llama, calib_file, CalibrationConfig(tokens=256, seqlen=128))
    t.save(tmp_path / "t.safetensors")
    u = ErrorTable.load(tmp_path / "t.safetensors")
    assert u.tensors == t.tensors and u.candidates == t.candidates and u.meta == t.meta
    assert (u.errors == t.errors).all() and (u.tokens == t.tokens).all()
