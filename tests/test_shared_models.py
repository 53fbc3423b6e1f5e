"""On the reference checkpoints in ../shared (skipped where they are absent)."""

import pytest

import bitalloc
from bitalloc.api import CalibrationConfig, SolveConfig
from bitalloc.model.checkpoint import Checkpoint
from bitalloc.model.inventory import build_inventory

from .conftest import CALIB, DENSE, HELDOUT, MOE

pytestmark = pytest.mark.shared


def test_dense_allocate_resolve_and_eval(tmp_path):
    scores = tmp_path / "scores.safetensors"
    # 8 sequences keep this test short; with so few the robust score is fisher (docs/sensitivity.md)
    with pytest.warns(UserWarning, match="gradient score is noisy"):
        bitalloc.allocate(DENSE, budget="3.25bpp", calib=CALIB, calibration=CalibrationConfig(tokens=4096),
                          save_scores=scores)
    plan = bitalloc.allocate(DENSE, budget="3.25bpp", scores=scores, solve=SolveConfig(score="fisher"))
    assert plan.solver.status == "optimal"
    assert 3.23 <= plan.budget.achieved_bpp <= 3.25
    names = set(Checkpoint(DENSE).tensors)
    assert all(e.tensor in names for e in plan.entries)  # keyed by exact checkpoint names
    assert len([e for e in plan.entries if not e.locked]) == 8 * 7
    again = bitalloc.allocate(DENSE, budget="2.5", scores=scores, solve=SolveConfig(score="fisher"))
    assert 2.48 <= again.budget.achieved_bpp <= 2.5 and again.solver.status == "optimal"
    # the plan beats uniform 3-bit at the same size on held-out text (reference protocol, shortened)
    ilp = bitalloc.evaluate(DENSE, HELDOUT, plan=plan, tokens=8192).perplexity
    uni = bitalloc.evaluate(DENSE, HELDOUT, bits=3, tokens=8192).perplexity
    assert ilp < uni


def test_moe_inventory_uses_per_expert_checkpoint_keys():
    ckpt = Checkpoint(MOE)
    inv = build_inventory(ckpt)
    q = inv.quantized
    assert len(q) == 6 * (4 + 8 * 3)
    assert all(u.tensor in ckpt.tensors for u in q)
    assert sum(1 for u in inv.units if u.reason == "moe_router") == 6


@pytest.mark.parametrize("model", [DENSE, MOE], ids=["dense", "moe"])
def test_every_exporter_on_a_shared_model_plan(model, tmp_path):
    """Each format read back by what reads it: our importers, compressed-tensors' classes, YAML, gguf's type names."""
    import json
    import re

    import gguf
    import yaml
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    from bitalloc.api.importer import import_config
    from bitalloc.export import FORMATS, export_plan
    from bitalloc.export.compressed_tensors import validate

    plan = bitalloc.allocate(model, budget="2.75", calib=CALIB, calibration=CalibrationConfig(tokens=1024))
    bits = {e.tensor: e.bits for e in plan.entries}
    quantized = {e.module: e for e in plan.entries if not e.locked}
    texts = {fmt: export_plan(plan, fmt)[0] for fmt in FORMATS}
    for fmt in ("gptqmodel", "autoround", "compressed-tensors"):
        (tmp_path / fmt).write_text(texts[fmt])
        assert {e.tensor: e.bits for e in import_config(tmp_path / fmt, model).entries} == bits, fmt
    validate(json.loads(texts["compressed-tensors"])["quantization_config"], plan)
    QuantizationConfig.model_validate(json.loads(texts["compressed-tensors"])["quantization_config"])
    recipe = yaml.safe_load(texts["llmcompressor-recipe"])["quant_stage"]["quant_modifiers"]["GPTQModifier"]
    schemes = [QuantizationScheme.model_validate(g) for g in recipe["config_groups"].values()]
    assert {s.weights.num_bits for s in schemes} == {e.bits for e in quantized.values()}
    types = {t.name for t in gguf.GGMLQuantizationType}
    for line in texts["llamacpp"].split():
        pattern, _, qtype = line.partition("=")
        assert qtype.upper() in types, line
        re.compile(pattern)
    torchao = json.loads(texts["torchao"])
    assert {k for k, v in torchao.items() if v} == set(quantized)
    for module, spec in torchao.items():
        if spec:
            assert spec["weight_dtype"] == f"torch.int{quantized[module].bits}"
            assert spec["granularity"]["group_size"] == quantized[module].group_size


@pytest.mark.parametrize("model", [DENSE, MOE, DENSE.parent / "llama-densek-26m"], ids=lambda p: p.name)
def test_chunked_tokenization_gives_the_ids_of_the_whole_text(model, monkeypatch):
    """The reference tokenizers on the calibration text: 64 KiB pieces (or one call, for the Llama-2-style
    tokenizer that prefixes every call), the same ids as one call."""
    import numpy as np

    from bitalloc.model import calib

    whole = calib.tokenize(model, CALIB, 2**16)
    monkeypatch.setattr(calib, "TOKENIZE_CHUNK", 2**16)
    chunked = calib.tokenize(model, CALIB, 2**16)
    assert len(whole) > 3 * 2**16 // 8  # several pieces
    np.testing.assert_array_equal(whole, chunked)
