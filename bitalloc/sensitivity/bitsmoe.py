"""BitsMoE's surrogate: the predicted output error of every spectral slab of every expert factor.

One forward pass over the calibration windows, one decoder layer in memory at a time. While a layer
runs, forward hooks collect each expert's routed-input second moment H_e (``model.hooks``; the down
projection's input is the expert's own activation). Then, per projection, the shared basis and the
factors are built (``rounding.lowrank``) and, for each expert e, rank k and width b,

    input side (gate, up):  err_k(b) = ||dF_k(b)||^2 * b_k^T Sigma_e b_k  = sigma_ek^2 * eps_ek(b) * b_k^T Sigma_e b_k
    output side (down):     err_k(b) = dF_k(b) Sigma_e dF_k(b)^T

with Sigma_e = H_e / T (T: all calibration tokens, so routing frequency is inside), dF_k(b) the
*measured* RTN error of factor row k at width b (eps_ek(b) = ||dF_k||^2 / ||F_k||^2; width 0: eps = 1),
b_k the k-th basis row. A slab's error is the sum over its ranks. The output-side sum is exact (the
basis rows are orthonormal, so ranks add up in the output); the input side drops the cross terms
(dF_k . dF_l) b_k^T Sigma_e b_l, which independent row-wise rounding makes average out.

These are output errors (squared activations per token); ``output_mse`` measures, in the same units,
the error of RTN of the whole expert tensor at every per-tensor candidate, which is what the API uses
to put the slabs in the loss units of the error table (docs/bitsmoe.md).
"""

from __future__ import annotations

import time
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import CalibrationError
from ..model.checkpoint import Checkpoint
from ..model.hooks import InputStats
from ..model.inventory import Unit
from ..model.layerwise import ActivationStore, LayerwiseModel, unit_view
from ..plan import Candidate, Role
from ..progress import SILENT, Tracker
from ..rounding.lowrank import factors, quantize_rows, shared_basis, slab_bounds, space_matrix
from ..rounding.rtn import rtn_error
from .collect import FORWARD_BATCH

PROJECTIONS = {Role.expert_gate: ("gate", "input"), Role.expert_up: ("up", "input"), Role.expert_down: ("down", "output")}


@dataclass(frozen=True)
class ExpertBlock:
    """The experts of one layer and projection, in expert order."""

    layer: int
    projection: str
    side: str
    units: tuple[Unit, ...]

    @property
    def basis_dim(self) -> int:
        out_f, in_f = self.units[0].shape
        return in_f if self.side == "input" else out_f

    @property
    def factor_cols(self) -> int:
        out_f, in_f = self.units[0].shape
        return out_f if self.side == "input" else in_f


def expert_blocks(units: Sequence[Unit]) -> list[ExpertBlock]:
    """Group MoE expert units by (layer, projection); every expert of a block must have one shape."""
    groups: dict[tuple[int, Role], list[Unit]] = defaultdict(list)
    for u in units:
        if u.role in PROJECTIONS:
            groups[u.layer, u.role].append(u)
    out = []
    for (layer, role), us in sorted(groups.items(), key=lambda kv: (kv[0][0], list(PROJECTIONS).index(kv[0][1]))):
        us = sorted(us, key=lambda u: u.expert)
        if len({u.shape for u in us}) != 1:
            raise CalibrationError(f"layer {layer} {role.value}: experts of different shapes cannot share a basis")
        out.append(ExpertBlock(layer, *PROJECTIONS[role], tuple(us)))
    return out


@dataclass
class SpectralBlock:
    """What the surrogate measured for one block (numpy; output-error units, see the module docstring)."""

    block: ExpertBlock
    shares: np.ndarray  # [E] share of routed tokens
    tokens: np.ndarray  # [E] routed tokens
    rank: int
    slab_bounds: list[tuple[int, int]]
    slab_error: np.ndarray  # [E, S, W] predicted output error of each slab at each width
    output_mse: np.ndarray  # [E, C] output error of per-tensor RTN at each candidate
    eigenvalues: np.ndarray  # [rank] of the routing-weighted Gram (energy of each basis direction)


