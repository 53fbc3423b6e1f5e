"""Running one materialised decoder layer with some of its weights replaced by computed tensors.

GSQ and DiscQuant learn parameters that *produce* weights (soft assignments, interpolations);
gradients must flow from the layer's output back to them. ``torch.func.functional_call`` runs
the layer with the replacement tensors in place of its parameters, so nothing is written into
the module and autograd sees the replacements. Experts that transformers holds fused in 3-D
tensors are assembled by writing each expert's [out, in] tensor into its slice of a copy of the
fused parameter (an in-place copy autograd records), so both checkpoint layouts take one path.
Weights that are final (already quantized) are written into the layer instead (``write``).
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from ..model.inventory import Unit
from ..model.layerwise import LayerwiseModel, unit_param, unit_slice, unit_view
from .base import Quantized


def replaced_params(layer: nn.Module, units: list[Unit], weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Parameter name -> tensor for ``functional_call``: the units' weights put where the layer holds them."""
    out: dict[str, torch.Tensor] = {}
    for u in units:
        param, name = unit_param(layer, u)
        if param.dim() == 2:
            out[name] = weights[u.tensor]
            continue
        if name not in out:
            out[name] = param.detach().clone()
        unit_slice(out[name], layer, u).copy_(weights[u.tensor])
    return out


def forward_with(lm: LayerwiseModel, layer: nn.Module, units: list[Unit], weights: dict[str, torch.Tensor],
                 h: torch.Tensor) -> torch.Tensor:
    """The layer's output on ``h`` [batch, seqlen, hidden] with the units' weights replaced."""
    pos = lm.position_embeddings(h.shape[1], h.shape[0])
    kwargs = {"attention_mask": None, "position_ids": None, "position_embeddings": pos, "use_cache": False}
    out = torch.func.functional_call(layer, replaced_params(layer, units, weights), (h,), kwargs)
    return out[0] if isinstance(out, tuple) else out


def freeze(layer: nn.Module) -> None:
    """No parameter of the materialised layer needs a gradient: only the replacements do."""
    for p in layer.parameters():
        p.requires_grad_(False)


def chunks(n: int, size: int) -> Iterator[slice]:
    for s in range(0, n, size):
        yield slice(s, min(n, s + size))


def sample(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """``size`` distinct sequence indices out of ``n`` (all of them when ``size >= n``), sorted."""
    return torch.randperm(n, generator=gen)[:size].sort().values


def write(layer: nn.Module, units: list[Unit], results: dict[str, Quantized]) -> None:
    """Put the units' dequantized weights into the materialised layer."""
    with torch.no_grad():
        for u in units:
            unit_view(layer, u).copy_(results[u.tensor].dequantize())
