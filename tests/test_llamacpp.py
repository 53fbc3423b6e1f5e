"""The llama.cpp target: ggml pricing, llama.cpp's own errors, experts tied in the solver, GGUF sizes, the
importance matrix, the export, and (where llama.cpp is built: $BITALLOC_LLAMACPP_DIR) the real files.

The tiny models here have widths of 256 so that every K-quant fits; the end-to-end tests need a llama.cpp
tree with ``convert_hf_to_gguf.py`` and ``build/bin/llama-quantize`` (benchmarks/llamacpp.py builds one) and
are skipped, saying so, without it.
"""

from __future__ import annotations

import itertools
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import bitalloc
from bitalloc.allocator import build_problem, solve
from bitalloc.api.config import CalibrationConfig
from bitalloc.budget import GGML_TYPES, parse_budget
from bitalloc.cli import app
from bitalloc.export import export_plan, llamacpp_command
from bitalloc.model.gguf_names import gguf_name, tensor_name_map
from bitalloc.plan import GGML_CANDIDATES, Plan, ggml_candidate
from bitalloc.rounding import kquants

from .conftest import build_tiny_model

WIDE = dict(hidden_size=256, intermediate_size=512, head_dim=64, num_attention_heads=4, num_key_value_heads=2)
LLAMACPP = Path(os.environ.get("BITALLOC_LLAMACPP_DIR", "/nonexistent"))
_TREES = sorted(LLAMACPP.glob("llama_cpp_python-*/vendor/llama.cpp")) + ([LLAMACPP] if (LLAMACPP / "convert_hf_to_gguf.py").is_file() else [])
TREE = _TREES[-1] if _TREES else None
needs_llamacpp = pytest.mark.skipif(
    TREE is None or not (TREE / "build" / "bin" / "llama-quantize").is_file(),
    reason="set BITALLOC_LLAMACPP_DIR to a llama.cpp tree with build/bin/llama-quantize (benchmarks/llamacpp.py "
           "builds one from the llama-cpp-python sdist)")


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("wide") / "llama", "llama", **WIDE)


@pytest.fixture(scope="module")
def wide_moe(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("wide") / "moe", "qwen3_moe", moe_intermediate_size=256, **WIDE)


CAL = dict(tokens=512, seqlen=128, target="llamacpp")


@pytest.fixture(scope="module")
def wide_scores(wide_llama, calib_file):
    return bitalloc.compute_scores(wide_llama, calib_file, CalibrationConfig(**CAL, imatrix=True))


# ---------------------------------------------------------------- pricing and errors

def test_ggml_block_prices_are_gguf_pys():
    import gguf

    for name, t in GGML_TYPES.items():
        q = gguf.GGMLQuantizationType[name]
        assert (t.block_size, t.type_size) == gguf.GGML_QUANT_SIZES[q] and t.type_id == q.value
    for c in GGML_CANDIDATES:
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[c.ggml]]
        assert c.storage_bits(3, 512) == 3 * 512 // block * size * 8
        assert c.bpp == 8 * size / block


def test_weight_error_is_gguf_pys_dequantization_minus_the_weight():
    from gguf.quants import dequantize

    torch.manual_seed(0)
    w = torch.randn(4, 512) * 0.02
    imp = torch.rand(512) + 0.1
    for c in GGML_CANDIDATES:
        for im in (None, imp):
            data = kquants.quantize(w.half(), c.ggml, im).numpy()
            ref = dequantize(data, __import__("gguf").GGMLQuantizationType[c.ggml]).reshape(4, 512)
            assert torch.equal(kquants.weight_error(w, c.ggml, im), torch.from_numpy(ref) - w)


