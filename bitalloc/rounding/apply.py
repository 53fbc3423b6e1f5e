"""Quantize a checkpoint with one rounding method, one decoder layer in memory at a time.

``quantize_layers`` is the entry point the checkpoint writer calls. Pipeline (GPTQ's
"sequential" scheme): the calibration windows are embedded, then for each decoder layer

1. the layer is materialised and run on the inputs of the *already quantized* model, with the
   forward hooks of :class:`~bitalloc.model.hooks.InputStats` (shared with the sensitivity
   pass) accumulating every unit's H = sum x^T x; MoE experts see only the tokens routed to them;
2. its units are quantized (RTN, GPTQ, or GPTQ refined by GSQ against the layer's full-precision
   output on the same inputs);
3. the dequantized weights are written into the layer, which is run again to produce the next
   layer's inputs, and the layer is released.

So errors of earlier layers are seen (and compensated) by later ones, and peak weight memory is
one decoder layer. Hidden states live in memory-mapped :class:`ActivationStore` files. Units that
read the same input with the same column runs (q/k/v, gate/up) are stacked along rows and
quantized by one GPTQ call (GPTQ treats rows independently given H), which shares the Cholesky
factorisation and makes the updates larger matrix products.

DiscQuant optimises the whole model end to end and has its own layer-by-layer schedule
(``discquant.py``); the driver hands it the decoder units and treats the embedding and head as
below for every method. In MoE models the routed experts take the codes of a sequential GPTQ pass and
DiscQuant learns the rest with them held fixed (``config.discquant_experts``).

Outside the decoder layers: an included embedding (tied or not) is quantized with RTN before
layer 0 (a lookup table has no input correlations to exploit: GPTQ with its diagonal H would be
RTN), so every layer is calibrated on the quantized lookups; an included untied ``lm_head`` is
quantized last with GPTQ (RTN for ``rtn``) on the final-normed hidden states of the quantized model.

MoE fallback: an expert that calibration routed fewer than ``config.min_expert_tokens`` tokens to
is quantized with RTN (GPTQ with H = I), with a warning naming it; its H would be estimated from
too few tokens (rank below its input width) for error compensation to generalise.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import BitallocError
from ..model.checkpoint import Checkpoint
from ..model.hooks import InputStats, input_key
from ..model.inventory import Unit, build_inventory
from ..model.layerwise import ActivationStore, LayerwiseModel, unit_view
from ..plan import Role
from ..progress import SILENT, Tracker
from . import discquant, gsq
from .base import Quantized, QuantizedWeight, as_parts, from_parts
from .blockwise import chunks, write
from .config import DEFAULT, RoundingConfig
from .gptq import gptq
from .rtn import Runs, rtn_quantize

METHODS = ("rtn", "gptq", "gsq", "discquant")


@dataclass
class Work:
    """The units to quantize, by where they live, with their column runs."""

    layers: dict[int, list[Unit]]
    choices: dict[str, Runs]
    embedding: Optional[Unit] = None
    head: Optional[Unit] = None


def quantize_layers(ckpt: Checkpoint, choices: dict[str, Runs], method: str, windows: torch.Tensor,
                    config: RoundingConfig = DEFAULT, device: str = "auto",
                    track: Tracker = SILENT) -> dict[str, Quantized]:
    """Quantized weights of every tensor named in ``choices`` (tensor -> (start, stop, Candidate) runs).

    ``windows``: calibration token ids [n_seq, seqlen]. Tensors not named are not touched (the
    caller copies them). Returns tensor name -> QuantizedWeight, or SegmentedWeight for a tensor
    whose columns are split into runs with different candidates.
    """
    if method not in METHODS:
        raise BitallocError(f"unknown rounding method {method!r}; choose one of {', '.join(METHODS)}")
    work = plan_work(ckpt, choices)
    lm = LayerwiseModel(ckpt, device)
    ids = windows.to(lm.device)
    results: dict[str, Quantized] = {}
    emb = lm.embedding_weight()
    if work.embedding is not None:
        results[work.embedding.tensor] = quantize_runs(emb, work.choices[work.embedding.tensor], None, config)
        emb = results[work.embedding.tensor].dequantize()
    n_seq, seqlen = ids.shape
    x = ActivationStore(n_seq, seqlen, lm.hidden_size)
    try:
        for b in chunks(n_seq, config.batch):
            x.tensor[b] = emb[ids[b]].cpu()
        del emb
        if method == "discquant":
            learned, fixed = split_experts(work.layers, config.discquant_experts)
            if fixed:
                gptq_fixed(lm, work, fixed, x, results, config, track)
            results.update(discquant.quantize(lm, learned, work.choices, ids, x, config, track,
                                              fixed=(fixed, results)))
            if work.head is not None:
                propagate(lm, work.layers, results, x, config)
        else:
            sequential(lm, work, method, x, results, config, track)
        if work.head is not None:
            results[work.head.tensor] = quantize_head(lm, work, method, x, config)
    finally:
        x.close()
    return results


def split_experts(layers: dict[int, list[Unit]], learn_experts: bool) -> tuple[dict[int, list[Unit]],
                                                                                dict[int, list[Unit]]]:
    """(units DiscQuant learns, routed experts it holds at GPTQ's codes) per layer; see ``discquant_experts``."""
    if learn_experts:
        return dict(layers), {}
    learned = {i: [u for u in units if u.expert is None] for i, units in layers.items()}
    fixed = {i: [u for u in units if u.expert is not None] for i, units in layers.items()}
    return {i: us for i, us in learned.items() if us}, {i: us for i, us in fixed.items() if us}


def gptq_fixed(lm: LayerwiseModel, work: Work, fixed: dict[int, list[Unit]], x: ActivationStore,
               results: dict[str, Quantized], config: RoundingConfig, track: Tracker) -> None:
    """GPTQ codes of the ``fixed`` units into ``results``, from a sequential GPTQ pass over all of ``work`` (on a
    copy of the embedded inputs ``x``), so that they are compensated for quantized layers upstream, as in the
    model they will run in; the other units' GPTQ codes are dropped (DiscQuant learns them)."""
    copy = ActivationStore(*x.tensor.shape)
    every: dict[str, Quantized] = {}
    try:
        copy.tensor.copy_(x.tensor)
        sequential(lm, work, "gptq", copy, every, config, track)
    finally:
        copy.close()
    results.update({u.tensor: every[u.tensor] for units in fixed.values() for u in units})


def plan_work(ckpt: Checkpoint, choices: dict[str, Runs]) -> Work:
    """Check ``choices`` against the checkpoint's inventory and sort its units by place."""
    inv = build_inventory(ckpt, include_lm_head=True, include_embeddings=True)
    units = {u.tensor: u for u in inv.units}
    work = Work(layers=defaultdict(list), choices=choices)
    for name in choices:
        u = units.get(name)
        if u is None or u.locked:
            why = "does not exist" if u is None else f"is not quantizable ({u.reason})"
            raise BitallocError(f"cannot quantize {name!r}: it {why} in {ckpt.path}")
        if u.role == Role.embedding:
            work.embedding = u
        elif u.role == Role.lm_head:
            work.head = u
        else:
            work.layers[u.layer].append(u)
    return work


def sequential(lm: LayerwiseModel, work: Work, method: str, x: ActivationStore, results: dict[str, Quantized],
               config: RoundingConfig, track: Tracker) -> None:
    """RTN / GPTQ / GSQ, layer after layer on the quantized model's activations (see the module doc)."""
    target = ActivationStore(*x.tensor.shape) if method == "gsq" else None
    task = track.task(f"quantize ({method})", lm.num_layers)
    try:
        for i in range(lm.num_layers):
            layer = lm.load_layer(i)
            units = work.layers.get(i, [])
            stats = None
            if method != "rtn" and units:
                stats = InputStats(layer, units)
                run(lm, layer, x.tensor, None if target is None else target.tensor, config.batch)
                stats.close()
            layer_results = quantize_units(layer, units, work.choices, stats, config)
            if method == "gsq" and units:
                layer_results = gsq.refine_layer(lm, layer, units, layer_results, x.tensor, target.tensor, config,
                                                 seed=config.seed + i, track=track)
            write(layer, units, layer_results)
            results.update(layer_results)
            if method != "rtn":  # RTN's codes do not depend on the activations
                run(lm, layer, x.tensor, x.tensor, config.batch)
            lm.release_layer(i)
            task.advance()
    finally:
        if target is not None:
            target.close()


def propagate(lm: LayerwiseModel, layers: dict[int, list[Unit]], results: dict[str, Quantized], x: ActivationStore,
              config: RoundingConfig) -> None:
    """Run the quantized model over ``x`` in place (layer inputs -> final hidden states)."""
    for i in range(lm.num_layers):
        layer = lm.load_layer(i)
        write(layer, layers.get(i, []), results)
        run(lm, layer, x.tensor, x.tensor, config.batch)
        lm.release_layer(i)


def run(lm: LayerwiseModel, layer, src: torch.Tensor, dst: Optional[torch.Tensor], batch: int) -> None:
    """``dst = layer(src)`` in batches; ``dst=None`` only runs the layer (for its hooks)."""
    with torch.no_grad():
        for b in chunks(src.shape[0], batch):
            h = src[b].to(lm.device)
            out = lm.run_layer(layer, h, lm.position_embeddings(h.shape[1], h.shape[0]))
            if dst is not None:
                dst[b] = out.to(dst.device)


def quantize_units(layer, units: list[Unit], choices: dict[str, Runs], stats: Optional[InputStats],
                   config: RoundingConfig) -> dict[str, Quantized]:
    """RTN (``stats`` None) or GPTQ of a layer's units; units sharing an input and runs go in one call."""
    groups: dict[tuple, list[Unit]] = defaultdict(list)
    for u in units:
        groups[(input_key(u), tuple((a, b, c.id) for a, b, c in choices[u.tensor]))].append(u)
    out: dict[str, Quantized] = {}
    for members in groups.values():
        first = members[0]
        h = None if stats is None else stats.hessian(first.tensor)
        if h is not None and first.expert is not None and stats.tokens(first.tensor) < config.min_expert_tokens:
            warnings.warn(f"{', '.join(u.tensor for u in members)}: {stats.tokens(first.tensor)} calibration tokens "
                          f"routed (< {config.min_expert_tokens}); quantized with RTN", stacklevel=2)
            h = None
        w = torch.cat([unit_view(layer, u).detach() for u in members])
        q = quantize_runs(w, choices[first.tensor], h, config)
        rows = 0
        for u in members:
            n = unit_view(layer, u).shape[0]
            out[u.tensor] = from_parts([(a, take_rows(p, rows, rows + n)) for a, p in as_parts(q)])
            rows += n
    return out


def quantize_runs(w: torch.Tensor, runs: Runs, h: Optional[torch.Tensor], config: RoundingConfig) -> Quantized:
    """Each run of columns with its candidate: GPTQ on H's diagonal block when ``h`` is given, else RTN."""
    parts = []
    for a, b, c in runs:
        if h is None:
            parts.append((a, rtn_quantize(w[:, a:b], c.bits, c.group_size, c.symmetric)))
        else:
            parts.append((a, gptq(w[:, a:b], h[a:b, a:b], c.bits, c.group_size, c.symmetric, config.act_order,
                                  config.damp, config.block)))
    return from_parts(parts)


def take_rows(q: QuantizedWeight, start: int, stop: int) -> QuantizedWeight:
    return QuantizedWeight(q.codes[start:stop], q.scale[start:stop], q.zero[start:stop], q.bits, q.group_size,
                           q.symmetric)


def quantize_head(lm: LayerwiseModel, work: Work, method: str, x: ActivationStore, config: RoundingConfig) -> Quantized:
    """The untied lm_head: GPTQ on the final-normed hidden states of the quantized model (RTN for ``rtn``)."""
    norm_w, head_w = lm.head_weights()
    h = None
    if method != "rtn":
        h = torch.zeros(head_w.shape[1], head_w.shape[1], device=lm.device)
        with torch.no_grad():
            for b in chunks(x.tensor.shape[0], config.batch):
                xn = lm.final_norm(x.tensor[b].to(lm.device), norm_w).flatten(0, 1)
                h += xn.T @ xn
    return quantize_runs(head_w, work.choices[work.head.tensor], h, config)
