"""Score families: known answers on hand-built cases, gradients against finite differences, the sketch
against an exact SVD, the combined fit, and the memory formula on a synthetic many-layer checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bitalloc.model.calib import calibration_windows, tokenize
from bitalloc.model.checkpoint import Checkpoint
from bitalloc.model.inventory import build_inventory
from bitalloc.plan import DEFAULT_CANDIDATES, Candidate
from bitalloc.rounding.gptq import gptq_quantize
from bitalloc.rounding.rtn import rtn_dequantize, rtn_error
from bitalloc.sensitivity import collect, combined, gradient, hessian, importance, spectral
from bitalloc.sensitivity.base import UnitContext, singular_energies, spectrum_stats
from bitalloc.sensitivity.memory import pass_memory

from .conftest import build_tiny_model

CANDS = [Candidate(bits=b, group_size=16) for b in (2, 3, 4)]


def _ctx(w: torch.Tensor, h: torch.Tensor | None, tokens: int, n_seq: int = 4, lim: float = 0.5) -> UnitContext:
    g = torch.Generator().manual_seed(0)
    dws = [rtn_error(w, c.bits, c.group_size) for c in CANDS]
    grads = torch.randn(n_seq, *w.shape, generator=g)
    stats = collect.GradStats(w, dws, n_seq, seed=1)
    for s in range(n_seq):
        stats.add(s, grads[s])
    return UnitContext(w=w, candidates=CANDS, dws=dws, h=h, row_weights=None, tokens=tokens, n_seq=n_seq, n_pred=7,
                       fisher=stats.fisher / n_seq, grad_mean=stats.mean / n_seq, dots=stats.dots,
                       sketch=stats.sketch, lim=lim, zd=0.0)


def test_identity_inputs_make_hessian_errors_the_frobenius_error():
    w = torch.randn(24, 160, generator=torch.Generator().manual_seed(1))
    tokens = 50
    out = hessian.predict(_ctx(w, tokens * torch.eye(160), tokens)).errors
    frob = np.array([float(rtn_error(w, c.bits, c.group_size).double().pow(2).sum()) for c in CANDS])
    for name in ("hessian", "hessian_diag"):
        np.testing.assert_allclose(out[name].sum(0), frob, rtol=1e-6)
    assert out["hessian"].shape == (2, 3)  # two slabs of 128 columns (the second short)
    # H = I: GPTQ has nothing to compensate, so BAQ's c_j at the reference width is 1/2 the RTN column error
    np.testing.assert_allclose(out["baq"][:, 0].sum(), 0.5 * 1.01 * frob[0], rtol=1e-5)  # 1% damping
    np.testing.assert_allclose(out["baq"][:, 1] / out["baq"][:, 0], 0.25)  # BAQ's 2^(-2b) law


def test_hessian_weights_correlated_inputs():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(400, 8, generator=g) @ torch.randn(8, 32, generator=g)  # rank-8 inputs
    w = torch.randn(6, 32, generator=g)
    out = hessian.predict(_ctx(w, x.T @ x, 400)).errors
    dw = rtn_error(w, CANDS[0].bits, CANDS[0].group_size)
    assert out["hessian"][:, 0].sum() == pytest.approx(float((dw @ x.T).pow(2).sum()) / 400, rel=1e-4)


def test_gptq_equals_rtn_without_correlations_and_beats_it_with_them():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 64, generator=g)
    q, losses = gptq_quantize(w, torch.eye(64), 3, 16)
    assert torch.allclose(q, rtn_dequantize(w, 3, 16), atol=1e-6)
    assert torch.allclose(losses, 0.5 * (q - w).pow(2).sum(0) / (1 / 1.01), rtol=1e-4)  # U_jj^2 = 1/(1 + damp)
    x = torch.randn(500, 64, generator=g) @ (torch.eye(64) + 0.9 * torch.randn(64, 64, generator=g) / 8)
    h = x.T @ x
    q, _ = gptq_quantize(w, h, 3, 16)
    rtn = rtn_dequantize(w, 3, 16)
    assert float(((q - w) @ h * (q - w)).sum()) < 0.8 * float(((rtn - w) @ h * (rtn - w)).sum())


def test_rank_one_weight_has_all_spectral_energy_at_k1():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(40, 1, generator=g) @ torch.randn(1, 30, generator=g)
    out = spectral.predict(_ctx(w, 10 * torch.eye(30), 10))
    assert out.stats["spectral_act_top_energy"] == pytest.approx(1.0, abs=1e-6)
    assert out.stats["spectral_act_eff_rank"] == pytest.approx(1.0, abs=1e-4)
    e = out.vectors["rank_slab_energy"]
    assert e.sum() == pytest.approx(float(w.double().pow(2).sum()), rel=1e-5)  # H / T = I (up to the damping)
    # the error: energy x relative noise
    dw = rtn_error(w, CANDS[0].bits, CANDS[0].group_size)
    assert out.errors["spectral"][:, 0].sum() == pytest.approx(float(dw.double().pow(2).sum()), rel=1e-5)


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_spectral_energy_is_the_trace_and_the_spectrum_sums_to_it(shape):
    """E = tr(W H W^T) / T (the score's factor, from one product) equals the sum of the fp32 spectrum,
    on both eigenvalue routes (out <= in: W H W^T; out > in: through the Cholesky factor of H)."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(*shape, generator=g)
    x = torch.randn(200, shape[1], generator=g) @ torch.randn(shape[1], shape[1], generator=g)
    h, tokens = x.T @ x, 200
    energy, sq = spectral.activation_energies(_ctx(w, h, tokens))
    exact = float(torch.trace(w.double() @ h.double() @ w.double().T)) / tokens
    assert energy == pytest.approx(exact, rel=1e-5)
    assert sq.sum() == pytest.approx(exact, rel=1e-4) and len(sq) == min(shape) and (np.diff(sq) <= 0).all()


def test_effective_rank_of_a_flat_spectrum_is_its_length():
    assert spectrum_stats(np.ones(5), "x", 2) == pytest.approx({"x_eff_rank": 5.0, "x_top_energy": 0.4})


def test_identical_states_have_lim_zero_and_opposite_states_two():
    h = torch.randn(3, 10, 16, generator=torch.Generator().manual_seed(0))
    assert importance.lim(h, h) == (pytest.approx(0.0, abs=1e-5), 30)  # fp32 rounding of a cosine
    assert importance.lim(h, -h)[0] == pytest.approx(60.0, rel=1e-6)
    w = torch.zeros(100, 100)
    w[0, :5] = 100.0
    assert importance.outlier_share(w) == (5, 10000)
    ctx = _ctx(torch.randn(8, 16), torch.eye(16), 1, lim=0.0)
    assert not importance.predict(ctx).errors["importance"].any()  # LIM 0: nothing to lose


def test_gradient_family_terms_from_the_per_sequence_gradients():
    """fisher and the Taylor terms against direct formulas over the explicit gradient matrix."""
    w = torch.randn(8, 20, generator=torch.Generator().manual_seed(5))
    ctx = _ctx(w, None, 1, n_seq=5)
    grads = torch.randn(5, 8, 20, generator=torch.Generator().manual_seed(0))
    out = gradient.predict(ctx).errors
    for c, dw in enumerate(ctx.dws):
        fisher = 0.5 * 7 * float((grads.pow(2).mean(0) * dw.pow(2)).sum())
        dots = (grads * dw).sum((1, 2)).double()
        t, se = float(dots.mean()), float(dots.std()) / 5**0.5
        linear = np.sign(t) * max(abs(t) - 2 * se, 0.0)  # soft threshold at two standard errors
        taylor = linear + 0.5 * 7 * float(dots.pow(2).mean())
        assert out["fisher"][:, c].sum() == pytest.approx(fisher, rel=1e-5)
        assert out["gradient"][:, c].sum() == pytest.approx(max(taylor, 0.0), rel=1e-5, abs=1e-9)


def test_first_order_term_is_kept_only_when_significant():
    noise = np.array([[1.0], [-1.0], [1.2], [-0.8]])  # mean 0.1, se 0.5: dropped
    assert gradient.shrink_factor(noise)[0] == 0.0
    signal = np.array([[10.0], [10.5], [9.5], [10.0]])  # mean 10, se 0.2: kept minus 2 se
    assert gradient.shrink_factor(signal)[0] == pytest.approx((10 - 2 * signal.std(ddof=1) / 2) / 10)
    assert gradient.shrink_factor(np.array([[3.0]]))[0] == 0.0  # one sequence: no error estimate


def test_sketch_estimates_the_spectrum_of_the_gradient_matrix():
    """Tensor sketch of rank-3-plus-noise gradients vs the exact SVD of the [n_seq, numel] matrix."""
    g = torch.Generator().manual_seed(6)
    n_seq, shape = 48, (30, 40)
    basis = torch.randn(3, shape[0] * shape[1], generator=g)
    coef = torch.randn(n_seq, 3, generator=g) * torch.tensor([10.0, 5.0, 3.0])
    grads = (coef @ basis + 0.3 * torch.randn(n_seq, shape[0] * shape[1], generator=g)).view(n_seq, *shape)
    exact = torch.linalg.svdvals(grads.view(n_seq, -1).double()).pow(2).numpy()
    sk = gradient.Sketch(shape, seed=0, device=torch.device("cpu"))
    y = torch.stack([sk(grads[s]) for s in range(n_seq)])
    est = singular_energies(y)
    ref, got = spectrum_stats(exact, "g", 3), spectrum_stats(est, "g", 3)
    assert got["g_top_energy"] == pytest.approx(ref["g_top_energy"], abs=0.05)
    assert got["g_eff_rank"] == pytest.approx(ref["g_eff_rank"], rel=0.25)
    assert est.sum() == pytest.approx(exact.sum(), rel=0.3)  # E ||y||^2 = ||g||^2


def test_per_sequence_gradients_match_finite_differences(tiny_llama, calib_file, monkeypatch):
    """The pass's mean gradient and per-sequence dots against central differences of the float64 model loss."""
    from transformers import AutoModelForCausalLM

    ckpt = Checkpoint(tiny_llama)
    inv = build_inventory(ckpt)
    ids = calibration_windows(tokenize(tiny_llama, calib_file), 3 * 32, 32, seed=2)
    target = "model.layers.0.mlp.down_proj.weight"
    seen = {}
    original = collect._Results.record

    def spy(self, unit, ctx):
        if unit.tensor == target:
            seen["ctx"] = ctx
        return original(self, unit, ctx)

    monkeypatch.setattr(collect._Results, "record", spy)
    monkeypatch.setattr(combined, "SAMPLE_UNITS", 0)
    collect.measure_errors(ckpt, inv, ids, list(DEFAULT_CANDIDATES), device="cpu")
    ctx = seen["ctx"]
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float64).eval()
    param = dict(model.named_parameters())[target]
    w0 = param.data.clone()

    def losses(delta: torch.Tensor) -> torch.Tensor:
        param.data = w0 + delta
        with torch.no_grad():
            logits = model(ids).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").mean(1)

    direction = torch.randn(w0.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    eps = 1e-4
    fd = (losses(eps * direction) - losses(-eps * direction)) / (2 * eps)  # [n_seq]
    assert float((ctx.grad_mean.double() * direction).sum()) == pytest.approx(float(fd.mean()), rel=2e-3)
    dw = ctx.dws[0].double()
    fd_dw = (losses(eps * dw) - losses(-eps * dw)) / (2 * eps)
    np.testing.assert_allclose(ctx.dots[:, 0].sum(-1).double().numpy(), fd_dw.numpy(), rtol=0.02, atol=1e-5)  # fp32 pass, cancelling sums


def test_combined_fit_recovers_a_power_law():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 3))
    y = 0.7 + 1.5 * x[:, 0] + 0.01 * rng.normal(size=60)  # only the first feature matters
    coef, loo = combined.fit(x, y)
    assert coef[1] == pytest.approx(1.5, rel=0.05) and abs(coef[2]) < 0.05 and abs(coef[3]) < 0.05
    assert coef[0] == pytest.approx(0.7, abs=0.05) and loo < 0.1


