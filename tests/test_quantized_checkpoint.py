"""The quantized checkpoint: written in compressed-tensors' pack-quantized format, read back exactly,
loaded by transformers, refused when it cannot be written safely.

Plans come from AutoRound-style layer configs (any width, group and symmetry per module, no
calibration); codes from RTN, which is what every rounding method returns in form.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
import torch

from bitalloc.api.importer import import_config
from bitalloc.api.quantization import evaluate_quantized, is_quantized_checkpoint, load_quantized, quantize
from bitalloc.errors import CheckpointError, OutputError, PlanError
from bitalloc.model.checkpoint import Checkpoint
from bitalloc.model.inventory import Unit, build_inventory
from bitalloc.model.layerwise import LayerwiseModel, unit_view
from bitalloc.plan import Plan, Segment
from bitalloc.rounding.base import QuantizedWeight
from bitalloc.rounding.loader import load_quantized_weights, packed_bytes
from bitalloc.rounding.rtn import rtn_quantize
from bitalloc.rounding.writer import PLAN_FILE, PROVENANCE_FILE, write_quantized

Scheme = Callable[[Unit], tuple[int, int, bool]]  # unit -> (bits, group, symmetric)
PROJ = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "o_proj": 1, "gate_proj": 2, "up_proj": 2, "down_proj": 3}
# every width and group in one model; tied projections share a choice, as the plan requires
MIXED = {0: [(2, 32), (3, 64), (4, 64), (8, 128)], 1: [(3, 64), (8, 32), (2, 32), (4, 32)]}


def mixed(symmetric: Callable[[Unit], bool]) -> Scheme:
    def scheme(u: Unit) -> tuple[int, int, bool]:
        bits, group = MIXED[u.layer][PROJ[u.module.rsplit(".", 1)[1]]]
        return bits, group, symmetric(u)
    return scheme


ASYM_AND_SYM = mixed(lambda u: "gate" in u.module or "up_proj" in u.module or ".1.self_attn.o" in u.module)
ALL_SYM = mixed(lambda u: True)


def make_plan(model: Path, scheme: Scheme, tmp: Path) -> Plan:
    units = build_inventory(Checkpoint(model)).quantized
    cfg = {u.module: dict(zip(("bits", "group_size", "sym"), scheme(u))) for u in units}
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "layer_config.json"
    path.write_text(json.dumps(cfg))
    return import_config(path, model)


def rtn_weights(model: Path, plan: Plan) -> dict[str, QuantizedWeight]:
    """RTN codes of every quantized entry, read from the materialised layers (fused experts included)."""
    ckpt = Checkpoint(model)
    units = {u.tensor: u for u in build_inventory(ckpt).units}
    lm = LayerwiseModel(ckpt, "cpu")
    out = {}
    for i in range(lm.num_layers):
        layer = lm.load_layer(i)
        for e in plan.entries:
            if not e.locked and e.layer == i:
                out[e.tensor] = rtn_quantize(unit_view(layer, units[e.tensor]).float(), e.bits, e.group_size,
                                             e.symmetric)
        lm.release_layer(i)
    return out


def write(model: Path, scheme: Scheme, tmp: Path, **kw) -> tuple[Path, Plan, dict[str, QuantizedWeight]]:
    plan = make_plan(model, scheme, tmp)
    weights = rtn_weights(model, plan)
    out = write_quantized(Checkpoint(model), plan, weights, tmp / "out", {"method": "rtn"}, **kw)
    return out, plan, weights


def transformers_model(out: Path):
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)


def logits(lm, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return lm(input_ids=ids).logits


@pytest.fixture(scope="module")
def mixed_out(tiny_llama, tmp_path_factory):
    return write(tiny_llama, ASYM_AND_SYM, tmp_path_factory.mktemp("mixed"), shard_bytes=20_000)


def test_codes_read_back_bit_for_bit_at_every_width_and_group(mixed_out):
    out, _, weights = mixed_out
    assert {(q.bits, q.group_size, q.symmetric) for q in weights.values()} >= {
        (2, 32, False), (3, 64, False), (4, 64, True), (8, 128, False), (8, 32, True), (2, 32, True)}
    back = load_quantized_weights(out)
    assert back.keys() == weights.keys()
    for name, q in weights.items():
        b = back[name]
        assert (b.bits, b.group_size, b.symmetric) == (q.bits, q.group_size, q.symmetric), name
        assert torch.equal(b.codes, q.codes) and torch.equal(b.scale, q.scale) and torch.equal(b.zero, q.zero), name
        assert torch.equal(b.dequantize(), q.dequantize()), name


def test_directory_layout_config_and_unchanged_tensors(mixed_out, tiny_llama):
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors import safe_open

    out, plan, weights = mixed_out
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)  # sharded by size
    assert not list(out.glob("*.partial.*")) and not list(out.parent.glob(".out.tmp-*"))
    cfg = json.loads((out / "config.json").read_text())
    qcfg = QuantizationConfig.model_validate(cfg["quantization_config"])
    assert qcfg.format == "pack-quantized" and qcfg.quantization_status == "compressed"
    assert {g.format for g in qcfg.config_groups.values()} == {"pack-quantized"}
    schemes = {(g.weights.num_bits, g.weights.group_size, g.weights.symmetric) for g in qcfg.config_groups.values()}
    assert schemes == {(q.bits, q.group_size, q.symmetric) for q in weights.values()}  # one group per scheme
    assert Plan.load(out / PLAN_FILE) == plan
    prov = json.loads((out / PROVENANCE_FILE).read_text())
    assert prov["method"] == "rtn" and prov["bitalloc_version"] and "write_s" in prov["timings"]
    assert (out / "tokenizer.json").read_bytes() == (tiny_llama / "tokenizer.json").read_bytes()
    src, dst = Checkpoint(tiny_llama), Checkpoint(out)
    for e in plan.entries:
        if e.locked:
            assert torch.equal(dst.load(e.tensor), src.load(e.tensor)) and dst.tensors[e.tensor].dtype == \
                src.tensors[e.tensor].dtype, e.tensor
        else:
            assert e.tensor not in dst.tensors
            with safe_open(str(dst.tensors[f"{e.module}.weight_packed"].file), "pt") as f:
                assert f.get_tensor(f"{e.module}.weight_packed").dtype == torch.int32
            assert (f"{e.module}.weight_zero_point" in dst.tensors) == (not e.symmetric)


def test_compressed_tensors_own_decompressor_gives_the_same_weights(mixed_out):
    """The library's decompress of every written module (asymmetric zero points included) is our dequantize."""
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import is_match

    out, _, weights = mixed_out
    ckpt = Checkpoint(out)
    qcfg = QuantizationConfig.model_validate(ckpt.config["quantization_config"])
    linear = torch.nn.Linear(1, 1, device="meta")
    for name, q in weights.items():
        module = name.removesuffix(".weight")
        scheme = next(g for g in qcfg.config_groups.values() if is_match(module, linear, g.targets))
        state = {k: ckpt.load(f"{module}.{k}") for k in ("weight_packed", "weight_scale", "weight_zero_point",
                                                         "weight_shape") if f"{module}.{k}" in ckpt.tensors}
        # in the stored fp16 it rounds the exact product once; with fp32 scales (an fp32 model) it is exact
        assert torch.equal(PackedQuantizationCompressor.decompress(state, scheme)["weight"], q.dequantize().half())
        state["weight_scale"] = state["weight_scale"].float()
        assert torch.equal(PackedQuantizationCompressor.decompress(state, scheme)["weight"], q.dequantize()), name


