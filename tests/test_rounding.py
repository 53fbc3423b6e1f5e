"""Rounding methods: codes, scales and zeros that dequantize to what each method optimised.

Small random layers check each method against what it promises (GPTQ against an exhaustive
least-squares search and against RTN, GSQ's limit of zero temperature, DiscQuant's box and grid);
tiny random checkpoints check the layer-by-layer driver (mixed widths, segments, MoE routing and
its fallback). All on CPU, a few seconds in total.
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings

import pytest
import torch

from bitalloc.errors import BitallocError
from bitalloc.model.calib import calibration_windows, tokenize
from bitalloc.model.checkpoint import Checkpoint
from bitalloc.model.hooks import InputStats
from bitalloc.model.inventory import build_inventory
from bitalloc.model.layerwise import LayerwiseModel, unit_view
from bitalloc.plan import Candidate
from bitalloc.progress import SILENT
from bitalloc.rounding import discquant, gsq
from bitalloc.rounding.apply import METHODS, quantize_layers, quantize_units
from bitalloc.rounding.base import QuantizedWeight, SegmentedWeight, as_parts
from bitalloc.rounding.config import RoundingConfig
from bitalloc.rounding.gptq import gptq, gptq_quantize
from bitalloc.rounding.rtn import (
    fake_quantize,
    rtn_dequantize,
    rtn_params,
    rtn_quantize,
)

FAST = RoundingConfig(gsq_steps=3, gsq_batch=2, discquant_steps=2, discquant_batch=2)


def correlated_inputs(n: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, cols, generator=g) @ torch.randn(cols, cols, generator=g) / cols**0.5 + \
        torch.randn(cols, generator=g)


def output_error(x: torch.Tensor, w: torch.Tensor, q: QuantizedWeight) -> float:
    """||X W^T - X W_hat^T||^2, measured on the layer's outputs (not through H)."""
    return float((x @ (w - q.dequantize()).T).pow(2).sum())


def assert_valid(q: QuantizedWeight, shape: tuple[int, int], bits: int) -> None:
    assert q.codes.dtype == torch.uint8 and tuple(q.codes.shape) == shape and q.bits == bits
    assert int(q.codes.max()) <= 2**bits - 1
    assert torch.equal(q.scale, q.scale.half().float()) and bool((q.scale > 0).all())
    assert torch.equal(q.zero, q.zero.round())
    assert torch.isfinite(q.dequantize()).all()


# ---- RTN ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,group,symmetric", [(2, 128, False), (3, 64, False), (4, 48, True), (8, 128, False)])
def test_rtn_codes_dequantize_to_fake_quantization(bits, group, symmetric):
    w = torch.randn(24, 200, generator=torch.Generator().manual_seed(bits))
    q = rtn_quantize(w, bits, group, symmetric)
    assert_valid(q, (24, 200), bits)
    assert torch.equal(q.dequantize(), rtn_dequantize(w, bits, group, symmetric))


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_zero_range_groups_are_exact(bits, symmetric):
    w = torch.randn(4, 128)
    w[0, :64] = 0.75  # positive constant group
    w[1, :64] = -0.3125  # negative
    w[2, :64] = 0.0  # all zero
    w[3, 64:] = 1.5
    q = rtn_quantize(w, bits, 64, symmetric)
    assert_valid(q, (4, 128), bits)
    for r, c in ((0, slice(0, 64)), (1, slice(0, 64)), (2, slice(0, 64)), (3, slice(64, 128))):
        assert torch.equal(q.dequantize()[r, c], w[r, c])
        assert torch.equal(rtn_dequantize(w, bits, 64, symmetric)[r, c], w[r, c])