def test_table_holds_every_score_and_combined_metadata(llama_scores):
    t = llama_scores
    assert set(t.scores) >= {"fisher", "gradient", "hessian", "hessian_diag", "baq", "spectral", "importance",
                             "combined"}
    assert t.score == "gradient" and set(t.meta["formulas"]) == set(t.scores)
    info = t.meta["combined"]
    assert info["sample_points"] >= combined.MIN_SAMPLE and set(info["weights"]) == set(combined.FEATURES)
    assert (t.unit_errors("combined") > 0).all()
    assert {"lim", "zd", "grad_eff_rank", "spectral_act_top_energy"} <= set(t.stats)
    assert len(t.meta["lim"]) == 2 and all(0 < v < 2 for v in t.meta["lim"])


def test_memory_formula_and_one_layer_on_a_deep_synthetic_checkpoint(tmp_path, calib_file, monkeypatch):
    """16 layers generated in a temp dir: weights materialised at any time = one layer = the formula's term."""
    from bitalloc.model import hooks, layerwise

    model = build_tiny_model(tmp_path / "deep", num_hidden_layers=16)
    config = json.loads((model / "config.json").read_text())
    ids = calibration_windows(tokenize(model, calib_file), 4 * 32, 32, seed=0)
    est = pass_memory(config, n_seq=4, seqlen=32, n_candidates=len(DEFAULT_CANDIDATES))
    live_bytes, store_bytes, grad_bytes = [], [], []
    load = layerwise.LayerwiseModel.load_layer

    def counted(self, i):
        layer = load(self, i)
        live_bytes.append(sum(p.numel() * p.element_size() for lay in self.layers for p in lay.parameters()
                              if p.device.type != "meta"))
        return layer

    init = layerwise.ActivationStore.__init__

    def store(self, n_seq, seqlen, hidden, workdir=None):
        init(self, n_seq, seqlen, hidden, workdir)
        store_bytes.append(self.tensor.numel() * 4)

    grad_init = collect.GradStats.__init__

    def grads(self, w, dws, n_seq, seed):
        grad_init(self, w, dws, n_seq, seed)
        held = [self.fisher, self.mean, *self.dws]
        grad_bytes.append(4 * sum(t.numel() for t in held))

    sample_bytes = []
    weight_grad = hooks.SampleGrads.weight_grad

    def per_sequence(self, key):
        g = weight_grad(self, key)
        sample_bytes.append(2 * 4 * g.numel())  # the batch's gradients and add_batch's one temporary
        return g

    monkeypatch.setattr(layerwise.LayerwiseModel, "load_layer", counted)
    monkeypatch.setattr(layerwise.ActivationStore, "__init__", store)
    monkeypatch.setattr(collect.GradStats, "__init__", grads)
    monkeypatch.setattr(hooks.SampleGrads, "weight_grad", per_sequence)
    monkeypatch.setattr(combined, "SAMPLE_UNITS", 0)
    collect.measure_errors(Checkpoint(model), build_inventory(Checkpoint(model)), ids, list(DEFAULT_CANDIDATES))
    assert max(sample_bytes) == est.samples  # 4 sequences per backward pass, the largest unit
    assert max(live_bytes) == est.weights  # never more than one decoder layer, whatever the depth
    assert sum(store_bytes) == est.disk  # 4 checkpointed layer inputs and 3 replayed ones, not 16 + 2
    assert est.disk * 2 < 4 * 4 * 32 * config["hidden_size"] * (16 + 2)
    per_layer = sum(grad_bytes) // 16
    assert per_layer == est.gradients


