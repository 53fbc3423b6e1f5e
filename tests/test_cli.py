"""The CLI end to end on tiny models, and every bad-input case: one line, exit 2, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bitalloc.cli import app
from bitalloc.plan import Plan

from .conftest import expect_user_error

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def scores(tiny_llama, calib_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scores") / "scores.safetensors"
    r = run("scores", tiny_llama, "--calib", calib_file, "-o", out, "--calib-tokens", 1024, "--seqlen", 128, "-q")
    assert r.exit_code == 0, r.output
    return out


def test_allocate_eval_end_to_end(tiny_llama, calib_file, heldout_file, tmp_path):
    plan_path, score_path = tmp_path / "plan.json", tmp_path / "s.safetensors"
    r = run("allocate", tiny_llama, "--budget", "3.0bpp", "--calib", calib_file, "-o", plan_path,
            "--calib-tokens", 1024, "--seqlen", 128, "--save-scores", score_path)
    assert r.exit_code == 0, r.output
    assert "bits by role" in r.output and "achieved" in r.output
    plan = Plan.load(plan_path)
    assert plan.solver.status == "optimal"
    assert plan.budget.achieved_bpp <= 3.0 and plan.calibration.tokens == 1024
    assert {e.tensor for e in plan.entries} >= {"model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"}
    # re-solve the saved table for another budget, without calibration text
    r2 = run("allocate", tiny_llama, "--budget", "2.5", "--scores", score_path, "-o", tmp_path / "p2.json", "-q")
    assert r2.exit_code == 0 and r2.output == ""
    assert Plan.load(tmp_path / "p2.json").budget.achieved_bpp <= 2.5
    both = run("allocate", tiny_llama, "--budget", "2.5", "--scores", score_path, "--calib", calib_file,
               "--seqlen", 128, "-o", tmp_path / "p3.json", "-q")
    assert both.exit_code == 0, both.output  # same calibration text and windows: the saved table is reused
    stale = run("allocate", tiny_llama, "--budget", "2.5", "--scores", score_path, "--calib", calib_file,
                "--seqlen", 256, "-o", tmp_path / "p4.json", "-q")
    assert stale.exit_code == 2 and "--seqlen 128" in stale.output and not (tmp_path / "p4.json").exists()
    other = run("allocate", tiny_llama, "--budget", "2.5", "--scores", score_path, "--score", "hessian",
                "-o", tmp_path / "p5.json", "-q")
    assert other.exit_code == 0, other.output
    assert Plan.load(tmp_path / "p5.json").scores.predictor == "hessian"
    assert Plan.load(plan_path).scores.predictor == "gradient"  # the default
    bad = run("allocate", tiny_llama, "--budget", "2.5", "--scores", score_path, "--score", "nope", "-o",
              tmp_path / "p6.json", "-q")
    assert bad.exit_code == 2 and "no score 'nope'" in bad.output
    r3 = run("eval", tiny_llama, "--plan", plan_path, "--text", heldout_file, "--tokens", 512, "--seqlen", 128,
             "--json", "-q")
    assert r3.exit_code == 0, r3.output
    res = json.loads(r3.output)
    assert res["perplexity"] > 1 and res["tokens"] == 512
    r4 = run("eval", tiny_llama, "--bits", 3, "--text", heldout_file, "--tokens", 512, "--seqlen", 128, "-q")
    assert r4.exit_code == 0 and "uniform 3-bit g128: perplexity" in r4.output
    assert run("show", plan_path).exit_code == 0


def test_allocate_console_script_is_the_same_command(tiny_llama, scores, tmp_path, monkeypatch, capsys):
    import sys

    from bitalloc.cli import allocate_main

    out = tmp_path / "p.json"
    monkeypatch.setattr(sys, "argv", ["allocate", str(tiny_llama), "--budget", "2.75", "--scores", str(scores),
                                      "-o", str(out), "-q"])
    with pytest.raises(SystemExit) as e:
        allocate_main()
    assert e.value.code == 0 and Plan.load(out).budget.target == "2.75"


def test_byte_budget(tiny_llama, scores, tmp_path):
    out = tmp_path / "p.json"
    r = run("allocate", tiny_llama, "--budget", "40KiB", "--scores", scores, "-o", out, "-q")
    assert r.exit_code == 0, r.output
    plan = Plan.load(out)
    assert plan.budget.unit == "bytes" and plan.budget.achieved_bytes <= 40 * 1024


# ---- bad input ---------------------------------------------------------------------------

def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_model_dir(tmp_path, calib_file):
    out = tmp_path / "p.json"
    expect_user_error(run("allocate", tmp_path / "nope", "--budget", "3", "--calib", calib_file, "-o", out),
                      "not found", written=out)


def test_missing_config(tiny_llama, tmp_path, calib_file):
    m = _copy(tiny_llama, tmp_path / "m")
    (m / "config.json").unlink()
    out = tmp_path / "p.json"
    expect_user_error(run("allocate", m, "--budget", "3", "--calib", calib_file, "-o", out), "config.json", written=out)


def test_unsupported_arch(tiny_llama, tmp_path, calib_file):
    m = _copy(tiny_llama, tmp_path / "m")
    cfg = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    out = tmp_path / "p.json"
    expect_user_error(run("allocate", m, "--budget", "3", "--calib", calib_file, "-o", out), "unsupported architecture",
                      "gpt2", written=out)


def test_corrupt_safetensors(tiny_moe, tmp_path, calib_file):
    m = _copy(tiny_moe, tmp_path / "m")
    (m / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    out = tmp_path / "p.json"
    expect_user_error(run("allocate", m, "--budget", "3", "--calib", calib_file, "-o", out), "corrupt", written=out)


def test_truncated_safetensors(tiny_llama, tmp_path, calib_file):
    m = _copy(tiny_llama, tmp_path / "m")
    shard = sorted(m.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    out = tmp_path / "p.json"
    expect_user_error(run("allocate", m, "--budget", "3", "--calib", calib_file, "-o", out), "truncated", written=out)


def test_missing_shard(tiny_llama, tmp_path, calib_file):
    m = _copy(tiny_llama, tmp_path / "m")
    sorted(m.glob("*.safetensors"))[1].unlink()
    expect_user_error(run("allocate", m, "--budget", "3", "--calib", calib_file, "-o", tmp_path / "p.json"), "missing")


def test_empty_calibration(tiny_llama, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    out = tmp_path / "p.json"
    expect_user_error(run("allocate", tiny_llama, "--budget", "3", "--calib", empty, "-o", out), "no text", written=out)


def test_missing_calibration(tiny_llama, tmp_path):
    out = tmp_path / "p.json"
    expect_user_error(run("allocate", tiny_llama, "--budget", "3", "--calib", tmp_path / "x.txt", "-o", out),
                      "not found", written=out)


@pytest.mark.parametrize("budget,needle", [("2.5 parsecs", "unknown budget unit"), ("lots", "cannot parse"),
                                           ("1.5bpp", "below the cheapest"), ("9bpp", "above the richest")])
def test_bad_budgets(tiny_llama, calib_file, tmp_path, budget, needle):
    out = tmp_path / "p.json"
    expect_user_error(run("allocate", tiny_llama, "--budget", budget, "--calib", calib_file, "-o", out), needle,
                      written=out)


def test_unwritable_output(tiny_llama, scores, tmp_path):
    expect_user_error(run("allocate", tiny_llama, "--budget", "3", "--scores", scores, "-o", tmp_path / "no" / "p.json"),
                      "does not exist")
    expect_user_error(run("allocate", tiny_llama, "--budget", "3", "--scores", scores, "-o", tmp_path), "directory")


def test_plan_for_another_model(tiny_llama, tiny_moe, scores, heldout_file, tmp_path):
    out = tmp_path / "p.json"
    assert run("allocate", tiny_llama, "--budget", "3", "--scores", scores, "-o", out, "-q").exit_code == 0
    expect_user_error(run("eval", tiny_moe, "--plan", out, "--text", heldout_file, "--tokens", 256, "--seqlen", 128),
                      "different model")


def test_stale_scores(tiny_moe, scores, tmp_path):
    out = tmp_path / "p.json"
    expect_user_error(run("allocate", tiny_moe, "--budget", "3", "--scores", scores, "-o", out), "different checkpoint",
                      written=out)


@pytest.mark.parametrize("content,needle", [("{\"format\": \"bitalloc.plan\", \"vers", "not valid JSON"),
                                            ("[1, 2]", "not a bitalloc plan"),
                                            ("{\"format\": \"bitalloc.plan\", \"version\": 7}", "version 7")])
def test_corrupt_plan(tiny_llama, heldout_file, tmp_path, content, needle):
    p = tmp_path / "p.json"
    p.write_text(content)
    expect_user_error(run("eval", tiny_llama, "--plan", p, "--text", heldout_file), needle)


def test_plan_and_bits_are_exclusive(tiny_llama, heldout_file, tmp_path):
    expect_user_error(run("eval", tiny_llama, "--plan", tmp_path / "p.json", "--bits", 3, "--text", heldout_file),
                      "either --plan or --bits")


def test_include_lm_head_on_tied_model(tiny_llama, calib_file, heldout_file, tmp_path):
    out = tmp_path / "p.json"
    r = run("allocate", tiny_llama, "--budget", "4.0", "--calib", calib_file, "--calib-tokens", 512, "--seqlen", 128,
            "--include-lm-head", "-o", out, "-q")
    assert r.exit_code == 0, r.output
    emb = Plan.load(out).entry_map()["model.embed_tokens.weight"]
    assert not emb.locked and emb.predicted_error["b2g128"] > emb.predicted_error["b8g128"] >= 0
    r2 = run("eval", tiny_llama, "--plan", out, "--text", heldout_file, "--tokens", 256, "--seqlen", 128, "-q")
    assert r2.exit_code == 0, r2.output


@pytest.mark.parametrize("device", ["tpu9", "cuda:0"])
def test_bad_device(tiny_llama, heldout_file, device):
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    expect_user_error(run("eval", tiny_llama, "--text", heldout_file, "--device", device), "device")


def test_scores_from_other_calibration_text_are_refused(tiny_llama, scores, heldout_file, tmp_path):
    out = tmp_path / "p.json"
    expect_user_error(run("allocate", tiny_llama, "--budget", "3", "--scores", scores, "--calib", heldout_file,
                          "-o", out), "other calibration text", written=out)


def test_pins_solver_choice_and_recorded_constraints(tiny_llama, scores, tmp_path):
    out = tmp_path / "p.json"
    r = run("allocate", tiny_llama, "--budget", "3.5", "--scores", scores, "-o", out, "-q", "--solver", "closed-form",
            "--pin", r"layers\.0\.=4", "--max-bits", "4")
    assert r.exit_code == 0, r.output
    plan = Plan.load(out)
    assert plan.solver.name == "closed-form" and plan.constraints.pins == [r"layers\.0\.=4"]
    layer0 = [e for e in plan.entries if e.layer == 0 and not e.locked]
    assert layer0 and all(e.bits == 4 and e.reason == "pinned by 'layers\\.0\\.=4'" for e in layer0)
    assert all(e.bits <= 4 for e in plan.entries if not e.locked)


def test_pin_on_lm_head_unlocks_the_tied_embedding(tiny_llama, scores, tmp_path):
    out = tmp_path / "p.json"
    r = run("allocate", tiny_llama, "--budget", "4.5", "--scores", scores, "-o", out, "-q", "--pin", "lm_head=8")
    assert r.exit_code == 0, r.output
    emb = Plan.load(out).entry_map()["model.embed_tokens.weight"]
    assert not emb.locked and emb.bits == 8 and emb.reason == "pinned by 'lm_head=8'"


@pytest.mark.parametrize("args,needle", [
    (("--pin", "input_layernorm=4"), "matches no tensor that can be quantized"),
    (("--pin", "no_such_tensor=4"), "matches no tensor"),
    (("--pin", "q_proj=4", "--pin", "k_proj=2"), "tie group"),
    (("--solver", "simplex"), "unknown solver"),
    (("--time-budget", "1.0"), "time table"),
])
def test_bad_constraints(tiny_llama, scores, tmp_path, args, needle):
    out = tmp_path / "p.json"
    expect_user_error(run("allocate", tiny_llama, "--budget", "3", "--scores", scores, "-o", out, *args), needle,
                      written=out)


def test_frontier_writes_plans_csv_and_plot(tiny_llama, scores, heldout_file, tmp_path):
    import csv

    out = tmp_path / "fr"
    r = run("frontier", tiny_llama, "--scores", scores, "--from", "2.0", "--to", "3.0", "--step", "0.25", "-o", out,
            "--eval", heldout_file, "--eval-tokens", 1024, "-q")
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader((out / "frontier.csv").open()))
    # all-2-bit costs more than 2 bpp (a scale and a 2-bit zero point per group), so only 2.0 is skipped
    assert [r["target_bpp"] for r in rows] == ["2.25", "2.5", "2.75", "3"]
    assert set(rows[0]) >= {"target_bpp", "achieved_bpp", "predicted_error", "solver", "seconds", "plan"}
    errs = [float(r["predicted_error"]) for r in rows]
    assert errs == sorted(errs, reverse=True) and all(float(r["perplexity"]) > 1 for r in rows)
    for r in rows:
        assert float(r["achieved_bpp"]) <= float(r["target_bpp"])
        assert Plan.load(out / r["plan"]).solver.status == "optimal"
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_scores_command_reports_every_score_and_combined_resolves(tiny_llama, calib_file, scores, tmp_path):
    out = tmp_path / "s.safetensors"
    r = run("scores", tiny_llama, "--calib", calib_file, "-o", out, "--calib-tokens", 512, "--seqlen", 128)
    assert r.exit_code == 0, r.output
    assert "combined" in r.output and "(default gradient)" in r.output and "timings: forward" in r.output
    plan = tmp_path / "p.json"
    r = run("allocate", tiny_llama, "--budget", "3.0", "--scores", scores, "--score", "combined", "-o", plan, "-q")
    assert r.exit_code == 0, r.output
    assert Plan.load(plan).scores.predictor == "combined"


def test_combined_needs_a_table_that_measured_it(tiny_llama, calib_file, tmp_path):
    saved = tmp_path / "s.safetensors"
    r = run("allocate", tiny_llama, "--budget", "3.0", "--calib", calib_file, "--calib-tokens", 512, "--seqlen", 128,
            "--save-scores", saved, "-o", tmp_path / "a.json", "-q")
    assert r.exit_code == 0, r.output
    r = run("allocate", tiny_llama, "--budget", "3.0", "--scores", saved, "--score", "combined", "-o",
            tmp_path / "b.json", "-q")
    assert r.exit_code == 2 and "bitalloc scores" in r.output and not (tmp_path / "b.json").exists()


def test_quantize_then_eval_the_checkpoint(tiny_llama, calib_file, heldout_file, tmp_path):
    plan = tmp_path / "p.json"  # the tiny model's 64-column tensors need groups that divide 64
    r = run("allocate", tiny_llama, "--budget", "3.5", "--calib", calib_file, "--candidates", "2g32,3g32,4g32",
            "--calib-tokens", 512, "--seqlen", 128, "--score", "fisher", "-o", plan, "-q")
    assert r.exit_code == 0, r.output
    out = tmp_path / "q"
    r = run("quantize", tiny_llama, "--plan", plan, "--calib", calib_file, "--method", "rtn", "-o", out,
            "--calib-tokens", 256, "--seqlen", 128, "-q")
    assert r.exit_code == 0, r.output
    assert (out / "config.json").exists() and (out / "bitalloc-plan.json").exists()
    args = ("--text", heldout_file, "--tokens", 512, "--seqlen", 128, "--json", "-q")
    stored = json.loads(run("eval", out, *args).output)
    fake = json.loads(run("eval", tiny_llama, "--plan", plan, *args).output)
    assert stored["perplexity"] == pytest.approx(fake["perplexity"], rel=1e-4)  # RTN codes, as stored
    expect_user_error(run("quantize", tiny_llama, "--plan", plan, "--calib", calib_file, "--method", "rtn", "-o", out),
                      "exists")
    expect_user_error(run("eval", out, "--bits", 3, *args[:-2]), "already quantized")
    expect_user_error(run("quantize", tiny_llama, "--plan", plan, "--calib", calib_file, "--method", "nope",
                          "-o", tmp_path / "x"), "unknown rounding method")
