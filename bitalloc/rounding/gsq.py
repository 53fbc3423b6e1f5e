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
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..model.inventory import Unit
from ..model.layerwise import LayerwiseModel
from ..progress import Tracker
from .base import Quantized, QuantizedWeight, as_parts, from_parts
from .blockwise import chunks, forward_with, freeze, sample
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
    """GSQ of one decoder layer's units, from their GPTQ results ``init``; inputs/targets [n_seq, seqlen, hidden]."""
    freeze(layer)
    gen = torch.Generator(device=lm.device).manual_seed(seed)
    cpu_gen = torch.Generator().manual_seed(seed)
    runs = {u.tensor: [(a, GumbelRun(q, config, gen)) for a, q in as_parts(init[u.tensor])] for u in units}
    every = [r for parts in runs.values() for _, r in parts]
    opt = Lion([([r.logits for r in every], config.gsq_lr_logits), ([r.scale for r in every], config.gsq_lr_scale)])
    steps = config.gsq_steps
    task = track.task(f"GSQ layer {units[0].layer}", steps)
    for step in range(steps):
        t = step / max(steps - 1, 1)
        tau = config.gsq_tau[0] + (config.gsq_tau[1] - config.gsq_tau[0]) * t
        kappa = config.gsq_kappa[0] + (config.gsq_kappa[1] - config.gsq_kappa[0]) * t
        pick = sample(inputs.shape[0], config.gsq_batch, cpu_gen)
        weights = {name: torch.cat([r.soft(tau, kappa, gen) for _, r in parts], dim=1) for name, parts in runs.items()}
        out = forward_with(lm, layer, units, weights, inputs[pick].to(lm.device))
        nn.functional.mse_loss(out, targets[pick].to(lm.device)).backward()
        opt.step(1.0 - t)
        task.advance()
    hard = {name: from_parts([(a, r.hard()) for a, r in parts]) for name, parts in runs.items()}
    before, after = block_error(lm, layer, units, init, inputs, targets, config), \
        block_error(lm, layer, units, hard, inputs, targets, config)
    LOG.info("layer %s: block output error GPTQ %.3e -> GSQ %.3e", units[0].layer, before, after)
    if after >= before:
        LOG.info("layer %s: GSQ output error %.3e is not below GPTQ's %.3e; keeping GPTQ's codes",
                 units[0].layer, after, before)
        return init
    return hard


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
