"""DiscQuant (Chee et al., arXiv 2501.06417): rounding as a walk inside the grid's hypercube.

Every weight w gets an interpolation x in [0, 1] between its lower and upper grid points,
w(x) = (d + x - zero) * scale, with d = floor(w / scale) + zero on the RTN grid of the original
weights (so w(y) = w at y, the weight's own position). The objective is

    KL(p_fp || p_x) on calibration sequences  +  lambda * sum_i (1 - 2 y_i) x_i

the next-token distributions of the full-precision model against the model with weights w(x),
plus a linear term that pulls each x to its nearer grid point (down if y < 1/2, up otherwise).
As in the reference implementation, the update direction per weight is
lambda * (1 - 2y) + clip(rho / delta2 * dKL/dx, +-clip), with delta2 = 12 * the mean squared RTN
error (so rho is free of the weights' scale), fed to Adam (lr 0.05, cosine decay to 0); x is
clamped to [0, 1] after every step and rounded at the end (code = d + round(x)). x starts at y,
the unquantized model (KL = 0), which suits few steps better than the reference's random start.

Why this can work, and why it may be done layer by layer. The paper's argument: gradients of the
loss over the data distribution span a subspace of low dimension k (they measure a fast-decaying
spectrum), so to first order the KL only sees the k coordinates of x - y along that subspace. The
set {x in [0,1]^n : x - y orthogonal to it} is a polytope of dimension n - k, and its vertices
have at most k fractional coordinates: nearly every weight can be rounded without moving the loss.
The linear term drives x towards such a vertex; the KL keeps it on the slice. Nothing in this
needs every weight's gradient at once or per sample: one exact mean gradient of the KL per step
suffices, and that is what a layer-by-layer sweep computes.

Memory design (a model that does not fit in memory): per step, a batch of sequences is embedded
and run forward one decoder layer at a time (weights w(x), no autograd), each layer's input kept
in a memory-mapped :class:`ActivationStore`; at the top, the KL against the full-precision
logits (recomputed per sequence from the stored full-precision final hidden states, never kept
for the vocabulary) gives dKL/dh; then layers are re-materialised in reverse, the layer is re-run
from its stored input under autograd (layer-level activation checkpointing), and backpropagation
gives dKL/dx for its units and dKL/dh for the layer below. A layer's x is updated right after its
backward: lower layers' gradients use the stored activations and dKL/dh of this step's forward, so
the step is exactly full gradient descent, not block coordinate descent. Per-weight state (x, y
and Adam's two moments: 16 bytes per weight) lives in memory-mapped files and is brought to the
device one layer at a time. Peak memory: one decoder layer with its state and autograd buffers,
plus the batch's activations.
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import torch

from ..model.inventory import Unit
from ..model.layerwise import ActivationStore, LayerwiseModel, unit_view
from ..progress import Tracker
from .base import Quantized, QuantizedWeight, from_parts
from .blockwise import chunks, forward_with, freeze, sample, write
from .config import RoundingConfig
from .rtn import Runs, group_view, rtn_params

LOG = logging.getLogger(__name__)
BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


class Interp:
    """One run of columns of one weight: its lower grid codes and (scale, zero), and file-backed state.

    ``state.tensor`` planes: 0 x, 1 y, 2 and 3 Adam's first and second moments.
    """

    def __init__(self, w: torch.Tensor, bits: int, group_size: int, symmetric: bool):
        s, z = rtn_params(group_view(w.float(), group_size), bits, symmetric)
        scale, zero = s[..., 0].cpu(), z[..., 0].cpu()
        idx = torch.arange(w.shape[1]) // group_size
        pos = w.float().cpu() / scale[:, idx] + zero[:, idx]
        down = pos.floor().clamp(0, 2**bits - 2)
        self.grid = QuantizedWeight(down.to(torch.uint8), scale, zero, bits, group_size, symmetric)
        self.state = ActivationStore(4, *w.shape)
        y = (pos - down).clamp(0, 1)
        self.state.tensor[0] = y
        self.state.tensor[1] = y

    def weight(self, x: torch.Tensor) -> torch.Tensor:
        """w(x) on x's device."""
        idx = self.grid.column_groups().to(x.device)
        return (self.grid.codes.to(x.device).float() + x - self.grid.zero.to(x.device)[:, idx]) * \
            self.grid.scale.to(x.device)[:, idx]

    def squared_rtn_error(self) -> float:
        """Sum over weights of (RTN(w) - w)^2, for delta2."""
        y = self.state.tensor[1]
        idx = self.grid.column_groups()
        return float(((y.round() - y) * self.grid.scale[:, idx]).pow(2).sum())

    def hard(self) -> QuantizedWeight:
        codes = self.grid.codes.float() + self.state.tensor[0].round()
        q = QuantizedWeight(codes.to(torch.uint8), self.grid.scale, self.grid.zero, self.grid.bits,
                            self.grid.group_size, self.grid.symmetric)
        self.state.close()
        return q