def test_load_quantized_runs_on_quant_linear(mixed_out):
    from bitalloc.kernels import QuantLinear

    out, _, weights = mixed_out
    lm = load_quantized(out)
    layers = {n: m for n, m in lm.named_modules() if isinstance(m, QuantLinear)}
    assert set(layers) == {n.removesuffix(".weight") for n in weights}
    ref = logits(lm)
    assert torch.isfinite(ref).all()
    # the same model with the dequantized weights in plain linears computes the same logits
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(out)
    del config.quantization_config
    dense = AutoModelForCausalLM.from_config(config).float()
    state = {n: Checkpoint(out).load(n, torch.float32) for n in Checkpoint(out).tensors if "weight_" not in n}
    state.update({n: q.dequantize() for n, q in weights.items()})
    dense.load_state_dict(state, strict=False)
    dense.tie_weights()
    torch.testing.assert_close(logits(dense), ref, rtol=1e-5, atol=1e-5)


def test_transformers_loads_symmetric_widths_and_matches_load_quantized(tiny_llama, tmp_path):
    out, _, weights = write(tiny_llama, ALL_SYM, tmp_path)
    hf = transformers_model(out)
    torch.testing.assert_close(logits(hf), logits(load_quantized(out)), rtol=1e-5, atol=1e-5)
    for name, q in weights.items():  # decompressed by compressed-tensors on the first forward, bit for bit
        assert torch.equal(hf.get_submodule(name.removesuffix(".weight")).weight, q.dequantize()), name


