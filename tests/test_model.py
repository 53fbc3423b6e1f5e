"""Model I/O, inventory and the layer-by-layer pipeline against plain transformers autograd."""

import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from bitalloc.model.calib import calibration_windows, tokenize
from bitalloc.api.evaluation import evaluate
from bitalloc.model.checkpoint import Checkpoint
from bitalloc.model.inventory import build_inventory
from bitalloc.plan import DEFAULT_CANDIDATES, Role
from bitalloc.rounding import rtn_error
from bitalloc.sensitivity import truth
from bitalloc.sensitivity.collect import measure_errors

from .conftest import make_text


def test_dense_inventory(tiny_llama):
    inv = build_inventory(Checkpoint(tiny_llama))
    q = inv.quantized
    assert len(q) == 2 * 7 and inv.tied_embeddings
    assert {u.role for u in q} == {Role.attn_q, Role.attn_k, Role.attn_v, Role.attn_o, Role.mlp_gate, Role.mlp_up,
                                   Role.mlp_down}
    locked = {u.tensor: u.reason for u in inv.units if u.locked}
    assert locked["model.embed_tokens.weight"] == "embedding (tied with lm_head)"
    assert locked["model.layers.1.input_layernorm.weight"] == "norm"
    kinds = sorted((g.id, len(g.members)) for g in inv.tie_groups)
    assert kinds == [("layers.0.gate_up", 2), ("layers.0.qkv", 3), ("layers.1.gate_up", 2), ("layers.1.qkv", 3)]
    with_head = build_inventory(Checkpoint(tiny_llama), include_lm_head=True)
    assert not next(u for u in with_head.units if u.role == Role.embedding).locked  # tied: one tensor, both uses


def test_moe_layouts_give_the_same_per_expert_units(tiny_moe, tiny_moe_fused):
    a = build_inventory(Checkpoint(tiny_moe))
    b = build_inventory(Checkpoint(tiny_moe_fused))
    assert [(u.tensor, u.shape, u.role) for u in a.quantized] == [(u.tensor, u.shape, u.role) for u in b.quantized]
    assert "model.layers.0.mlp.experts.3.down_proj.weight" in {u.tensor for u in a.quantized}
    assert all(u.source is None for u in a.quantized)
    fused = [u for u in b.quantized if u.source is not None]
    assert len(fused) == 2 * 4 * 3
    assert {u.source.key.rsplit(".", 1)[1] for u in fused} == {"gate_up_proj", "down_proj"}
    router = [u for u in a.units if u.role == Role.router]
    assert len(router) == 2 and all(u.locked and u.reason == "moe_router" for u in router)
    assert {g.id for g in a.tie_groups} >= {"layers.0.experts.3.gate_up", "layers.1.qkv"}


def _reference_loss(path, ids):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        logits = model(ids).logits
    return float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_moe", "tiny_moe_fused"])
def test_layerwise_eval_matches_transformers(name, heldout_file, request):
    path = request.getfixturevalue(name)
    r = evaluate(Checkpoint(path), heldout_file, tokens=512, seqlen=128)
    ids = torch.from_numpy(tokenize(path, heldout_file)[:512].reshape(4, 128))
    assert r.loss == pytest.approx(_reference_loss(path, ids), rel=1e-5)