@pytest.mark.parametrize("symmetric", [False, True])
def test_scale_floor_leaves_every_group_with_a_range_unchanged(symmetric):
    """The fix for constant groups must not move any scale of ordinary weights (RESULTS.md depends on them)."""
    g = torch.randn(64, 16, 128, generator=torch.Generator().manual_seed(1)) * torch.logspace(-6, 0, 16)[:, None]
    for bits in (2, 3, 4, 8):
        qmax = 2**bits - 1
        ref = (g.abs().amax(-1, keepdim=True) / (qmax / 2) if symmetric else
               (g.amax(-1, keepdim=True) - g.amin(-1, keepdim=True)) / qmax).clamp_min(1e-8).half().float()
        keep = ref > 0  # groups the old formula could store at all
        assert torch.equal(rtn_params(g, bits, symmetric)[0][keep], ref[keep])


# ---- GPTQ ------------------------------------------------------------------------------------
def test_gptq_beats_rtn_and_approaches_the_exhaustive_least_squares_optimum():
    rows, cols, bits = 32, 8, 2
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, cols, generator=g) + 0.7 * torch.randn(256, 1, generator=g)  # correlated inputs
    w = torch.randn(rows, cols, generator=g)
    rtn, q = rtn_quantize(w, bits, cols), gptq(w, x.T @ x, bits, cols, damp=1e-6)  # (damping moves the optimum)
    assert_valid(q, (rows, cols), bits)
    assert torch.equal(q.scale, rtn.scale) and torch.equal(q.zero, rtn.zero)  # one group, set before any update
    # the best codes on the same grid, row by row, by trying all 4^8 of them: the least-squares optimum
    grid = torch.tensor(list(itertools.product(range(2**bits), repeat=cols)), dtype=torch.float32)
    h = x.T @ x
    best = 0.0
    for r in range(rows):
        d = (grid - q.zero[r]) * q.scale[r] - w[r]
        best += float(((d @ h) * d).sum(1).min())
    e_gptq, e_rtn = output_error(x, w, q), output_error(x, w, rtn)
    assert best <= e_gptq * (1 + 1e-5) < 0.9 * e_rtn
    assert e_gptq < 1.25 * best


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_is_below_rtn_on_a_correlated_layer(act_order):
    x = correlated_inputs(512, 256, 2)
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(3)) * 0.05
    q = gptq(w, x.T @ x, 3, 64, act_order=act_order)
    assert_valid(q, (64, 256), 3)
    assert output_error(x, w, q) < 0.7 * output_error(x, w, rtn_quantize(w, 3, 64))


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_with_identity_h_is_rtn(act_order):
    w = torch.randn(16, 192, generator=torch.Generator().manual_seed(4))
    q, r = gptq(w, torch.eye(192), 3, 64, act_order=act_order), rtn_quantize(w, 3, 64)
    assert torch.equal(q.codes, r.codes) and torch.equal(q.scale, r.scale) and torch.equal(q.zero, r.zero)


def test_act_order_keeps_static_groups_and_the_original_column_order():
    """With a diagonal H no error is propagated, so whatever the processing order the codes are RTN's."""
    w = torch.randn(16, 192, generator=torch.Generator().manual_seed(5))
    h = torch.diag(torch.rand(192, generator=torch.Generator().manual_seed(6)) + 0.1)
    q, r = gptq(w, h, 2, 64, act_order=True), rtn_quantize(w, 2, 64)
    assert torch.equal(q.codes, r.codes) and torch.equal(q.scale, r.scale)


def test_gptq_dead_inputs_and_the_sensitivity_entry_point():
    x = correlated_inputs(256, 128, 7)
    x[:, 10] = 0
    x[:, 64:] = 0  # a whole dead group
    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(8))
    q, losses = gptq_quantize(w, x.T @ x, 2, 64)
    assert torch.isfinite(q).all() and losses.shape == (128,) and float(losses[64:].sum()) == 0.0
    assert torch.equal(q, gptq(w, x.T @ x, 2, 64).dequantize())