Fixed = tuple[dict[int, list[Unit]], dict[str, Quantized]]


def quantize(lm: LayerwiseModel, layers: dict[int, list[Unit]], choices: dict[str, Runs], ids: torch.Tensor,
             embedded: ActivationStore, config: RoundingConfig, track: Tracker,
             fixed: Optional[Fixed] = None) -> dict[str, Quantized]:
    """DiscQuant codes of the decoder units in ``layers``; ``embedded`` holds the (possibly quantized) embeddings
    of ``ids``. ``fixed`` (units per layer, their quantized weights) are already quantized: the quantized model
    uses them as they are, and nothing is learned for them (MoE experts at GPTQ's codes)."""
    fixed_units, fixed_weights = fixed or ({}, {})

    def load(i: int) -> torch.nn.Module:
        layer = lm.load_layer(i)
        write(layer, fixed_units.get(i, []), fixed_weights)
        return layer

    interps: dict[str, list[tuple[int, Interp]]] = {}
    for i, units in layers.items():
        layer = lm.load_layer(i)
        for u in units:
            w = unit_view(layer, u).detach()
            interps[u.tensor] = [(a, Interp(w[:, a:b], c.bits, c.group_size, c.symmetric))
                                 for a, b, c in choices[u.tensor]]
        lm.release_layer(i)
    every = [r for parts in interps.values() for _, r in parts]
    if not every:  # nothing to learn (every quantized unit is fixed)
        return {}
    delta2 = 12 * sum(r.squared_rtn_error() for r in every) / sum(r.state.tensor[0].numel() for r in every)
    teacher = full_precision_top(lm, ids, config, track)
    norm_w, head_w = lm.head_weights()
    n_seq, seqlen = ids.shape
    batch = min(config.discquant_batch, n_seq)
    stores = [ActivationStore(batch, seqlen, lm.hidden_size) for _ in range(lm.num_layers)]
    gen = torch.Generator().manual_seed(config.seed)
    task = track.task("DiscQuant steps", config.discquant_steps)
    try:
        for step in range(config.discquant_steps):
            pick = sample(n_seq, batch, gen)
            h = embedded.tensor[pick].to(lm.device)
            for i in range(lm.num_layers):  # forward, keeping each layer's input
                stores[i].tensor.copy_(h.cpu())
                layer = load(i)
                units = layers.get(i, [])
                with torch.no_grad():
                    h = forward_with(lm, layer, units, current_weights(units, interps, lm.device), h)
                lm.release_layer(i)
            g = kl_grad(lm, h, teacher.tensor[pick], norm_w, head_w)
            lr = config.discquant_lr * 0.5 * (1 + math.cos(math.pi * step / config.discquant_steps))
            for i in reversed(range(lm.num_layers)):  # backward, re-materialising each layer
                layer = load(i)
                freeze(layer)
                units = layers.get(i, [])
                xs = {u.tensor: [(a, r, r.state.tensor[0].to(lm.device).requires_grad_(True))
                                 for a, r in interps[u.tensor]] for u in units}
                for b in chunks(batch, config.batch):
                    weights = {name: torch.cat([r.weight(x) for _, r, x in parts], dim=1) for name, parts in xs.items()}
                    inp = stores[i].tensor[b].to(lm.device).requires_grad_(True)
                    forward_with(lm, layer, units, weights, inp).backward(g[b])
                    g[b] = inp.grad
                for parts in xs.values():
                    for _, r, x in parts:
                        adam_step(r, x.grad, step + 1, lr, config.discquant_rho / delta2, config)
                lm.release_layer(i)
            task.advance()
    finally:
        for st in stores + [teacher]:
            st.close()
    LOG.info("%.2f%% of weights still fractional (|x - round(x)| > 0.05) before the final rounding",
             100 * fractional_share(every))
    return {name: from_parts([(a, r.hard()) for a, r in parts]) for name, parts in interps.items()}


