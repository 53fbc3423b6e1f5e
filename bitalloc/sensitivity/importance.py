"""Layer-importance family (Layer-wise quantization, Dumitru et al. 2024): one score per decoder layer.

    LIM_l = 1 - mean_t cos(h_in,t, h_out,t)      how much decoder layer l rewrites the residual
                                                 stream on calibration tokens (0: identity layer)
    ZD_l  = share of the layer's quantized weights with |z| > ZD_THRESHOLD, z standardised per
            tensor (an outlier share; needs no data)

The paper ranks layers by either score; here LIM is the importance and ZD is reported beside it.
Per candidate, the layer's LIM is spread over its units in proportion to their size and times
their relative noise: ``importance = LIM * numel * ||dW_c||^2 / ||W||^2`` (``base.scaled_noise``).
Units outside the decoder layers (a counted lm_head or embedding) take the largest LIM of the
model: no layer-level score exists for them, and they are the ones every tool keeps widest.
Cost: one cosine per token per layer, on the stored hidden states.
"""

from __future__ import annotations

import torch

from .base import FamilyOutput, UnitContext, scaled_noise

PREDICTORS = {"importance": "LIM * numel * ||dW||^2 / ||W||^2, LIM = 1 - mean cos(h_in, h_out) of the layer"}
ZD_THRESHOLD = 3.0


def lim(h_in: torch.Tensor, h_out: torch.Tensor) -> tuple[float, int]:
    """(sum over tokens of 1 - cos(h_in, h_out), number of tokens) for [..., hidden] states."""
    cos = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
    return float((1 - cos).sum()), cos.numel()


def outlier_share(w: torch.Tensor) -> tuple[int, int]:
    """(weights with |z| > ZD_THRESHOLD, weights) for one tensor, z standardised over the tensor."""
    w = w.float()
    z = (w - w.mean()) / w.std().clamp_min(1e-12)
    return int((z.abs() > ZD_THRESHOLD).sum()), w.numel()


def predict(ctx: UnitContext) -> FamilyOutput:
    return FamilyOutput({"importance": scaled_noise(ctx, ctx.lim * ctx.w.numel())}, {"lim": ctx.lim, "zd": ctx.zd})