def test_a_small_statistics_budget_gives_the_same_table_with_more_sweeps(tiny_moe, calib_file, monkeypatch):
    """Units split into groups (one backward sweep each) under a tight budget: identical scores."""
    ckpt = Checkpoint(tiny_moe)
    inv = build_inventory(ckpt)
    ids = calibration_windows(tokenize(tiny_moe, calib_file), 2 * 64, 64, seed=0)
    one = collect.measure_errors(ckpt, inv, ids, list(DEFAULT_CANDIDATES), with_combined=False)
    budget = 4 * max(u.numel for u in inv.quantized) * (3 + len(DEFAULT_CANDIDATES))
    layer0 = [u for u in inv.quantized if u.layer == 0]
    assert len(collect.stat_groups(layer0, len(DEFAULT_CANDIDATES), budget)) > 3
    split = collect.measure_errors(ckpt, inv, ids, list(DEFAULT_CANDIDATES), with_combined=False,
                                   stats_budget=budget)
    for name in one.scores:
        np.testing.assert_allclose(split.scores[name], one.scores[name], rtol=1e-5, atol=1e-12, err_msg=name)


def test_rounding_aware_table_predicts_gptq_errors(tiny_llama, calib_file, llama_scores, tmp_path):
    """--rounding gptq: every decoder unit's dW is GPTQ's under its H, which GPTQ makes smaller in H's norm."""
    import bitalloc
    from bitalloc.api import CalibrationConfig
    from bitalloc.errors import ScoresError
    from bitalloc.rounding.config import RoundingConfig

    ckpt = Checkpoint(tiny_llama)
    inv = build_inventory(ckpt)
    ids = calibration_windows(tokenize(tiny_llama, calib_file), 3 * 64, 64, seed=0)
    rtn = collect.measure_errors(ckpt, inv, ids, list(DEFAULT_CANDIDATES), with_combined=False)
    aware = collect.measure_errors(ckpt, inv, ids, list(DEFAULT_CANDIDATES), with_combined=False,
                                   rounding=RoundingConfig())
    assert aware.meta["rounding"] == "gptq" and "rounding" not in rtn.meta
    two = rtn.column(DEFAULT_CANDIDATES[0])
    hess_rtn, hess_gptq = rtn.unit_errors("hessian")[:, two], aware.unit_errors("hessian")[:, two]
    assert (hess_gptq < hess_rtn).mean() > 0.8 and hess_gptq.sum() < 0.8 * hess_rtn.sum()
    assert not np.allclose(rtn.unit_errors("fisher"), aware.unit_errors("fisher"))
    aware.meta["calibration"] = llama_scores.meta["calibration"]
    plan = bitalloc.allocate(tiny_llama, "3.0", scores=aware, calibration=CalibrationConfig(rounding="gptq"))
    assert plan.scores.rounding == "gptq"
    with pytest.raises(ScoresError, match="predicts RTN's errors, not GPTQ's"):
        bitalloc.allocate(tiny_llama, "3.0", scores=llama_scores, calibration=CalibrationConfig(rounding="gptq"))


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_moe_fused"])
def test_batched_sample_grads_equal_one_backward_pass_per_sequence(name, request):
    """SampleGrads (one backward for 3 sequences, experts recomputed from routing) gives each sequence's
    own weight gradient: the .grad of a backward pass of that sequence alone, for every unit of a layer."""
    from bitalloc.model.hooks import SampleGrads
    from bitalloc.model.layerwise import LayerwiseModel, unit_param, unit_slice

    ckpt = Checkpoint(request.getfixturevalue(name))
    lm = LayerwiseModel(ckpt, "cpu")
    layer = lm.load_layer(0)
    units = [u for u in build_inventory(ckpt).quantized if u.layer == 0]
    x0 = torch.randn(3, 16, lm.hidden_size, generator=torch.Generator().manual_seed(0))
    dl = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    for p in layer.parameters():
        p.requires_grad_(False)
    x = x0.clone().requires_grad_(True)
    grads = SampleGrads(layer, units, check_experts=True)
    y = lm.run_layer(layer, x, lm.position_embeddings(16, 3))
    grads.close()
    dx = grads.backward(y, x, dl, want_input=True)
    got = {u.tensor: grads.weight_grad(u.tensor) for u in units}
    for p in layer.parameters():
        p.requires_grad_(True)
    for s in range(3):
        layer.zero_grad()
        xs = x0[s:s + 1].clone().requires_grad_(True)
        lm.run_layer(layer, xs, lm.position_embeddings(16, 1)).backward(dl[s:s + 1])
        torch.testing.assert_close(dx[s], xs.grad[0], rtol=1e-4, atol=1e-6)
        for u in units:
            want = unit_slice(unit_param(layer, u)[0].grad, layer, u)
            torch.testing.assert_close(got[u.tensor][s], want, rtol=1e-4, atol=1e-6, msg=u.tensor)
    assert any(u.expert is not None for u in units) == (name == "tiny_moe_fused")