# ---- GSQ -------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3])
def test_gsq_at_zero_temperature_is_its_hard_assignment(bits):
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(bits))
    start = rtn_quantize(w, bits, 32)
    gen = torch.Generator().manual_seed(0)
    run = gsq.GumbelRun(start, RoundingConfig(), gen)
    with torch.no_grad():
        run.logits.add_(torch.randn(run.logits.shape, generator=gen))  # some other assignment than the start
        run.scale.mul_(1.01)
    hard = run.hard()
    assert_valid(hard, (8, 64), bits)
    assert not torch.equal(hard.codes, start.codes)
    assert bool(((hard.codes.float() - start.codes.float()).abs() <= (2**bits if bits <= 2 else 2)).all())
    with torch.no_grad():
        soft = run.soft(tau=1e-6, kappa=500.0)
    assert torch.allclose(soft, hard.dequantize(), rtol=0, atol=1e-6)


# ---- the driver on tiny checkpoints ----------------------------------------------------------
@pytest.fixture(scope="module")
def windows(tiny_llama, calib_file):
    return calibration_windows(tokenize(tiny_llama, calib_file), 512, 64, 0)


def mixed_choices(ckpt: Checkpoint) -> dict:
    """Every decoder tensor at one of several widths and groups; one tensor split into two runs."""
    cands = [Candidate(bits=2, group_size=32), Candidate(bits=3, group_size=64), Candidate(bits=4, group_size=32),
             Candidate(bits=8, group_size=64, symmetric=True)]
    out = {}
    for k, u in enumerate(build_inventory(ckpt).quantized):
        cols = u.shape[-1]
        out[u.tensor] = [(0, cols, cands[k % len(cands)])]
    name = next(n for n in out if n.endswith("layers.1.mlp.down_proj.weight"))
    out[name] = [(0, 64, cands[0]), (64, 128, cands[2])]
    return out


@pytest.mark.parametrize("method", METHODS)
def test_every_method_follows_mixed_widths_and_segments(method, tiny_llama, windows):
    ckpt = Checkpoint(tiny_llama)
    choices = mixed_choices(ckpt)
    res = quantize_layers(ckpt, choices, method, windows, FAST, "cpu")
    assert set(res) == set(choices)
    for name, runs in choices.items():
        parts = as_parts(res[name])
        assert isinstance(res[name], SegmentedWeight) == (len(runs) > 1)
        for (a, b, c), (start, q) in zip(runs, parts):
            assert start == a and q.group_size == c.group_size and q.symmetric == c.symmetric
            assert_valid(q, (ckpt.tensors[name].shape[0], b - a), c.bits)
    if method == "rtn":  # the driver's RTN is the evaluator's fake quantization
        for name, runs in choices.items():
            assert torch.equal(res[name].dequantize(), fake_quantize(ckpt.load(name).float(), runs))


def test_driver_quantizes_embedding_and_head_and_refuses_unknown_tensors(tmp_path, calib_file):
    from safetensors.torch import load_file, save_file

    from .conftest import build_tiny_model

    path = build_tiny_model(tmp_path / "untied", "llama", tie_word_embeddings=False)
    state = load_file(path / "model.safetensors")  # the builder drops lm_head as if tied; give it one
    save_file({**state, "lm_head.weight": torch.randn(320, 64).to(torch.bfloat16)}, str(path / "model.safetensors"))
    ckpt = Checkpoint(path)
    ids = calibration_windows(tokenize(path, calib_file), 256, 64, 0)
    cand = Candidate(bits=4, group_size=64)
    choices = {u.tensor: [(0, u.shape[-1], cand)]
               for u in build_inventory(ckpt, include_lm_head=True, include_embeddings=True).quantized}
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(choices)
    res = quantize_layers(ckpt, choices, "gptq", ids, FAST, "cpu")
    emb, head = ckpt.load("model.embed_tokens.weight").float(), ckpt.load("lm_head.weight").float()
    assert torch.equal(res["model.embed_tokens.weight"].codes, rtn_quantize(emb, 4, 64).codes)  # a lookup: RTN
    head_q = res["lm_head.weight"]
    assert_valid(head_q, (320, 64), 4)
    assert not torch.equal(head_q.codes, rtn_quantize(head, 4, 64).codes)  # GPTQ on the head's inputs
    with pytest.raises(BitallocError, match="cannot quantize"):
        quantize_layers(ckpt, {"model.norm.weight": [(0, 64, cand)]}, "gptq", ids, FAST, "cpu")


