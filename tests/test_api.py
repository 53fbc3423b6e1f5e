"""The public API's configs and the fixes that came with them: no silent fallback, no process-wide state changed."""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import pytest
from typer.testing import CliRunner

import bitalloc
from bitalloc.api import CalibrationConfig, SolveConfig
from bitalloc.errors import CalibrationError, ConstraintError
from bitalloc.model.inventory import Unit
from bitalloc.plan import DEFAULT_CANDIDATES, Plan, Role
from bitalloc.sensitivity.collect import _Results


def test_frontier_from_python_honours_the_calibration_config(tiny_llama, calib_file):
    """The bug: frontier(include_lm_head=True) built a table without lm_head and then failed."""
    cal = CalibrationConfig(tokens=512, seqlen=128, include_lm_head=True)
    points = bitalloc.frontier(tiny_llama, [3.0, 4.0], calib=calib_file, calibration=cal,
                               solve=SolveConfig(score="fisher"))
    assert [p.target_bpp for p in points] == [3.0, 4.0]
    for p in points:
        head = p.plan.entry_map()["model.embed_tokens.weight"]  # tied: the embedding is the head
        assert not head.locked and head.predicted_error["b2g128"] > 0


def test_frontier_reuses_one_context_and_one_tokenization(tiny_llama, llama_scores, heldout_file, monkeypatch):
    from bitalloc.api import context, evaluation

    built, tokenized = [], []
    real_build, real_tok = context.ModelContext.build.__func__, evaluation.tokenize
    monkeypatch.setattr(context.ModelContext, "build",
                        classmethod(lambda cls, *a, **k: built.append(1) or real_build(cls, *a, **k)))
    monkeypatch.setattr(evaluation, "tokenize", lambda *a: tokenized.append(1) or real_tok(*a))
    points = bitalloc.frontier(tiny_llama, [2.75, 3.0, 3.25], scores=llama_scores, eval_text=heldout_file,
                               eval_tokens=1024)
    assert len(points) == 3 and all(p.perplexity > 1 for p in points)
    assert built == [1] and tokenized == [1]


def test_configs_refuse_bad_values_before_any_work():
    with pytest.raises(ConstraintError, match="unknown solver 'fast'"):
        SolveConfig(solver="fast")
    with pytest.raises(ConstraintError, match="unknown granularity"):
        SolveConfig(granularity="row")
    with pytest.raises(ConstraintError, match="time-budget -1"):
        SolveConfig(time_budget=-1.0)
    assert CalibrationConfig().candidates == DEFAULT_CANDIDATES


def test_combined_fallback_is_said_not_silent(tiny_llama, llama_scores):
    assert "note" not in llama_scores.meta["combined"]  # fitted on the tiny model: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bitalloc.allocate(tiny_llama, "3.0", scores=llama_scores, solve=SolveConfig(score="combined"))
    fallback = dataclasses.replace(llama_scores, meta={**llama_scores.meta, "combined": {"note": "only 2 units"}})
    with pytest.warns(UserWarning, match=r"combined score could not be fitted \(only 2 units\)"):
        bitalloc.allocate(tiny_llama, "3.0", scores=fallback, solve=SolveConfig(score="combined"))


def _experts(tokens: list[list[int]]) -> _Results:
    """Results for a 2-layer MoE with experts of one role, tokens[layer][expert] routed, errors = 1 per parameter."""
    units = [Unit(f"model.layers.{l}.mlp.experts.{e}.down_proj.weight", f"model.layers.{l}.mlp.experts.{e}.down_proj",
                  (4, 8), Role.expert_down, layer=l, expert=e) for l in range(len(tokens)) for e in range(len(tokens[l]))]
    res = _Results(units, list(DEFAULT_CANDIDATES))
    for r, n in enumerate(t for layer in tokens for t in layer):
        res.tokens[r] = n
        res.errors["fisher"][r] = np.full((1, 4), (r + 1) * 32.0 if n else 0.0)  # (r + 1) per parameter
    return res


def test_unrouted_expert_takes_its_layer_peers_mean():
    res = _experts([[5, 0, 7]])
    with pytest.warns(UserWarning, match="experts.1.down_proj.*mean error of the 2 routed experts of layer 0"):
        res.fill_unrouted_experts()
    assert res.errors["fisher"][1][0, 0] == pytest.approx((1 + 3) / 2 * 32)


def test_layer_with_no_routed_expert_falls_back_to_the_role_in_every_layer():
    res = _experts([[5, 3], [0, 0]])
    with pytest.warns(UserWarning, match="routed experts of all layers"):
        res.fill_unrouted_experts()
    for r in (2, 3):  # layer 1: no zero error left behind
        assert res.errors["fisher"][r][0, 0] == pytest.approx((1 + 2) / 2 * 32)