def fractional_share(interps: list[Interp]) -> float:
    """Share of weights the optimisation left away from a grid point (the paper's 'few fractional' claim)."""
    far = sum(int(((r.state.tensor[0] - r.state.tensor[0].round()).abs() > 0.05).sum()) for r in interps)
    return far / sum(r.state.tensor[0].numel() for r in interps)


def current_weights(units: list[Unit], interps: dict[str, list[tuple[int, Interp]]],
                    device: torch.device) -> dict[str, torch.Tensor]:
    return {u.tensor: torch.cat([r.weight(r.state.tensor[0].to(device)) for _, r in interps[u.tensor]], dim=1)
            for u in units}


def full_precision_top(lm: LayerwiseModel, ids: torch.Tensor, config: RoundingConfig,
                       track: Tracker) -> ActivationStore:
    """Final hidden states of the unquantized model on every calibration sequence (the KL's reference)."""
    st = ActivationStore(*ids.shape, lm.hidden_size)
    emb = lm.embedding_weight()
    for b in chunks(ids.shape[0], config.batch):
        st.tensor[b] = emb[ids[b]].cpu()
    del emb
    task = track.task("DiscQuant reference forward", lm.num_layers)
    for i in range(lm.num_layers):
        lm.run_layer_batched(lm.load_layer(i), st.tensor, st.tensor, config.batch)
        lm.release_layer(i)
        task.advance()
    return st


def kl_grad(lm: LayerwiseModel, h: torch.Tensor, h_ref: torch.Tensor, norm_w: torch.Tensor,
            head_w: torch.Tensor) -> torch.Tensor:
    """d KL(p_ref || p) / dh of the mean per-token KL, one sequence at a time (logits are the largest tensor)."""
    grads = torch.empty_like(h)
    for s in range(h.shape[0]):
        hs = h[s].detach().requires_grad_(True)
        logp = torch.log_softmax(lm.head_logits(hs, norm_w, head_w), dim=-1)
        with torch.no_grad():
            logp_ref = torch.log_softmax(lm.head_logits(h_ref[s].to(h.device), norm_w, head_w), dim=-1)
        kl = (logp_ref.exp() * (logp_ref - logp)).sum(-1).mean() / h.shape[0]
        kl.backward()
        grads[s] = hs.grad
    return grads


def adam_step(r: Interp, kl_grad_x: torch.Tensor, t: int, lr: float, rho: float, config: RoundingConfig) -> None:
    """One Adam step on x with the linear term, then the projection onto [0, 1]; state written back."""
    with torch.no_grad():
        dev = kl_grad_x.device
        st = r.state.tensor
        x, y, m, v = (st[k].to(dev) for k in range(4))
        grad = config.discquant_lambda * (1 - 2 * y) + (rho * kl_grad_x).clamp(-config.discquant_clip,
                                                                              config.discquant_clip)
        m.mul_(BETAS[0]).add_(grad, alpha=1 - BETAS[0])
        v.mul_(BETAS[1]).addcmul_(grad, grad, value=1 - BETAS[1])
        step = lr * math.sqrt(1 - BETAS[1]**t) / (1 - BETAS[0]**t)
        x.addcdiv_(m, v.sqrt().add_(ADAM_EPS), value=-step).clamp_(0, 1)
        st[0], st[2], st[3] = x.cpu(), m.cpu(), v.cpu()