def test_discquant_keeps_x_in_the_box_and_ends_on_grid_points(tiny_llama, windows, monkeypatch):
    seen = []
    step = discquant.adam_step

    def spy(r, *args):
        step(r, *args)
        x = r.state.tensor[0]
        seen.append((float(x.min()), float(x.max()), bool(((x > 0) & (x < 1)).any())))

    monkeypatch.setattr(discquant, "adam_step", spy)
    ckpt = Checkpoint(tiny_llama)
    choices = {u.tensor: [(0, u.shape[-1], Candidate(bits=2, group_size=32))] for u in build_inventory(ckpt).quantized}
    res = quantize_layers(ckpt, choices, "discquant", windows, FAST, "cpu")
    assert seen and all(lo >= 0 and hi <= 1 for lo, hi, _ in seen) and any(frac for *_, frac in seen)
    for name, q in res.items():
        rtn = rtn_quantize(ckpt.load(name).float(), 2, 32)
        assert torch.equal(q.scale, rtn.scale) and torch.equal(q.zero, rtn.zero)  # RTN's grid
        assert bool(((q.codes.float() - rtn.codes.float()).abs() <= 1).all())  # the lower or upper point


def test_discquant_on_moe_holds_experts_at_gptq_codes(tiny_moe_fused, calib_file):
    """By default routed experts take GPTQ's codes (its sequential pass over every unit) and only the rest is
    learned on RTN's grid; with ``discquant_experts`` the experts are learned too (RTN's grid, not GPTQ's codes)."""
    ckpt = Checkpoint(tiny_moe_fused)
    ids = calibration_windows(tokenize(tiny_moe_fused, calib_file), 192, 64, 0)
    cand = Candidate(bits=2, group_size=32)
    units = build_inventory(ckpt).quantized
    choices = {u.tensor: [(0, u.shape[-1], cand)] for u in units}
    experts = {u.tensor for u in units if u.expert is not None}
    assert experts and len(experts) < len(units)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # starved experts fall back to RTN in both runs alike
        res = quantize_layers(ckpt, choices, "discquant", ids, FAST, "cpu")
        gptq_experts = quantize_layers(ckpt, choices, "gptq", ids, FAST, "cpu")
        learned = quantize_layers(ckpt, choices, "discquant", ids, dataclasses.replace(FAST, discquant_experts=True),
                                  "cpu")
    assert res.keys() == choices.keys()
    assert all(torch.equal(res[n].codes, gptq_experts[n].codes) for n in experts)
    lm = LayerwiseModel(ckpt, "cpu")
    for u in units:
        rtn = rtn_quantize(unit_view(lm.load_layer(u.layer), u).detach().float(), 2, 32)
        assert torch.equal(learned[u.tensor].scale, rtn.scale)  # learned on RTN's grid
        if u.tensor not in experts:
            assert torch.equal(res[u.tensor].scale, rtn.scale)
            assert bool(((res[u.tensor].codes.float() - rtn.codes.float()).abs() <= 1).all())
    assert any(not torch.equal(learned[n].codes, gptq_experts[n].codes) for n in experts)


def test_moe_layouts_agree_and_starved_experts_fall_back_to_rtn(tiny_moe, tiny_moe_fused, calib_file):
    results = []
    for path in (tiny_moe, tiny_moe_fused):
        ckpt = Checkpoint(path)
        ids = calibration_windows(tokenize(path, calib_file), 512, 64, 0)
        cand = Candidate(bits=3, group_size=32)
        choices = {u.tensor: [(0, u.shape[-1], cand)] for u in build_inventory(ckpt).quantized}
        results.append(quantize_layers(ckpt, choices, "gptq", ids, FAST, "cpu"))
    assert results[0].keys() == results[1].keys()
    assert all(torch.equal(results[0][n].codes, results[1][n].codes) for n in results[0])
    starved = RoundingConfig(min_expert_tokens=10**9)
    with pytest.warns(UserWarning, match="quantized with RTN"):
        res = quantize_layers(ckpt, choices, "gptq", ids, starved, "cpu")
    unit = next(u for u in build_inventory(ckpt).quantized if u.expert is not None)
    w = unit_view(LayerwiseModel(ckpt, "cpu").load_layer(unit.layer), unit).detach()
    assert torch.equal(res[unit.tensor].codes, rtn_quantize(w, 3, 32).codes)
    assert not torch.equal(results[1][unit.tensor].codes, res[unit.tensor].codes)  # GPTQ when enough tokens


