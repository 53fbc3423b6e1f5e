"""BitsMoE plans written as checkpoints: shared bases and RTN factor slabs on disk, read back as LowRankExperts,
computing what ``bitalloc eval --plan`` evaluated."""

from __future__ import annotations

import json

import pytest
import torch

import bitalloc
from bitalloc.api.quantization import evaluate_quantized, load_quantized
from bitalloc.export import export_plan
from bitalloc.errors import CheckpointError, OutputError, PlanError
from bitalloc.kernels import LowRankExperts
from bitalloc.report.decomposition import decomposition_png, decomposition_rows
from bitalloc.model.checkpoint import DECOMPOSED_KEY, DECOMPOSED_MODEL_TYPE, Checkpoint
from bitalloc.model.inventory import build_inventory
from bitalloc.model.layerwise import unit_view
from bitalloc.plan import SPECTRAL_WIDTHS, Plan
from bitalloc.rounding.decomposed import factor_module, read_block, stored_names
from bitalloc.rounding.loader import QuantExperts, load_quantized_weights
from bitalloc.rounding.lowrank import apply_block, decompose_block, quantize_rows, reconstruct
from bitalloc.rounding.rtn import fake_quantize
from bitalloc.rounding.writer import PLAN_FILE

from .conftest import expect_user_error, revalidated, with_factor_widths, with_layers_per_tensor

CAL = bitalloc.CalibrationConfig(tokens=256, seqlen=64, device="cpu")
EVAL = dict(tokens=512, seqlen=128, device="cpu")
G32 = tuple(bitalloc.Candidate(bits=b, group_size=32) for b in (2, 3, 4, 8))  # the tiny model has 64-column tensors


@pytest.fixture(scope="module")
def bitsmoe_plan(tiny_moe, calib_file):
    """A BitsMoE plan of the tiny MoE whose dense tensors can be written (groups of 32); 16-rank slabs."""
    return bitalloc.allocate(tiny_moe, "3.5bpp", calib_file,
                             calibration=bitalloc.CalibrationConfig(tokens=512, seqlen=128, candidates=G32),
                             solve=bitalloc.SolveConfig(method="bitsmoe", rank_slab=16, decompose="all"))


def every_width(plan: Plan) -> Plan:
    """Slab widths cycling through every spectral width (0 included), and the first block's last slab dropped
    from the basis: every storage case of a decomposed checkpoint in one plan."""
    data = plan.model_dump()
    for k, b in enumerate(data["decomposition"]["blocks"]):
        for i, s in enumerate(b["slabs"]):
            s["widths"] = [SPECTRAL_WIDTHS[(i + e + k) % len(SPECTRAL_WIDTHS)] for e in range(len(s["widths"]))]
            s["basis_kept"] = any(s["widths"])
        if k == 0:
            b["slabs"][-1].update(widths=[0] * len(b["experts"]), basis_kept=False)
    return revalidated(data)


def write(model, plan: Plan, calib, out):
    return bitalloc.quantize(model, plan, "rtn", calib, out=out, calibration=CAL)


@pytest.fixture(scope="module")
def decomposed(bitsmoe_plan, tiny_moe, calib_file, tmp_path_factory):
    plan = every_width(bitsmoe_plan)
    return write(tiny_moe, plan, calib_file, tmp_path_factory.mktemp("bitsmoe") / "q"), plan