def _reference_errors(path, ids, units, inter):
    """fisher and gradient (Taylor) scores from per-sequence autograd on the whole model.

    fisher(c) = (T-1)/2 * sum F dW^2; gradient(c) = [gbar.dW]_2se + (T-1)/2 * mean_s (g_s.dW)^2.
    """
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    params = dict(model.named_parameters())
    grads = {n: [] for n in params}
    for s in range(ids.shape[0]):
        model.zero_grad()
        logits = model(ids[s:s + 1]).logits
        torch.nn.functional.cross_entropy(logits[0, :-1], ids[s, 1:]).backward()
        for n, p in params.items():
            grads[n].append(p.grad.clone())
    n_pred = ids.shape[1] - 1
    fisher, taylor = {}, {}
    for u in units:
        if u.expert is None:
            w, g = params[u.tensor], torch.stack(grads[u.tensor])
        else:  # transformers holds experts fused: gate_up [E, 2I, H], down [E, H, I]
            base = u.tensor.split(".experts.")[0] + ".experts."
            key = base + ("down_proj" if u.role == Role.expert_down else "gate_up_proj")
            sl = {Role.expert_gate: slice(0, inter), Role.expert_up: slice(inter, 2 * inter),
                  Role.expert_down: slice(None)}[u.role]
            w, g = params[key][u.expert, sl], torch.stack(grads[key])[:, u.expert, sl]
        dws = [rtn_error(w.detach(), c.bits, c.group_size) for c in DEFAULT_CANDIDATES]
        fisher[u.tensor] = [0.5 * n_pred * float((g.pow(2).mean(0) * dw.pow(2)).sum()) for dw in dws]
        taylor[u.tensor] = []
        for dw in dws:
            dots = (g * dw).sum((1, 2)).double()
            t, se = float(dots.mean()), float(dots.std()) / len(dots)**0.5
            linear = np.sign(t) * max(abs(t) - 2 * se, 0.0)
            taylor[u.tensor].append(max(0.0, linear + 0.5 * n_pred * float(dots.pow(2).mean())))
    return fisher, taylor


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_moe_fused"])
def test_layerwise_gradient_scores_match_full_model_autograd(name, calib_file, request):
    path = request.getfixturevalue(name)
    ckpt = Checkpoint(path)
    inv = build_inventory(ckpt)
    ids = calibration_windows(tokenize(path, calib_file), 4 * 64, 64, seed=0)
    table = measure_errors(ckpt, inv, ids, list(DEFAULT_CANDIDATES))
    fisher, taylor = _reference_errors(path, ids, inv.quantized, ckpt.config.get("moe_intermediate_size", 0))
    for u in inv.quantized:
        r = table.row(u.tensor)
        np.testing.assert_allclose(table.unit_errors("fisher")[r], fisher[u.tensor], rtol=2e-3, atol=1e-12,
                                   err_msg=u.tensor)
        np.testing.assert_allclose(table.unit_errors("gradient")[r], taylor[u.tensor], rtol=1e-2, atol=1e-9,
                                   err_msg=u.tensor)
    assert math.isfinite(table.meta["calibration_loss"])
    experts = [r for r, t in enumerate(table.tensors) if ".experts." in t]
    assert all(table.tokens[r] <= ids.numel() for r in experts)


def test_local_error_is_frobenius_error_for_identity_inputs(tiny_llama, calib_file):
    """tr(dW H dW^T)/tokens with H = X^T X: a sanity relation with the recorded token counts."""
    ckpt = Checkpoint(tiny_llama)
    inv = build_inventory(ckpt)
    ids = calibration_windows(tokenize(tiny_llama, calib_file), 2 * 64, 64, seed=1)
    table = measure_errors(ckpt, inv, ids, list(DEFAULT_CANDIDATES))
    dense = [r for r, t in enumerate(table.tensors) if "self_attn" in t]
    assert all(table.tokens[r] == ids.numel() for r in dense)
    assert np.all(np.diff(table.unit_errors("hessian")[dense], axis=1) < 0)  # more bits, less local error
    assert np.all(np.diff(table.unit_errors("fisher"), axis=1) <= 0)


