"""GSQ: Gumbel-Softmax quantization (arXiv 2604.18556), refining GPTQ's codes block by block.

Starting point: GPTQ's codes c and per-group (scale, zero). Every weight gets logits over a few
candidate codes: c - 2 .. c + 2 (clipped to the grid) above 2 bits, every level of the grid at
<= 2 bits. Its soft value is

    w = scale_g * sum_k softmax((kappa * logits + gumbel) / tau)_k * (level_k - zero_g)

so gradients reach both the logits and the per-group scales. Logits start as in the reference
implementation: std * (noise + strength * prior), prior_k = -1/2 (level_k - c)^2 centred over the
valid levels, which puts most of the initial mass on GPTQ's code.

Objective: the mean squared error of the decoder layer's output against the full-precision
layer's output on the same inputs (the quantized model's activations, so each layer also learns
to absorb what earlier layers got wrong), on random batches of calibration sequences; all the
layer's units are learned jointly. Schedule (``RoundingConfig``): ``gsq_steps`` steps of
``gsq_batch`` sequences; tau falls linearly from 2 to 0.05 (soft -> nearly one-hot) while kappa
grows linearly from 100 to 500 (sharpening the logits), as in the reference; optimizer Lion
(betas 0.9, 0.99), which moves every parameter by the same amount per step whatever its gradient
scale (logits lr 5e-4, scales lr 2e-5, both decaying linearly to 0). At the end every weight
takes the argmax of its logits and scales are rounded to fp16. Guard: the hard result is kept
only if its block output error on all calibration sequences is below GPTQ's; otherwise GPTQ's
codes stay (logged at INFO level).

MoE decoder layers (any unit is a routed expert) learn a different objective, :class:`MoeObjective`:
the attention output's error plus the MoE block's output error with the full-precision routing and
the full-precision attention path held fixed, each expert's output weighted by its top-k weight.
Measured on qwen3moe-20m (2.5 bpp plan, layers 0 and 3; docs/rounding.md): with the whole block's
output as the target, GSQ lowered the block error by trading the units against each other
(attention error up 20-60%, experts worse on their own routed tokens, the errors cancelling in
the residual sum) and nearly doubled the tokens whose top-2 experts differ from full precision
(2.3% -> 4.2% in layer 3); the router is discontinuous, so that cancellation does not survive the
next layers. With the routing fixed no unit can compensate another through the router, and an
expert is fitted only to the tokens actually routed to it. An expert routed fewer learning tokens
than the input width of its linears keeps its starting codes: its routed inputs span fewer
dimensions than the weight has columns, so weight changes in the rest are invisible to the
objective and drift with the noise of the sign updates (measured: 9-150-token experts ended
10-300x worse than GPTQ on their routed tokens). Experts see a fraction of the tokens a dense MLP
sees and overfit them (layer 1: in-sample errors 10-25% below GPTQ's, held-out ones up to 73% above), so
every ``gsq_holdout``-th calibration sequence is kept out of learning and the guard is per part
(attention, each expert): a part keeps GSQ's codes only if its own error on those held-out
sequences is below its starting codes'. Even so the experts that pass that guard cost held-out
perplexity (2.924 with them, 2.900 with attention alone, GPTQ 2.917), so by default
(``gsq_experts`` False) MoE layers learn their attention only and experts keep GPTQ's codes.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import torch
from torch import nn

from ..errors import BitallocError
from ..model.inventory import Unit
from ..model.layerwise import LayerwiseModel
from ..progress import Tracker
from .base import Quantized, QuantizedWeight, as_parts, from_parts
from .blockwise import chunks, forward_with, freeze, replaced_params, sample
from .config import RoundingConfig
from .rtn import FP16_TINY

LOG = logging.getLogger(__name__)
EPS = 1e-10


class GumbelRun:
    """Learnable soft codes and scales of one run of columns of one weight, initialised from ``q``."""

    def __init__(self, q: QuantizedWeight, config: RoundingConfig, gen: torch.Generator):
        self.q = q
        codes = q.codes.float()
        if q.bits <= 2:
            offsets = torch.arange(q.qmax + 1, device=codes.device).view(-1, 1, 1) - codes  # every level
        else:
            offsets = torch.arange(-config.gsq_offsets, config.gsq_offsets + 1, device=codes.device).view(-1, 1, 1)
            offsets = offsets.float().expand(-1, *codes.shape)
        levels = codes + offsets
        self.valid = (levels >= 0) & (levels <= q.qmax)
        self.idx = q.column_groups()
        self.centred = levels - q.zero[:, self.idx]  # level - zero, per candidate
        prior = -0.5 * offsets.pow(2)
        prior = prior - (prior * self.valid).sum(0) / self.valid.sum(0)
        noise = torch.randn(prior.shape, generator=gen, device=gen.device).to(prior.device)
        logits = config.gsq_init_std * (noise + config.gsq_init_strength * prior)
        self.logits = nn.Parameter(logits.masked_fill(~self.valid, 0.0))
        self.scale = nn.Parameter(q.scale.clone())

    def probs(self, tau: float, kappa: float, gen: torch.Generator | None) -> torch.Tensor:
        z = kappa * self.logits
        if gen is not None:
            u = torch.rand(z.shape, generator=gen, device=gen.device).to(z.device)
            z = z - torch.log(-torch.log(u + EPS) + EPS)
        return torch.softmax(z.masked_fill(~self.valid, float("-inf")) / tau, dim=0)

    def soft(self, tau: float, kappa: float, gen: torch.Generator | None = None) -> torch.Tensor:
        """The soft weight [out, cols]; ``gen`` None leaves out the Gumbel noise (evaluation)."""
        return (self.probs(tau, kappa, gen) * self.centred).sum(0) * self.scale[:, self.idx]

    def hard(self) -> QuantizedWeight:
        """Argmax codes with the learned scales rounded to fp16 (in place, so ``soft`` agrees)."""
        with torch.no_grad():
            self.scale.copy_(self.scale.abs().half().float().clamp_min(FP16_TINY))
            k = self.logits.masked_fill(~self.valid, float("-inf")).argmax(0, keepdim=True)
            codes = (self.centred.gather(0, k)[0] + self.q.zero[:, self.idx]).round()
        return QuantizedWeight(codes.to(torch.uint8), self.scale.detach().clone(), self.q.zero, self.q.bits,
                               self.q.group_size, self.q.symmetric)


class Lion:
    """Lion (Chen et al. 2023): sign of an interpolated momentum; one state tensor per parameter."""

    def __init__(self, groups: list[tuple[list[torch.Tensor], float]], betas: tuple[float, float] = (0.9, 0.99)):
        self.groups, self.betas = groups, betas
        self.state = {id(p): torch.zeros_like(p) for params, _ in groups for p in params}

    @torch.no_grad()
    def step(self, factor: float) -> None:
        b1, b2 = self.betas
        for params, lr in self.groups:
            for p in params:
                if p.grad is None:
                    continue
                m = self.state[id(p)]
                p.add_((b1 * m + (1 - b1) * p.grad).sign(), alpha=-lr * factor)
                m.mul_(b2).add_(p.grad, alpha=1 - b2)
                p.grad = None


def refine_layer(lm: LayerwiseModel, layer: nn.Module, units: list[Unit], init: dict[str, Quantized],
                 inputs: torch.Tensor, targets: torch.Tensor, config: RoundingConfig, seed: int,
                 track: Tracker) -> dict[str, Quantized]:
    """GSQ of one decoder layer's units, from their GPTQ results ``init``; inputs/targets [n_seq, seqlen, hidden].

    ``targets`` (the full-precision layer's outputs) are the objective of dense layers; MoE layers
    use :class:`MoeObjective`, which recomputes its full-precision references from ``inputs``.
    """
    freeze(layer)
    moe = None
    if any(u.expert is not None for u in units):
        parts = units if config.gsq_experts else [u for u in units if u.expert is None]  # experts keep GPTQ's
        if not parts:
            return {u.tensor: init[u.tensor] for u in units}
        moe = MoeObjective(lm, layer, parts, init, inputs, config)
    learned = units if moe is None else [u for u in moe.units if u.expert not in moe.starved]
    fixed = {u.tensor: init[u.tensor].dequantize() for u in units if u not in learned}
    gen = torch.Generator(device=lm.device).manual_seed(seed)
    cpu_gen = torch.Generator().manual_seed(seed)
    runs = {u.tensor: [(a, GumbelRun(q, config, gen)) for a, q in as_parts(init[u.tensor])] for u in learned}
    every = [r for parts in runs.values() for _, r in parts]
    opt = Lion([([r.logits for r in every], config.gsq_lr_logits), ([r.scale for r in every], config.gsq_lr_scale)])
    pool = torch.arange(inputs.shape[0]) if moe is None else moe.train
    steps = config.gsq_steps
    task = track.task(f"GSQ layer {units[0].layer}", steps)
    for step in range(steps):
        t = step / max(steps - 1, 1)
        tau = config.gsq_tau[0] + (config.gsq_tau[1] - config.gsq_tau[0]) * t
        kappa = config.gsq_kappa[0] + (config.gsq_kappa[1] - config.gsq_kappa[0]) * t
        pick = pool[sample(len(pool), config.gsq_batch, cpu_gen)]
        weights = {name: torch.cat([r.soft(tau, kappa, gen) for _, r in parts], dim=1) for name, parts in runs.items()}
        h = inputs[pick].to(lm.device)
        if moe is None:
            loss = nn.functional.mse_loss(forward_with(lm, layer, units, weights, h), targets[pick].to(lm.device))
        else:
            loss = sum(moe.errors({**fixed, **weights}, h).values()) / h.numel()
        loss.backward()
        opt.step(1.0 - t)
        task.advance()
    hard = {**{name: from_parts([(a, r.hard()) for a, r in parts]) for name, parts in runs.items()},
            **{u.tensor: init[u.tensor] for u in units if u not in learned}}
    if moe is not None:
        return {**hard, **moe.guard(hard)}
    before, after = block_error(lm, layer, units, init, inputs, targets, config), \
        block_error(lm, layer, units, hard, inputs, targets, config)
    LOG.info("layer %s: block output error GPTQ %.3e -> GSQ %.3e", units[0].layer, before, after)
    if after >= before:
        LOG.info("layer %s: GSQ output error %.3e is not below GPTQ's %.3e; keeping GPTQ's codes",
                 units[0].layer, after, before)
        return init
    return hard


class MoeObjective:
    """GSQ's objective in an MoE decoder layer: per-part output errors with full-precision routing held fixed.

    Parts: ``"attention"`` (the attention output on the layer's inputs) and each routed expert
    (its top-k-weighted output on the tokens the full-precision router sends it, its input the
    full-precision attention path's normed hidden state, as for GPTQ's H). Expects transformers'
    MoE block (``mlp.gate`` returning (logits, top-k weights, top-k indices); ``mlp.experts``
    taking (hidden, indices, weights)); every other unit of the layer must be an attention projection.
    """

    def __init__(self, lm: LayerwiseModel, layer: nn.Module, units: list[Unit], init: dict[str, Quantized],
                 inputs: torch.Tensor, config: RoundingConfig):
        other = [u.tensor for u in units if u.expert is None and not u.local.startswith("self_attn.")]
        if other:
            raise BitallocError(f"GSQ on an MoE layer handles attention and routed experts only, not {other[0]}")
        self.lm, self.layer, self.units, self.init, self.inputs, self.config = lm, layer, units, init, inputs, config
        self.experts = layer.get_submodule("mlp.experts")
        self.train, self.held = holdout_split(inputs.shape[0], config.gsq_holdout)
        width = {e: max(u.shape[-1] for u in units if u.expert == e) for e in {u.expert for u in units} - {None}}
        _, tokens = self.part_errors(init, self.train)
        self.before, _ = self.part_errors(init, self.held)
        self.starved = {e for e, w in width.items() if tokens[e] < w}
        if self.starved:
            LOG.info("layer %s: experts %s routed fewer tokens than their input width; their codes are kept",
                     units[0].layer, sorted(self.starved))

    def reference(self, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Full-precision (normed input, attention output, MoE input, top-k weights, top-k indices) on ``h``."""
        layer = self.layer
        with torch.no_grad():
            normed = layer.input_layernorm(h)
            attn = layer.self_attn(normed, **self.attn_kwargs(h))[0]
            z = layer.post_attention_layernorm(h + attn).flatten(0, 1)
            _, top_w, top_i = layer.mlp.gate(z)
        return normed, attn, z, top_w, top_i

    def attn_kwargs(self, h: torch.Tensor) -> dict:
        return {"position_embeddings": self.lm.position_embeddings(h.shape[1], h.shape[0]), "attention_mask": None}

    def errors(self, weights: dict[str, torch.Tensor], h: torch.Tensor, ref: tuple[torch.Tensor, ...] | None = None,
               only: int | None = None) -> dict[str, torch.Tensor]:
        """Summed squared errors on ``h`` [batch, seqlen, hidden] of ``"attention"`` and ``"experts"``.

        ``ref``: :meth:`reference` of ``h`` when already computed; ``only``: just the error of expert
        ``only``'s weighted outputs, on the tokens routed to it (the other routes' weights set to 0).
        """
        normed, attn, z, top_w, top_i = self.reference(h) if ref is None else ref
        if only is not None:
            routed = (top_i == only).any(-1)
            z, top_i, top_w = z[routed], top_i[routed], top_w[routed].masked_fill(top_i[routed] != only, 0.0)
        params = replaced_params(self.layer, self.units, weights)
        attn_params = {k.removeprefix("self_attn."): v for k, v in params.items() if k.startswith("self_attn.")}
        expert_params = {k.removeprefix("mlp.experts."): v for k, v in params.items() if k.startswith("mlp.experts.")}
        out = {}
        if attn_params and only is None:
            attn_q = torch.func.functional_call(self.layer.self_attn, attn_params, (normed,), self.attn_kwargs(h))[0]
            out["attention"] = (attn_q - attn).pow(2).sum()
        if expert_params:
            with torch.no_grad():
                want = self.experts(z, top_i, top_w)
            got = torch.func.functional_call(self.experts, expert_params, (z, top_i, top_w))
            out["experts"] = (got - want).pow(2).sum()
        return out

    def part_errors(self, results: dict[str, Quantized],
                    sequences: torch.Tensor) -> tuple[dict[str | int, float], dict[int, int]]:
        """Each part's squared error over the calibration ``sequences``, and the tokens routed to each expert."""
        weights = {u.tensor: results[u.tensor].dequantize() for u in self.units}
        experts = sorted({u.expert for u in self.units} - {None})
        total: dict[str | int, float] = defaultdict(float)
        tokens: dict[int, int] = defaultdict(int)
        with torch.no_grad():
            for b in chunks(len(sequences), self.config.batch):
                h = self.inputs[sequences[b]].to(self.lm.device)
                ref = self.reference(h)
                if any(u.expert is None for u in self.units):
                    total["attention"] += float(self.errors(weights, h, ref)["attention"])
                for e in experts:
                    total[e] += float(self.errors(weights, h, ref, only=e)["experts"])
                    tokens[e] += int((ref[4] == e).any(-1).sum())
        return dict(total), dict(tokens)

    def guard(self, hard: dict[str, Quantized]) -> dict[str, Quantized]:
        """Per part, GSQ's codes where its error on the held-out sequences is below the start's."""
        after, _ = self.part_errors(hard, self.held)
        out = dict(self.init)
        for part, err in after.items():
            members = [u.tensor for u in self.units if (u.expert is None) == (part == "attention") and
                       (part == "attention" or u.expert == part)]
            kept = err < self.before[part]
            LOG.info("layer %s, %s: held-out output error GPTQ %.3e -> GSQ %.3e%s", self.units[0].layer,
                     part if part == "attention" else f"expert {part}", self.before[part], err,
                     "" if kept else "; keeping the starting codes")
            if kept:
                out.update({name: hard[name] for name in members})
        return out


def holdout_split(n: int, every: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(learned, held-out) sequence indices: every ``every``-th sequence held out (the last one when n < every).

    A single sequence is both: with nothing to spare, the guard falls back to comparing in-sample.
    """
    index = torch.arange(n)
    if n == 1:
        return index, index
    held = (index % every == every - 1) if n >= every else (index == n - 1)
    return index[~held], index[held]


def block_error(lm: LayerwiseModel, layer: nn.Module, units: list[Unit], results: dict[str, Quantized],
                inputs: torch.Tensor, targets: torch.Tensor, config: RoundingConfig) -> float:
    """Mean squared error of the layer's output with ``results`` in place, over all sequences."""
    weights = {u.tensor: results[u.tensor].dequantize() for u in units}
    total = 0.0
    with torch.no_grad():
        for b in chunks(inputs.shape[0], config.batch):
            out = forward_with(lm, layer, units, weights, inputs[b].to(lm.device))
            total += float((out - targets[b].to(lm.device)).pow(2).sum())
    return total / targets.numel()