def reference_model(model, plan: Plan):
    """The transformers model of ``model`` with every tensor as ``eval --plan`` applies the plan: dense entries
    fake-quantized (RTN), experts replaced by the decomposition's reconstruction."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    units = {u.tensor: u for u in build_inventory(Checkpoint(model)).quantized}
    layers = lm.model.layers
    with torch.no_grad():
        for e in plan.entries:
            if not e.locked and not e.decomposed:
                view = unit_view(layers[e.layer], units[e.tensor])
                view.copy_(fake_quantize(view, e.column_choices()))
        for b in plan.decomposition.blocks if plan.decomposition else []:
            views = [unit_view(layers[b.layer], units[t]) for t in b.experts]
            for view, w in zip(views, apply_block(views, b, plan.decomposition)):
                view.copy_(w)
    return lm.eval()


def logits(lm) -> torch.Tensor:
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return lm(input_ids=ids).logits


def test_loaded_checkpoint_computes_evals_reconstruction(decomposed, tiny_moe, heldout_file):
    out, plan = decomposed
    lm = load_quantized(out)
    assert all(isinstance(layer.mlp.experts, LowRankExperts) for layer in lm.model.layers)
    # the same weights, multiplied in another order: (x B^T) F_e instead of x (B^T F_e)^T, in fp32
    torch.testing.assert_close(logits(lm), logits(reference_model(tiny_moe, plan)), rtol=1e-5, atol=1e-5)
    got = evaluate_quantized(out, heldout_file, **EVAL)
    want = bitalloc.evaluate(tiny_moe, heldout_file, plan=plan, **EVAL)
    assert got.perplexity == pytest.approx(want.perplexity, rel=1e-5)


def test_stored_codes_are_evals_rounding_bit_for_bit(decomposed, tiny_moe):
    out, plan = decomposed
    d = plan.decomposition
    src, ckpt = Checkpoint(tiny_moe), Checkpoint(out)
    units = {u.tensor: u for u in build_inventory(src).quantized}
    lm = bitalloc.model.layerwise.LayerwiseModel(src)
    widths = set()
    for b in d.blocks:
        layer = lm.load_layer(b.layer)
        basis, fs = decompose_block([unit_view(layer, units[t]) for t in b.experts], b)
        stored = read_block(ckpt, b, d)
        kept = [k for s in b.slabs if s.basis_kept for k in range(s.start, s.stop)]
        assert torch.equal(stored.basis.float(), basis[kept])
        for e, f in enumerate(fs):
            for i, s in enumerate(b.slabs):
                rows = stored.factors[e].get(i)
                widths.add(s.widths[e])
                if s.widths[e] == 0:
                    assert rows is None
                    continue
                back = rows.dequantize() if s.widths[e] < 16 else rows.float()
                assert torch.equal(back, quantize_rows(f[s.start:s.stop], s.widths[e], d.group_size, d.symmetric))
        lm.release_layer(b.layer)
    assert widths == set(SPECTRAL_WIDTHS)


def test_layout_marker_and_bytes(decomposed):
    from compressed_tensors.quantization import QuantizationConfig

    out, plan = decomposed
    d = plan.decomposition
    ckpt = Checkpoint(out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == DECOMPOSED_MODEL_TYPE and cfg[DECOMPOSED_KEY]["model_type"] == "qwen3_moe"
    assert ckpt.arch == "qwen3_moe" and Plan.load(out / PLAN_FILE) == plan
    # the quantization_config describes the other modules only, and they load as before
    qcfg = QuantizationConfig.model_validate(cfg["quantization_config"])
    assert not any("experts" in t for g in qcfg.config_groups.values() for t in g.targets)
    dense = {e.tensor for e in plan.entries if not e.locked and not e.decomposed}
    assert set(load_quantized_weights(out)) == dense
    # no expert weight, exactly the decomposition's tensors, dropped slabs absent
    names = stored_names(d)
    assert not any(".experts." in n and n not in names for n in ckpt.tensors)
    assert names <= set(ckpt.tensors)
    first = d.blocks[0]
    assert ckpt.tensors[first.basis].shape == (first.rank_kept, first.basis_dim) and first.rank_kept < first.rank
    dropped = [factor_module(b, e, i) for b in d.blocks for i, s in enumerate(b.slabs)
               for e, w in enumerate(s.widths) if w == 0]
    assert dropped and not any(n.startswith(m + ".") for m in dropped for n in ckpt.tensors)
    # bytes: the plan's bits, plus 16 bytes of weight_shape per packed slab and the packed words' padding
    expected = sum(b.rank_kept * b.basis_dim * 2 for b in d.blocks)
    for b in d.blocks:
        for s in b.slabs:
            rows, cols = s.stop - s.start, b.factor_cols
            groups = -(-cols // d.group_size)
            for w in s.widths:
                if w == 16:
                    expected += rows * cols * 2
                elif w:
                    expected += rows * -(-cols * w // 32) * 4 + rows * groups * 2 + 16 + -(-rows * w // 32) * groups * 4
    written = sum(ckpt.tensors[n].numel * (2 if ckpt.tensors[n].dtype == "F16" else 4 if ckpt.tensors[n].dtype
                                           == "I32" else 8) for n in names)
    assert written == expected
    assert written * 8 == pytest.approx(d.storage_bits, rel=0.05)


def test_every_slab_at_16_bit_gives_the_original_weights(bitsmoe_plan, tiny_moe, calib_file, tmp_path):
    out = write(tiny_moe, with_factor_widths(bitsmoe_plan, 16), calib_file, tmp_path / "q")
    lm = load_quantized(out)
    src = Checkpoint(tiny_moe)
    for i, layer in enumerate(lm.model.layers):
        experts = layer.mlp.experts
        for proj, side in (("gate", "input"), ("up", "input"), ("down", "output")):
            part = getattr(experts, f"{proj}_proj")
            for e in range(experts.num_experts):
                w = src.load(f"model.layers.{i}.mlp.experts.{e}.{proj}_proj.weight").float()
                back = reconstruct(part.basis.float(), part.factor(e), side)
                # fp16 rounding of the factors is the only error left: below fp16's relative precision
                assert float((back - w).norm() / w.norm()) < 1e-3


def test_refusals_come_before_any_work(decomposed, bitsmoe_plan, tiny_moe, tmp_path):
    out, plan = decomposed
    missing_calib = tmp_path / "no-such-calib.txt"
    with pytest.raises(PlanError, match="use --method rtn"):
        bitalloc.quantize(tiny_moe, plan, "gptq", missing_calib, out=tmp_path / "a")
    with pytest.raises(OutputError, match="already exists"):
        write(tiny_moe, plan, missing_calib, out)
    data = plan.model_dump()  # layer 0's down projection left out of the decomposition
    data["decomposition"]["blocks"] = [b for b in data["decomposition"]["blocks"]
                                       if (b["layer"], b["projection"]) != (0, "down")]
    for e in data["entries"]:
        if e["decomposed"] and e["tensor"].startswith("model.layers.0.") and "down_proj" in e["tensor"]:
            e.update(decomposed=False, locked=True, bits=16, reason="test")
    with pytest.raises(PlanError, match="layer 0 in gate, up only"):
        write(tiny_moe, revalidated(data), missing_calib, tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_other_methods_and_plain_transformers_refuses_the_checkpoint(decomposed, tiny_moe, calib_file,
                                                                                   tmp_path):
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from bitalloc.cli import app

    out, plan = decomposed
    path = plan.save(tmp_path / "plan.json")
    result = CliRunner().invoke(app, ["quantize", str(tiny_moe), "--plan", str(path), "--calib", str(calib_file),
                                      "-o", str(tmp_path / "q")])  # --method defaults to gptq
    expect_user_error(result, "use --method rtn", written=tmp_path / "q")
    with pytest.raises(ValueError, match=DECOMPOSED_MODEL_TYPE):
        AutoModelForCausalLM.from_pretrained(out)


def test_fused_input_writes_the_same_checkpoint(decomposed, tiny_moe, tiny_moe_fused, calib_file, tmp_path):
    """transformers' fused 3-D experts in the input: the same weights as the per-expert tiny MoE, so the same
    decomposed tensors."""
    out, plan = decomposed
    fused_plan = bitalloc.allocate(tiny_moe_fused, "3.5bpp", calib_file,
                                   calibration=bitalloc.CalibrationConfig(tokens=512, seqlen=128, candidates=G32),
                                   solve=bitalloc.SolveConfig(method="bitsmoe", rank_slab=16, decompose="all"))
    fused_plan = every_width(fused_plan)
    assert fused_plan.decomposition == plan.decomposition
    fused_out = write(tiny_moe_fused, fused_plan, calib_file, tmp_path / "q")
    a, b = Checkpoint(out), Checkpoint(fused_out)
    assert not any(n.endswith(("gate_up_proj", "experts.down_proj")) for n in b.tensors)
    for n in stored_names(plan.decomposition):
        assert torch.equal(a.load(n), b.load(n)), n
    torch.testing.assert_close(logits(load_quantized(fused_out)), logits(load_quantized(out)), rtol=1e-6, atol=1e-6)
    # layer 1 per tensor: its experts are written per expert from the fused tensors, as the per-expert input's are
    mixed = [write(m, with_layers_per_tensor(p, {1}, 3, 32), calib_file, tmp_path / f"mixed-{k}")
             for k, (m, p) in enumerate([(tiny_moe, plan), (tiny_moe_fused, fused_plan)])]
    torch.testing.assert_close(logits(load_quantized(mixed[1])), logits(load_quantized(mixed[0])), rtol=1e-6,
                               atol=1e-6)


def test_a_decomposed_checkpoint_without_its_plan_is_refused(decomposed, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(decomposed[0], copy)
    (copy / PLAN_FILE).unlink()
    with pytest.raises(CheckpointError, match="stores decomposed experts, laid out by its bitalloc-plan.json"):
        load_quantized(copy)


def test_a_mixed_plan_writes_loads_and_evaluates_as_planned(decomposed, tiny_moe, calib_file, heldout_file, tmp_path):
    """Layer 0 decomposed, layer 1 per tensor (what the hybrid solve chooses where a basis does not pay): eval of
    the plan, the written checkpoint and its loaded model agree; the report names both kinds of layer."""
    mixed = with_layers_per_tensor(decomposed[1], {1}, 3, 32)
    assert {b.layer for b in mixed.decomposition.blocks} == {0}
    out = write(tiny_moe, mixed, calib_file, tmp_path / "q")
    lm = load_quantized(out)
    assert isinstance(lm.model.layers[0].mlp.experts, LowRankExperts)
    assert isinstance(lm.model.layers[1].mlp.experts, QuantExperts)
    assert {n for n in load_quantized_weights(out) if ".experts." in n} == \
        {e.tensor for e in mixed.entries if e.layer == 1 and e.expert is not None}
    torch.testing.assert_close(logits(lm), logits(reference_model(tiny_moe, mixed)), rtol=1e-5, atol=1e-5)
    got = evaluate_quantized(out, heldout_file, **EVAL)
    want = bitalloc.evaluate(tiny_moe, heldout_file, plan=mixed, **EVAL)
    assert got.perplexity == pytest.approx(want.perplexity, rel=1e-5)
    assert want.perplexity != pytest.approx(bitalloc.evaluate(tiny_moe, heldout_file, plan=decomposed[1],
                                                              **EVAL).perplexity, rel=1e-4)  # layer 1 changed
    assert decomposition_rows(mixed)[0] == "MoE layers decomposed: 0; per tensor: 1"
    assert "MoE layers per tensor: 1" in mixed.summary()
    assert decomposition_png(mixed).startswith(b"\x89PNG")
    with pytest.raises(PlanError, match="cannot express"):
        export_plan(mixed, "compressed-tensors")
    # no layer decomposed: an ordinary per-tensor plan, which the exporters take
    assert with_layers_per_tensor(decomposed[1], {0, 1}, 3, 32).decomposition is None