def test_no_routed_expert_anywhere_stops_the_pass():
    with pytest.raises(CalibrationError, match="no calibration token was routed to any expert_down expert"):
        _experts([[0, 0]]).fill_unrouted_experts()


@pytest.mark.parametrize("config, group", [
    ({"quantization_config": {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {
        "g": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                                 "strategy": "channel", "group_size": None}}},
        "ignore": ["lm_head"]}}, None),
    ({"bits": 4, "group_size": -1, "sym": True}, None),
    ({"bits": 4, "group_size": 32, "sym": True}, 32),
])
def test_importers_price_per_channel_scales_as_one_group_per_row(tiny_llama, tmp_path, config, group):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(config))
    plan = bitalloc.import_config(path, tiny_llama)
    for e in plan.entries:
        if not e.locked:
            assert e.group_size == (group or e.shape[-1])
            assert e.symmetric  # symmetric 4-bit: a 16-bit scale per group and no zero point
            assert e.storage_bits == e.numel * 4 + e.shape[0] * -(-e.shape[-1] // e.group_size) * 16


def test_importer_refuses_float_schemes(tiny_llama, tmp_path):
    from bitalloc.errors import PlanError

    cfg = {"config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float",
                                                                       "strategy": "channel"}}}}
    (tmp_path / "fp8.json").write_text(json.dumps(cfg))
    with pytest.raises(PlanError, match="float weights with strategy channel cannot be priced"):
        bitalloc.import_config(tmp_path / "fp8.json", tiny_llama)


def test_cli_leaves_warning_format_and_logging_as_it_found_them(tiny_llama, llama_scores, tmp_path):
    from transformers.utils import logging

    from bitalloc.cli import app
    from bitalloc.model.calib import load_tokenizer

    scores = llama_scores.save(tmp_path / "s.safetensors")
    fmt, verbosity = warnings.formatwarning, logging.get_verbosity()
    r = CliRunner().invoke(app, ["allocate", str(tiny_llama), "--budget", "3", "--scores", str(scores),
                                 "-o", str(tmp_path / "p.json"), "-q"])
    assert r.exit_code == 0, r.output
    load_tokenizer(tiny_llama)
    assert warnings.formatwarning is fmt and logging.get_verbosity() == verbosity


def test_show_prints_the_summary(tiny_llama, llama_scores, tmp_path):
    from bitalloc.cli import app

    plan = bitalloc.allocate(tiny_llama, "3.0", scores=llama_scores)
    path = plan.save(tmp_path / "p.json")
    r = CliRunner().invoke(app, ["show", str(path)])
    assert r.exit_code == 0
    assert f"achieved {plan.budget.achieved_bpp:.4f} bpp" in r.output
    assert str(plan.model.path) in r.output and "bits by role" in r.output and "bits by layer" in r.output
    assert f"{plan.solver.objective:.5f} nats" in r.output
    assert Plan.load(path) == plan


def test_every_allocate_option_exists_on_frontier_and_scores_shares_the_calibration_ones():
    import inspect

    from bitalloc.cli import allocate_cmd, frontier_cmd, scores_cmd

    params = {f.__name__: inspect.signature(f).parameters for f in (allocate_cmd, frontier_cmd, scores_cmd)}
    allocate = set(params["allocate_cmd"]) - {"budget", "save_scores", "imatrix"}  # outputs only allocate writes
    assert allocate <= set(params["frontier_cmd"]), allocate - set(params["frontier_cmd"])
    # the imatrix flag is set by `--imatrix FILE` of scores/allocate, not by a calibration option
    calibration = {f.name for f in dataclasses.fields(CalibrationConfig)} - {"tokens", "imatrix"} | {"calib_tokens"}
    assert calibration <= set(params["scores_cmd"])
    for name in calibration:  # declared once: the same default and help everywhere
        assert len({(p[name].annotation.__metadata__[0].help, p[name].default) for p in params.values()}) == 1, name


@pytest.mark.parametrize("text, ids", [("2,3,4,8", ["b2g128", "b3g128", "b4g128", "b8g128"]),
                                       ("2g64, 4g128s,8s", ["b2g64", "b4g128s", "b8g128s"])])
def test_candidate_strings_round_trip(text, ids):
    from bitalloc.api.config import candidates_text, parse_candidates

    cands = parse_candidates(text)
    assert [c.id for c in cands] == ids
    assert parse_candidates(candidates_text(tuple(cands))) == cands


@pytest.mark.parametrize("text", ["", "x", "2g", "4gs", "0", "9", "2,,3", "3g0"])
def test_bad_candidate_strings_are_refused_with_the_syntax(text):
    from bitalloc.api.config import parse_candidates
    from bitalloc.errors import BitallocError

    with pytest.raises(BitallocError, match="'4g128s' \\(s: symmetric\\)"):
        parse_candidates(text)
