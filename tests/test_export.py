"""Exporters: golden files on the tiny model, round trips through the importers, target-side checks.

After an intended format change, a failing golden test writes the new output to its temp dir and names it;
copy it over the file in tests/golden by hand (the test never writes into the repository).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bitalloc.errors import PlanError
from bitalloc.export import FORMATS, export_plan
from bitalloc.api.importer import import_config
from bitalloc.plan import Plan

GOLDEN = Path(__file__).parent / "golden"


def _layer_config(names: list[str]) -> dict:
    """A deterministic mixed AutoRound layer_config: layer 0 at 4 bit, layer 1 mixed, router/head skipped."""
    widths = {"q_proj": 3, "k_proj": 3, "v_proj": 3, "o_proj": 4, "gate_proj": 2, "up_proj": 2, "down_proj": 3}
    out = {}
    for n in names:
        leaf = n.rsplit(".", 1)[-1]
        bits = 4 if ".layers.0." in n else widths[leaf]
        out[n] = {"bits": bits, "group_size": 128, "sym": False}
    return out


@pytest.fixture(scope="module")
def plan(tiny_llama, tmp_path_factory) -> Plan:
    from bitalloc.model.checkpoint import Checkpoint
    from bitalloc.model.inventory import build_inventory

    modules = [u.module for u in build_inventory(Checkpoint(tiny_llama)).quantized]
    path = tmp_path_factory.mktemp("cfg") / "layer_config.json"
    path.write_text(json.dumps(_layer_config(modules)))
    return import_config(path, tiny_llama)


def test_import_prices_the_config_exactly(plan):
    assert plan.solver.name == "imported:autoround"
    by = plan.entry_map()
    assert by["model.layers.0.mlp.down_proj.weight"].bits == 4 and by["model.layers.1.mlp.up_proj.weight"].bits == 2
    assert plan.budget.achieved_bpp == pytest.approx(sum(e.storage_bits for e in plan.entries if not e.locked)
                                                     / plan.budget.counted_params)


@pytest.mark.parametrize("fmt", FORMATS)
def test_golden_files(plan, fmt, tmp_path):
    text, _ = export_plan(plan, fmt)
    golden = GOLDEN / f"tiny-llama.{fmt}"
    if text != golden.read_text():
        new = tmp_path / golden.name
        new.write_text(text)
        pytest.fail(f"{fmt} output changed; if intended, copy {new} over {golden}")


@pytest.mark.parametrize("fmt", ["gptqmodel", "compressed-tensors", "autoround"])
@pytest.mark.parametrize("which", ["plan", "moe_plan"])
def test_export_then_import_gives_the_same_bits(fmt, which, request, tmp_path):
    p: Plan = request.getfixturevalue(which)
    text, _ = export_plan(p, fmt)
    f = tmp_path / "cfg.json"
    f.write_text(text)
    back = import_config(f, p.model.path)
    want = {e.tensor: (e.bits, e.group_size, e.locked) for e in p.entries}
    got = {e.tensor: (e.bits, e.group_size, e.locked) for e in back.entries}
    assert got == want
    assert back.budget.achieved_bpp == pytest.approx(p.budget.achieved_bpp, abs=1e-12)
    assert export_plan(back, fmt)[0] == text  # import, then export back: the same file


@pytest.fixture(scope="module")
def moe_plan(tiny_moe, calib_file) -> Plan:
    import bitalloc

    scores = bitalloc.compute_scores(tiny_moe, calib_file, bitalloc.CalibrationConfig(tokens=512, seqlen=128))
    return bitalloc.allocate(tiny_moe, "3.0", scores=scores)


def test_compressed_tensors_output_parses_with_its_own_classes(moe_plan):
    from compressed_tensors.quantization import QuantizationConfig

    text, notes = export_plan(moe_plan, "compressed-tensors")
    cfg = QuantizationConfig.model_validate(json.loads(text)["quantization_config"])
    assert cfg.format in ("mixed-precision", "naive-quantized", "pack-quantized")
    assert any("vLLM" in n for n in notes) == any(e.bits not in (4, 8) for e in moe_plan.entries if not e.locked)
    assert "re:^model\\.layers\\.0\\.mlp\\.gate$" in cfg.ignore


def test_llamacpp_aggregates_experts_and_reports_changes(moe_plan):
    text, notes = export_plan(moe_plan, "llamacpp")
    lines = text.split()
    assert all("=" in line and line.startswith("^blk\\.") for line in lines)
    exps = [line for line in lines if "_exps" in line]
    assert len(exps) == 2 * 3  # one type per layer and projection
    per_expert = {(e.layer, e.role.value): set() for e in moe_plan.entries if e.expert is not None}
    for e in moe_plan.entries:
        if e.expert is not None:
            per_expert[(e.layer, e.role.value)].add(e.bits)
    # llama.cpp lower-cases names and uses regex_search: each pattern must hit exactly its own tensor
    import re

    gguf_names = [line.split("=")[0][1:-1].replace("\\", "") for line in lines]
    for line in lines:
        assert sum(bool(re.search(line.split("=")[0], n.lower())) for n in gguf_names) == 1
    mixed = sum(len(b) > 1 for b in per_expert.values())
    assert sum("experts moved" in n for n in notes) == mixed
    assert any(n.startswith("predicted GGUF size") for n in notes)


def test_exporters_refuse_what_targets_cannot_express(tiny_llama, plan, tmp_path):
    # a config that splits q from k imports fine (the tie group is dropped) ...
    cfg = json.loads(export_plan(plan, "autoround")[0])
    cfg["model.layers.1.self_attn.q_proj"]["bits"] = 2
    (tmp_path / "split.json").write_text(json.dumps(cfg))
    split = import_config(tmp_path / "split.json", tiny_llama)
    assert split.entry_map()["model.layers.1.self_attn.q_proj.weight"].bits == 2
    # ... but engines that fuse q/k/v cannot load it: refused with the reason
    for fmt in ("gptqmodel", "compressed-tensors"):
        with pytest.raises(PlanError, match="fuse"):
            export_plan(split, fmt)
    # per-column segments cannot be written as one width per module
    data = json.loads(plan.to_json())
    e = next(x for x in data["entries"] if x["tensor"] == "model.layers.0.mlp.down_proj.weight")
    e["segments"] = [{"start": 0, "stop": 128, "bits": 4, "group_size": 128}]
    (tmp_path / "seg.json").write_text(json.dumps(data))
    with pytest.raises(PlanError, match="column segments"):
        export_plan(Plan.load(tmp_path / "seg.json"), "autoround")


def test_diff_lists_changes_per_layer_and_predicted_errors(plan, tmp_path):
    from bitalloc.report.diff import diff_plans

    assert "no tensor differs" in diff_plans(plan, plan)
    cfg = json.loads(export_plan(plan, "autoround")[0])
    cfg["model.layers.1.mlp.down_proj"]["bits"] = 4
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    other = import_config(tmp_path / "c.json", plan.model.path)
    out = diff_plans(plan, other)
    assert "layer 1: 1 tensor(s) differ" in out and "model.layers.1.mlp.down_proj.weight: 3 -> 4" in out
    assert "layer 0" not in out


def test_report_png_draws_the_plan(plan, moe_plan):
    from bitalloc.report.plan_png import render

    from .conftest import ink, png_pixels

    dense = png_pixels(render(plan))
    assert dense.shape[0] > 300 and dense.shape[1] > 500
    assert ink(dense) > 0.2  # the heatmap fills the plot area
    widths = {e.bits for e in plan.entries if not e.locked}
    colours = {tuple(np.round(px, 2)) for px in dense.reshape(-1, 3)}
    assert len(colours) > 3 * len(widths)
    moe = png_pixels(render(moe_plan))
    assert moe.shape[1] > dense.shape[1]  # one more panel per expert role


def test_report_refuses_plans_of_different_models(plan, moe_plan, tmp_path):
    from typer.testing import CliRunner

    from bitalloc.cli import app

    a, b = plan.save(tmp_path / "a.json"), moe_plan.save(tmp_path / "b.json")
    r = CliRunner().invoke(app, ["report", str(a), str(b), "--png", str(tmp_path / "f.png")])
    assert r.exit_code == 2 and "different models" in r.output and not (tmp_path / "f.png").exists()


def test_report_leaves_matplotlib_global_state_alone(plan):
    import matplotlib

    from bitalloc.report.plan_png import render

    before = matplotlib.get_backend()
    render(plan)
    assert matplotlib.get_backend() == before


def test_cli_export_import_diff_report(plan, tiny_llama, tmp_path):
    from typer.testing import CliRunner

    from bitalloc.cli import app

    from .conftest import ink, png_pixels

    run = CliRunner().invoke
    p = plan.save(tmp_path / "plan.json")
    for fmt in FORMATS:
        r = run(app, ["export", str(p), "--to", fmt, "-o", str(tmp_path / f"out.{fmt}")])
        assert r.exit_code == 0, r.output
    r = run(app, ["import", str(tmp_path / "out.gptqmodel"), "--model", str(tiny_llama), "-o", str(tmp_path / "b.json")])
    assert r.exit_code == 0, r.output
    r = run(app, ["diff", str(p), str(tmp_path / "b.json")])
    assert r.exit_code == 0 and "no tensor differs" in r.output
    r = run(app, ["report", str(p), "--png", str(tmp_path / "r.png")])
    assert r.exit_code == 0 and ink(png_pixels((tmp_path / "r.png").read_bytes())) > 0.2
    r = run(app, ["report", str(p), str(tmp_path / "b.json"), "--png", str(tmp_path / "f.png")])
    frontier = png_pixels((tmp_path / "f.png").read_bytes())
    assert r.exit_code == 0 and frontier.shape[:2] == (504, 840) and ink(frontier) > 0.005
    r = run(app, ["export", str(p), "--to", "exl2", "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and "unknown export format" in r.output
    (tmp_path / "junk.json").write_text('{"hello": 1}')
    r = run(app, ["import", str(tmp_path / "junk.json"), "--model", str(tiny_llama), "-o", str(tmp_path / "j.json")])
    assert r.exit_code == 2 and "unrecognised config" in r.output