@pytest.mark.xfail(strict=True, raises=RuntimeError, reason=(
    "compressed-tensors 0.20.1 builds weight_zero_point unpacked [out, groups] on the meta device when "
    "transformers prepares a pack-quantized model, but the format (its own compressor, vLLM) stores it packed "
    "[ceil(out*bits/32), groups]: every asymmetric checkpoint fails with a size mismatch "
    "(vllm-project/llm-compressor#1618)"))
def test_transformers_loads_asymmetric_schemes(mixed_out):
    transformers_model(mixed_out[0])


def test_bytes_on_disk_against_the_plan(mixed_out):
    """Disk holds the packed codes, an fp16 scale per group, the zero points packed at the code width
    (asymmetric) and the shape: the issue's acceptance is the plan's achieved bytes within 1%."""
    out, plan, weights = mixed_out
    expected = 0
    for q in weights.values():
        rows, cols = q.codes.shape
        groups = q.scale.shape[1]
        expected += rows * -(-cols * q.bits // 32) * 4 + rows * groups * 2 + 16
        if not q.symmetric:
            expected += -(-rows * q.bits // 32) * groups * 4
    written = packed_bytes(out)
    assert written == expected
    ratio = written / plan.budget.achieved_bytes
    print(f"quantized bytes on disk / plan achieved bytes = {ratio:.4f}")
    # the plan prices codes, scales and zeros exactly as stored; weight_shape adds 16 bytes a module
    assert abs(ratio - 1) < 0.01


def test_existing_output_is_refused_unless_overwrite(mixed_out, tiny_llama, tmp_path):
    _, plan, weights = mixed_out
    ckpt = Checkpoint(tiny_llama)
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="already exists"):
        write_quantized(ckpt, plan, weights, target, {})
    assert (target / "keep.txt").read_text() == "mine"
    write_quantized(ckpt, plan, weights, target, {}, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no temporary or old directory left
    with pytest.raises(OutputError, match="overlaps the input"):
        write_quantized(ckpt, plan, weights, tiny_llama, {}, overwrite=True)


def test_unwritable_output_is_refused(mixed_out, tiny_llama, tmp_path):
    _, plan, weights = mixed_out
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(OutputError, match="cannot create"):
        write_quantized(Checkpoint(tiny_llama), plan, weights, blocker / "out", {})


def test_plan_with_segments_is_refused_before_anything_is_written(mixed_out, tiny_llama, tmp_path):
    _, plan, weights = mixed_out
    e = next(e for e in plan.entries if not e.locked and e.shape[1] == 128)
    split = e.model_copy(update={"segments": [Segment(start=0, stop=64, bits=e.bits, group_size=32),
                                              Segment(start=64, stop=128, bits=e.bits, group_size=32)]})
    bad = plan.model_copy(update={"entries": [split if x is e else x for x in plan.entries]})
    with pytest.raises(PlanError, match="column segments"):
        write_quantized(Checkpoint(tiny_llama), bad, weights, tmp_path / "out", {})
    assert list(tmp_path.iterdir()) == []


def test_partial_groups_and_quantized_inputs_are_refused(mixed_out, tiny_llama, tmp_path):
    out, plan, weights = mixed_out
    wide = make_plan(tiny_llama, lambda u: (3, 128, False), tmp_path / "plan")  # 64-column tensors, group 128
    with pytest.raises(PlanError, match="not a multiple of its group size 128"):
        write_quantized(Checkpoint(tiny_llama), wide, {}, tmp_path / "out", {})
    with pytest.raises(CheckpointError, match="already quantized"):
        write_quantized(Checkpoint(out), plan, weights, tmp_path / "out", {})
    assert not (tmp_path / "out").exists()


def test_plan_for_another_model_is_refused_before_calibration(mixed_out, tiny_moe, tmp_path):
    _, plan, _ = mixed_out
    with pytest.raises(PlanError, match="different model"):
        quantize(tiny_moe, plan, "rtn", tmp_path / "no-such-calib.txt", out=tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


class Interrupting(Mapping):
    """Weights that raise ``KeyboardInterrupt`` on the ``after``-th read: an interrupt in the middle of writing."""

    def __init__(self, weights: dict[str, QuantizedWeight], after: int):
        self._w, self._left = weights, after

    def __getitem__(self, key: str) -> QuantizedWeight:
        self._left -= 1
        if self._left < 0:
            raise KeyboardInterrupt
        return self._w[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._w)

    def __len__(self) -> int:
        return len(self._w)


def test_interrupted_write_leaves_nothing(mixed_out, tiny_llama, tmp_path):
    _, plan, weights = mixed_out
    before = {p.name: p.read_bytes() for p in tiny_llama.iterdir()}
    with pytest.raises(KeyboardInterrupt):
        write_quantized(Checkpoint(tiny_llama), plan, Interrupting(weights, len(weights) // 2), tmp_path / "out",
                        {}, shard_bytes=10_000)
    assert list(tmp_path.iterdir()) == []  # no OUT, no temporary directory
    assert {p.name: p.read_bytes() for p in tiny_llama.iterdir()} == before  # the input untouched


def test_moe_is_written_per_expert_from_both_layouts(tiny_moe, tiny_moe_fused, tmp_path):
    from bitalloc.kernels import QuantLinear

    uniform: Scheme = lambda u: (4, 32, True)
    outs = {}
    for name, model in (("per_expert", tiny_moe), ("fused", tiny_moe_fused)):
        outs[name], _, weights = write(model, uniform, tmp_path / name)
    a, b = Checkpoint(outs["per_expert"]), Checkpoint(outs["fused"])
    assert a.tensors.keys() == b.tensors.keys()
    assert "model.layers.0.mlp.experts.3.down_proj.weight_packed" in a.tensors
    assert not any(n.endswith(("gate_up_proj", "experts.down_proj")) for n in b.tensors)
    for n in a.tensors:  # the same random model in two layouts: the same checkpoint
        assert torch.equal(a.load(n), b.load(n)), n
    assert torch.equal(load_quantized_weights(b)["model.layers.1.mlp.experts.2.up_proj.weight"].dequantize(),
                       weights["model.layers.1.mlp.experts.2.up_proj.weight"].dequantize())
    lm = load_quantized(outs["fused"])
    assert isinstance(lm.model.layers[0].mlp.experts.gate_proj[3], QuantLinear)
    torch.testing.assert_close(logits(transformers_model(outs["fused"])), logits(lm), rtol=1e-4, atol=1e-4)


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "transformers 5.24 decompresses every MoE expert with one config group (get_experts_scheme: the first "
    "group whose targets mention experts), so experts at different widths are decompressed wrongly"))
def test_transformers_loads_experts_at_mixed_widths(tiny_moe, tmp_path):
    per_expert: Scheme = lambda u: (2 if (u.expert or 0) % 2 else 4, 32, True)
    out, _, _ = write(tiny_moe, per_expert, tmp_path)
    torch.testing.assert_close(logits(transformers_model(out)), logits(load_quantized(out)), rtol=1e-4, atol=1e-4)


def test_quantize_then_evaluate_matches_the_fake_quantized_evaluation(tiny_llama, calib_file, heldout_file,
                                                                      tmp_path):
    import bitalloc

    plan = make_plan(tiny_llama, ALL_SYM, tmp_path)
    out = quantize(tiny_llama, plan, "rtn", calib_file, out=tmp_path / "q",
                   calibration=bitalloc.CalibrationConfig(tokens=256, seqlen=64, device="cpu"))
    prov = json.loads((out / PROVENANCE_FILE).read_text())
    assert prov["method"] == "rtn" and len(prov["calibration"]["sha256"]) == 64
    assert is_quantized_checkpoint(out) and not is_quantized_checkpoint(tiny_llama)
    got = evaluate_quantized(out, heldout_file, tokens=512, seqlen=128, device="cpu")
    want = bitalloc.evaluate(tiny_llama, heldout_file, plan=plan, tokens=512, seqlen=128, device="cpu")
    assert got.tokens == want.tokens
    assert got.perplexity == pytest.approx(want.perplexity, rel=1e-4)


def test_a_checkpoint_without_a_usable_config_is_refused(mixed_out, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(mixed_out[0], out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_b2g32"]["format"] = "float-quantized"
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="pack-quantized integer group"):
        load_quantized_weights(out)
    del cfg["quantization_config"]
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="not a quantized checkpoint"):
        load_quantized(out)