def test_at_most_one_decoder_layer_is_materialised(tiny_moe, calib_file, heldout_file, monkeypatch):
    """The pipelines never hold two decoder layers' weights at once (the rest stay on 'meta')."""
    from bitalloc.model import layerwise

    seen = []
    original = layerwise.LayerwiseModel.load_layer

    def checked(self, i):
        live = [j for j, layer in enumerate(self.layers) if any(p.device.type != "meta" for p in layer.parameters())]
        seen.append(live)
        assert live == [], f"layers {live} still materialised when loading layer {i}"
        return original(self, i)

    monkeypatch.setattr(layerwise.LayerwiseModel, "load_layer", checked)
    ckpt = Checkpoint(tiny_moe)
    ids = calibration_windows(tokenize(tiny_moe, calib_file), 256, 128, seed=0)
    table = measure_errors(ckpt, build_inventory(ckpt), ids, list(DEFAULT_CANDIDATES))
    evaluate(ckpt, heldout_file, tokens=256, seqlen=128)
    # forward, replay of layer 1's input, backward, one sweep of `combined`'s truths per MAX_STREAMS, evaluation
    sweeps = math.ceil(table.meta["combined"]["sample_points"] / truth.MAX_STREAMS)
    assert len(seen) == 2 + 1 + 2 + 2 * sweeps + 2


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "qwen3"])
def test_other_dense_architectures(arch, tmp_path, heldout_file):
    from .conftest import build_tiny_model

    path = build_tiny_model(tmp_path / arch, arch)
    inv = build_inventory(Checkpoint(path))
    assert len(inv.quantized) == 2 * 7
    if arch == "qwen2":  # q/k/v biases stay in full precision
        assert {u.reason for u in inv.units if u.role == Role.bias} == {"bias"}
    r = evaluate(Checkpoint(path), heldout_file, bits=4, tokens=256, seqlen=128)
    ids = torch.from_numpy(tokenize(path, heldout_file)[:256].reshape(2, 128))
    unquantized = evaluate(Checkpoint(path), heldout_file, tokens=256, seqlen=128)
    assert unquantized.loss == pytest.approx(_reference_loss(path, ids), rel=1e-5)
    assert r.loss != unquantized.loss


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_moe_fused"])
def test_ground_truth_matches_direct_quantization(name, calib_file, request):
    """measure_truth against whole-model transformers runs with one tensor RTN-quantized."""
    from bitalloc.sensitivity.truth import measure_truth

    path = request.getfixturevalue(name)
    ckpt = Checkpoint(path)
    inv = build_inventory(ckpt)
    ids = calibration_windows(tokenize(path, calib_file), 2 * 128, 128, seed=0)
    cands = [DEFAULT_CANDIDATES[0]]
    truth, base = measure_truth(ckpt, inv, ids, cands)
    picks = [u for u in inv.quantized if u.role in (Role.attn_v, Role.mlp_down, Role.expert_down)][:2]
    for u in picks:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        p = dict(model.named_parameters())
        with torch.no_grad():
            if u.expert is None:
                w = p[u.tensor]
                w.copy_(rtn_error(w, 2, 128) + w)
            else:
                key = u.tensor.split(".experts.")[0] + ".experts.down_proj"
                w = p[key][u.expert]
                w.copy_(rtn_error(w, 2, 128) + w)
            logits = model(ids).logits
        loss = float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                       ids[:, 1:].reshape(-1)))
        assert truth[inv.quantized.index(u), 0] == pytest.approx(loss - base, rel=1e-3, abs=1e-6)


def test_chunked_tokenization_gives_the_ids_of_the_whole_text(tiny_llama, tmp_path, monkeypatch):
    from bitalloc.model import calib

    path = tmp_path / "t.txt"
    path.write_text(make_text(3000, 5) + "  indented line\n\n\nafter blank lines\n" + make_text(3000, 6))
    whole = calib.tokenize(tiny_llama, path)
    monkeypatch.setattr(calib, "TOKENIZE_CHUNK", 1000)
    pieces = list(calib.text_chunks(path.read_text(), 1000))
    assert len(pieces) > 10 and "".join(pieces) == path.read_text()
    assert all(p.endswith("\n") and not p[-2].isspace() and not p[0].isspace() for p in pieces[1:-1])
    np.testing.assert_array_equal(calib.tokenize(tiny_llama, path), whole)