def test_gsq_on_moe_fixes_routing_keeps_starved_experts_and_guards_each_part(tiny_moe_fused, calib_file,
                                                                              monkeypatch):
    """MoE layers: the experts' objective uses full-precision routing (attention's error cannot leak into it), an
    expert routed fewer learning tokens than its input width keeps its starting codes, every part's error on
    the held-out sequences ends no higher than its starting codes', and by default only attention is learned."""
    ckpt = Checkpoint(tiny_moe_fused)
    ids = calibration_windows(tokenize(tiny_moe_fused, calib_file), 192, 64, 0)
    cand = Candidate(bits=2, group_size=32)
    units = [u for u in build_inventory(ckpt).quantized if u.layer == 0]
    choices = {u.tensor: [(0, u.shape[-1], cand)] for u in units}
    lm = LayerwiseModel(ckpt, "cpu")
    layer = lm.load_layer(0)
    x = lm.embedding_weight()[ids]
    stats = InputStats(layer, units)
    with torch.no_grad():
        lm.run_layer(layer, x, lm.position_embeddings(x.shape[1], x.shape[0]))
    stats.close()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experts under min_expert_tokens start from RTN
        init = quantize_units(layer, units, choices, stats, FAST)
    fp = {u.tensor: unit_view(layer, u).detach().clone() for u in units}
    config = dataclasses.replace(FAST, gsq_experts=True)
    objective = gsq.MoeObjective(lm, layer, units, init, x, config)
    assert objective.train.tolist() == [0, 1] and objective.held.tolist() == [2]
    assert gsq.holdout_split(64, 8)[1].tolist() == list(range(7, 64, 8))
    noisy = {n: w + (0.5 * torch.randn_like(w) if ".self_attn." in n else 0) for n, w in fp.items()}
    with torch.no_grad():
        assert all(float(v) == 0.0 for v in objective.errors(fp, x).values())
        errors = objective.errors(noisy, x)
    assert float(errors["attention"]) > 0 and float(errors["experts"]) == 0.0

    learning = InputStats(layer, units)
    with torch.no_grad():
        lm.run_layer(layer, x[:2], lm.position_embeddings(x.shape[1], 2))
    learning.close()
    starved = {u.expert for u in units if u.expert is not None and learning.tokens(u.tensor) < 64}  # 64: hidden size
    assert objective.starved == starved and 0 < len(starved) < 4  # the data leaves some of each
    out = gsq.refine_layer(lm, layer, units, init, x, x, config, seed=0, track=SILENT)
    for u in units:
        if u.expert in starved:
            assert torch.equal(out[u.tensor].codes, init[u.tensor].codes)
    after, _ = objective.part_errors(out, objective.held)
    assert all(after[part] <= objective.before[part] for part in objective.before)

    monkeypatch.setattr(gsq.MoeObjective, "guard", lambda self, hard: hard)  # what was learned, unguarded
    changed = lambda res: {u.expert for u in units if not torch.equal(res[u.tensor].codes, init[u.tensor].codes)}
    learned = changed(gsq.refine_layer(lm, layer, units, init, x, x, config, seed=0, track=SILENT))
    assert None in learned and learned - {None} and not learned & starved
    assert changed(gsq.refine_layer(lm, layer, units, init, x, x, FAST, seed=0, track=SILENT)) == {None}  # default
    experts_only = [u for u in units if u.expert is not None]  # attention left unquantized: nothing to learn
    out = gsq.refine_layer(lm, layer, experts_only, init, x, x, FAST, seed=0, track=SILENT)
    assert all(out[u.tensor] is init[u.tensor] for u in experts_only)