def test_table_errors_come_from_each_types_own_quantizer(wide_scores):
    fisher = wide_scores.unit_errors("fisher")
    order = [wide_scores.column(ggml_candidate(t)) for t in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")]
    assert (np.diff(fisher[:, order], axis=1) < 0).mean() > 0.9  # more bits, less predicted damage
    assert wide_scores.meta["imatrix"] is True


# ---------------------------------------------------------------- the solver ties a layer's experts

def test_experts_of_one_gguf_tensor_take_one_type_brute_force():
    cands = [ggml_candidate(t) for t in ("Q2_K", "Q4_K", "Q8_0")]
    names = ["e0", "e1", "e2", "dense"]
    shapes = [(256, 256)] * 4
    errors = np.array([[1.0, 0.2, 0.0], [9.0, 0.1, 0.0], [0.5, 0.4, 0.0], [3.0, 1.0, 0.0]])
    ties = [["e0", "e1", "e2"]]
    budget = parse_budget(f"{(3 * 256 * 256 * 2.625 + 256 * 256 * 8.5) / 8 + 5000}B")
    problem = build_problem(names, shapes, errors, cands, ties, budget)
    got = solve(problem, "ilp")
    choice = problem.unit_choices(got.choice)
    assert len(set(choice[:3])) == 1  # one type for the tensor llama.cpp stores them in
    best = None
    for tied, dense in itertools.product(range(3), repeat=2):
        bits = sum(cands[j].storage_bits(256, 256) for j in (tied, tied, tied, dense))
        if bits <= budget.total_bits(1):
            cost = sum(errors[i, j] for i, j in zip(range(4), (tied, tied, tied, dense)))
            best = cost if best is None else min(best, cost)
    assert got.objective == pytest.approx(best)


def test_moe_plan_ties_experts_and_exports_one_type_per_gguf_tensor(wide_moe, calib_file):
    plan = bitalloc.allocate(wide_moe, "4.2bpw", calib_file, calibration=CalibrationConfig(**CAL))
    assert plan.layout == "gguf" and {g.kind for g in plan.tie_groups} == {"experts"}
    by = plan.entry_map()
    for g in plan.tie_groups:
        assert len({by[m].ggml for m in g.members}) == 1
    text, _ = export_plan(plan, "llamacpp")
    assert sum("_exps" in line for line in text.split()) == 2 * 3


# ---------------------------------------------------------------- budgets in GGUF terms

def test_bpw_budget_counts_what_llama_cpp_counts(wide_llama, wide_scores):
    from bitalloc.api.context import ModelContext

    plan = bitalloc.allocate(wide_llama, "5.0bpw", scores=wide_scores, calibration=CalibrationConfig(**CAL, imatrix=True))
    ctx = ModelContext.build(wide_llama, CalibrationConfig(**CAL), bitalloc.SolveConfig())
    fixed = sum(t.numel * GGML_TYPES[t.fixed_type].type_size * 8 for t in ctx.gguf.tensors if t.fixed_type)
    bpw = (sum(e.storage_bits for e in plan.entries if not e.locked) + fixed) / ctx.gguf.n_elements
    assert 4.8 < bpw <= 5.0
    assert all(e.ggml for e in plan.entries if not e.locked)
    assert {e.role.value for e in plan.entries if not e.locked} >= {"embedding", "attn_v"}  # embeddings by default


def test_byte_budget_is_the_whole_file(wide_llama, wide_scores):
    cal = CalibrationConfig(**CAL, imatrix=True)
    small = bitalloc.allocate(wide_llama, "4.0bpw", scores=wide_scores, calibration=cal)
    budget = small.budget.file_bytes + 20_000
    plan = bitalloc.allocate(wide_llama, f"{budget}B", scores=wide_scores, calibration=cal)
    assert budget * 0.97 < plan.budget.file_bytes <= budget
    with pytest.raises(bitalloc.errors.BudgetError, match="fixed part"):
        bitalloc.allocate(wide_llama, "5kB", scores=wide_scores, calibration=cal)


# ---------------------------------------------------------------- the importance matrix

def test_imatrix_file_reads_with_gguf_py_under_gguf_names(wide_llama, wide_scores, tmp_path):
    from gguf import GGUFReader

    from bitalloc.api.imatrix import write_imatrix
    from bitalloc.model.checkpoint import Checkpoint
    from bitalloc.model.inventory import build_inventory

    ckpt = Checkpoint(wide_llama)
    path = write_imatrix(wide_scores, ckpt, build_inventory(ckpt), tmp_path / "imatrix.gguf")
    r = GGUFReader(str(path))
    assert bytes(r.fields["general.type"].parts[-1]).decode() == "imatrix"
    assert {"imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"} <= set(r.fields)
    tensors = {t.name: t for t in r.tensors}
    names = {n.rsplit(".", 1)[0] for n in tensors}
    assert "blk.0.attn_q.weight" in names and "blk.1.ffn_down.weight" in names and "token_embd.weight" in names
    # tied embeddings: the output multiplication reads token_embd, so it is llama.cpp's entry for it
    q = tensors["blk.0.attn_q.weight.in_sum2"]
    assert q.tensor_type.name == "F32" and list(q.shape) == [256, 1]
    counts = tensors["blk.0.attn_q.weight.counts"].data
    assert float(counts[0, 0]) == 512 and (tensors["blk.1.ffn_down.weight.in_sum2"].data > 0).all()


def test_moe_imatrix_has_one_row_per_expert(wide_moe, calib_file, tmp_path):
    from gguf import GGUFReader

    bitalloc.allocate(wide_moe, "4.5bpw", calib_file, calibration=CalibrationConfig(**CAL),
                      imatrix=tmp_path / "im.gguf")
    t = {x.name: x for x in GGUFReader(str(tmp_path / "im.gguf")).tensors}
    assert list(t["blk.0.ffn_gate_exps.weight.in_sum2"].shape) == [256, 4]
    assert list(t["blk.0.ffn_down_exps.weight.counts"].shape) == [1, 4]


# ---------------------------------------------------------------- CLI, export, refusals

def _cli(*args: str):
    return CliRunner().invoke(app, list(args))


def test_export_prints_the_llama_quantize_command(wide_llama, wide_scores, tmp_path):
    plan = bitalloc.allocate(wide_llama, "4.5bpw", scores=wide_scores, calibration=CalibrationConfig(**CAL, imatrix=True))
    plan.save(tmp_path / "plan.json")
    r = _cli("export", str(tmp_path / "plan.json"), "--to", "llamacpp", "-o", str(tmp_path / "types.txt"),
             "--imatrix", "im.gguf")
    assert r.exit_code == 0, r.output
    cmd = r.stdout.strip().splitlines()[-1]
    emb = next(e for e in plan.entries if e.role.value == "embedding").ggml.lower()
    assert cmd.startswith(f"llama-quantize --imatrix im.gguf --tensor-type-file {tmp_path / 'types.txt'} "
                          f"--output-tensor-type {emb} --token-embedding-type {emb} model-f16.gguf model-mixed.gguf ")
    names = tensor_name_map("llama", 2)
    lines = (tmp_path / "types.txt").read_text().split()
    want = {gguf_name(names, e.tensor): e.ggml.lower() for e in plan.entries
            if not e.locked and e.role.value not in ("embedding", "lm_head")}
    assert {line.split("=")[0][1:-1].replace("\\", ""): line.split("=")[1] for line in lines} == want


@pytest.mark.parametrize("args, message", [
    (["--candidates", "Q7_K"], "unknown ggml type 'Q7_K': use one of Q2_K"),
    (["--candidates", "4,Q4_K"], "do not suit --target llamacpp: give ggml types"),
    (["--candidates", "Q4_K,Q6_K"], "has rows of 64 weights, which no candidate type stores"),
    (["--rounding", "gptq"], "does not apply to --target llamacpp"),
])
def test_bad_inputs_are_one_line_errors(tiny_llama, calib_file, tmp_path, args, message):
    r = _cli("allocate", str(tiny_llama), "--target", "llamacpp", "--budget", "4.5bpw", "--calib", str(calib_file),
             "-o", str(tmp_path / "p.json"), *args)
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
    assert not (tmp_path / "p.json").exists()


def test_imatrix_needs_the_llamacpp_target(tiny_llama, calib_file, tmp_path):
    r = _cli("scores", str(tiny_llama), "--calib", str(calib_file), "-o", str(tmp_path / "s.safetensors"),
             "--imatrix", str(tmp_path / "im.gguf"))
    assert r.exit_code == 2 and "add --target llamacpp" in r.stderr


def test_ggml_candidates_are_validated():
    c = ggml_candidate("q4_k")
    assert c.id == "Q4_K" and c.bits == 4 and c.group_size == 256
    with pytest.raises(ValueError, match="Q4_K stores 4-bit codes"):
        type(c)(bits=3, group_size=256, ggml="Q4_K")


# ---------------------------------------------------------------- real files (llama.cpp present)

def _convert(model: Path, out: Path) -> None:
    shim = Path(__file__).resolve().parents[1] / "benchmarks" / "llamacpp.py"
    sys.path.insert(0, str(shim.parent))
    try:
        from llamacpp import _CONVERT_SHIM  # the benchmark's converter call (pre-tokenizer fallback)
    finally:
        sys.path.pop(0)
    subprocess.run([sys.executable, "-c", _CONVERT_SHIM, str(TREE), str(model), "--outtype", "f16", "--outfile",
                    str(out)], check=True, capture_output=True)


@needs_llamacpp
def test_written_gguf_has_the_plans_types_and_predicted_size(wide_llama, wide_scores, tmp_path):
    from gguf import GGUFReader

    from bitalloc.api.context import ModelContext

    f16 = tmp_path / "model-f16.gguf"
    _convert(wide_llama, f16)
    ctx = ModelContext.build(wide_llama, CalibrationConfig(**CAL), bitalloc.SolveConfig())
    predicted = ctx.gguf.file_bytes({u.tensor: u.numel * 16 for u in ctx.inv.quantized})
    # the names the converter derives from the directory are estimated: a few alignment units at most
    assert abs(predicted - f16.stat().st_size) <= 128
    plan = bitalloc.allocate(wide_llama, "4.5bpw", scores=wide_scores, calibration=CalibrationConfig(**CAL, imatrix=True))
    text, _ = export_plan(plan, "llamacpp")
    (tmp_path / "types.txt").write_text(text)
    out = tmp_path / "mixed.gguf"
    argv = shlex.split(llamacpp_command(plan, str(tmp_path / "types.txt"), str(f16), str(out)))
    subprocess.run([str(TREE / "build" / "bin" / argv[0]), *argv[1:]], check=True, capture_output=True)
    got = {t.name: t.tensor_type.name for t in GGUFReader(str(out)).tensors}
    names = tensor_name_map("llama", 2)
    want = {gguf_name(names, e.tensor): e.ggml for e in plan.entries if not e.locked}
    assert {n: got[n] for n in want} == want
    assert abs(out.stat().st_size - plan.budget.file_bytes) <= 128  # as exact as the f16 file's prediction