def measure_spectral(ckpt: Checkpoint, blocks: Sequence[ExpertBlock], ids: torch.Tensor,
                     candidates: Sequence[Candidate], widths: Sequence[int], rank_slab: int, group_size: int,
                     symmetric: bool, device: str = "auto", track: Tracker = SILENT,
                     workdir: Optional[str] = None) -> tuple[list[SpectralBlock], dict[str, float]]:
    """The surrogate of every block, and timings (``decomposition_s``: bases, factors and rounding only)."""
    lm = LayerwiseModel(ckpt, device)
    n_seq, seqlen = ids.shape
    by_layer: dict[int, list[ExpertBlock]] = defaultdict(list)
    for b in blocks:
        by_layer[b.layer].append(b)
    store = ActivationStore(n_seq, seqlen, lm.hidden_size, workdir)
    out: list[SpectralBlock] = []
    spent = 0.0
    task = track.task("bitsmoe (per layer)", lm.num_layers)
    try:
        with torch.no_grad():
            store.tensor.copy_(lm.embedding_weight()[ids.to(lm.device)])
            for i in range(lm.num_layers):
                layer = lm.load_layer(i)
                units = [u for b in by_layer.get(i, []) for u in b.units]
                inputs = InputStats(layer, units)
                lm.run_layer_batched(layer, store.tensor, store.tensor, FORWARD_BATCH)
                inputs.close()
                t0 = time.perf_counter()
                for b in by_layer.get(i, []):
                    weights = [unit_view(layer, u).detach().float().cpu() for u in b.units]
                    sigmas = _covariances(b, inputs, n_seq * seqlen)
                    tokens = np.array([inputs.tokens(u.tensor) for u in b.units], dtype=np.int64)
                    out.append(surrogate(b, weights, sigmas, tokens, candidates, widths, rank_slab, group_size,
                                         symmetric))
                spent += time.perf_counter() - t0
                del inputs
                lm.release_layer(i)
                task.advance()
    finally:
        store.close()
    return out, {"decomposition_s": spent}


def _covariances(b: ExpertBlock, inputs: InputStats, total_tokens: int) -> list[torch.Tensor]:
    """Sigma_e = H_e / T per expert (float64, CPU); an unrouted expert gets its routed peers' mean, with a warning."""
    hs = [inputs.hessian(u.tensor) for u in b.units]
    routed = [h.double().cpu() / total_tokens for u, h in zip(b.units, hs) if h is not None and inputs.tokens(u.tensor)]
    if not routed:
        raise CalibrationError(f"no calibration token was routed to any expert of layer {b.layer}; give more "
                               "calibration text (--calib-tokens)")
    mean = torch.stack(routed).mean(0)
    out = []
    for u, h in zip(b.units, hs):
        if h is None or not inputs.tokens(u.tensor):
            warnings.warn(f"{u.tensor}: no calibration token was routed to this expert; its slabs are weighted by the "
                          f"mean input covariance of the {len(routed)} routed experts of layer {b.layer}", stacklevel=3)
            out.append(mean)
        else:
            out.append(h.double().cpu() / total_tokens)
    return out


def surrogate(b: ExpertBlock, weights: Sequence[torch.Tensor], sigmas: Sequence[torch.Tensor], tokens: np.ndarray,
              candidates: Sequence[Candidate], widths: Sequence[int], rank_slab: int, group_size: int,
              symmetric: bool) -> SpectralBlock:
    """The surrogate of one block from its expert weights and input covariances (``sigmas[e]``: [in, in])."""
    total = max(int(tokens.sum()), 1)
    shares = tokens / total
    xs = [space_matrix(w, b.side) for w in weights]
    basis, evals = shared_basis(xs, shares.tolist())
    fs = factors(basis, xs)
    rank = basis.shape[0]
    bounds = slab_bounds(rank, rank_slab)
    slab_error = np.zeros((len(weights), len(bounds), len(widths)))
    output_mse = np.zeros((len(weights), len(candidates)))
    for e, (w, f, sigma) in enumerate(zip(weights, fs, sigmas)):
        dfs = [quantize_rows(f, width, group_size, symmetric) - f for width in widths]
        per_rank = rank_errors(basis, dfs, sigma, b.side)  # [rank, W]
        slab_error[e] = np.stack([per_rank[a:z].sum(0) for a, z in bounds])
        output_mse[e] = [output_error(rtn_error(w, c.bits, c.group_size, c.symmetric), sigma) for c in candidates]
    return SpectralBlock(b, shares, tokens, rank, bounds, slab_error, output_mse, evals.numpy())


def rank_errors(basis: torch.Tensor, dfs: Sequence[torch.Tensor], sigma: torch.Tensor, side: str) -> np.ndarray:
    """[rank, W] predicted output error of each factor row's error (``dfs[w]``: [rank, n] per width) under the
    input covariance ``sigma``."""
    if side == "input":
        b = basis.double()
        weight = ((b @ sigma) * b).sum(1)  # b_k^T Sigma b_k, once for every width
        return torch.stack([df.double().pow(2).sum(1) * weight for df in dfs], dim=1).numpy()
    return torch.stack([((df.double() @ sigma) * df.double()).sum(1) for df in dfs], dim=1).numpy()


def output_error(dw: torch.Tensor, sigma: torch.Tensor) -> float:
    """tr(dW Sigma dW^T): the mean squared output error per token of a weight error dW [out, in]."""
    dw = dw.double()
    return float(((dw @ sigma) * dw).sum())