def test_experts_of_another_form_are_refused(tiny_moe_fused, monkeypatch):
    """Experts' gradients are recomputed in the SwiGLU form (``expert_hidden``); when that does not reproduce
    the module's output (here: the recomputation is made wrong), the pass stops with a message naming the
    module instead of scoring experts from a wrong model."""
    from bitalloc.errors import BitallocError
    from bitalloc.model import hooks
    from bitalloc.model.layerwise import LayerwiseModel

    ckpt = Checkpoint(tiny_moe_fused)
    lm = LayerwiseModel(ckpt, "cpu")
    layer = lm.load_layer(0)
    units = [u for u in build_inventory(ckpt).quantized if u.layer == 0 and u.expert is not None]
    grads = hooks.SampleGrads(layer, units, check_experts=True)
    x = torch.randn(2, 16, lm.hidden_size, requires_grad=True)
    y = lm.run_layer(layer, x, lm.position_embeddings(16, 2))
    grads.close()
    real = hooks.expert_hidden
    monkeypatch.setattr(hooks, "expert_hidden", lambda experts, e, xs: tuple(2 * t for t in real(experts, e, xs)))
    with pytest.raises(BitallocError, match=r"experts of \w+ do not compute act\(gate\) \* up"):
        grads.backward(y, x, torch.ones_like(y), want_input=False)
