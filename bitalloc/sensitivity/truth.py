"""Measured ground truth: how much the calibration loss grows when one tensor alone is quantized.

For a unit and candidate: quantize only that tensor (RTN), run the model from that layer's
stored input to the top, and take the mean next-token loss minus the unquantized loss. This is
what every predictor tries to estimate; it costs one partial forward pass per (unit, candidate).
``measure_truth`` runs it for every unit (``benchmarks/sensitivity_families.py``: validation);
``combined.py`` runs it for a small sample of units to calibrate the families on the model at
hand. Weights are still materialised one decoder layer at a time.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Optional

import numpy as np
import torch

from ..model.checkpoint import Checkpoint
from ..model.inventory import Inventory, Unit
from ..model.layerwise import LayerwiseModel, unit_view
from ..plan import Candidate
from ..progress import SILENT, Tracker
from ..rounding.rtn import fake_quantize

BATCH = 8
MAX_STREAMS = 32  # single-unit quantizations carried up the model together (activation memory, see measure)


class TruthRunner:
    """Loss increase of single-unit quantizations on the calibration sequences ``ids``.

    ``reduce`` adds (loss sum, token count) pairs over the processes of a distributed pass, each of
    which holds some of the sequences; the default keeps them local.
    """

    def __init__(self, lm: LayerwiseModel, ids: torch.Tensor, reduce: Callable[..., list[float]] = lambda *v: list(v)):
        self.lm, self.ids, self.reduce = lm, ids.to(lm.device), reduce
        self.norm_w, self.head_w = lm.head_weights()
        self.base: Optional[float] = None  # the unquantized loss, from the first sweep's clean stream

    def __call__(self, unit: Unit, cand: Candidate) -> float:
        return self.measure([(unit, cand)])[0]

    def measure(self, pairs: list[tuple[Unit, Candidate]], advance: Callable[[], None] = lambda: None) -> list[float]:
        """Loss increase of each (unit, candidate), every layer loaded once per MAX_STREAMS pairs.

        One sweep up the model carries a clean stream (the unquantized model, from the embedding)
        and one stream per pair: at layer k the streams started below k run through the unmodified
        layer in one batch, each pair of layer k starts its stream from the clean stream's input of
        k with its unit quantized (restored afterwards), then the clean stream moves on. Each stream
        is the computation of quantizing its unit alone, in fp32 throughout, so nothing depends on
        how the pass stored hidden states; the cost is one pass over the model per MAX_STREAMS
        pairs instead of one per pair. Memory: (MAX_STREAMS + 1) x sequences x seqlen x hidden fp32
        values on the device.
        """
        order = sorted(range(len(pairs)), key=lambda k: pairs[k][0].layer)
        out = [0.0] * len(pairs)
        for c in range(0, len(order), MAX_STREAMS):
            chunk = order[c:c + MAX_STREAMS]
            losses, base = self._sweep([pairs[k] for k in chunk])
            self.base = base if self.base is None else self.base
            for k, loss in zip(chunk, losses):
                out[k] = loss - self.base
                advance()
        return out

    def _sweep(self, pairs: list[tuple[Unit, Candidate]]) -> tuple[list[float], float]:
        lm, n = self.lm, len(self.ids)
        clean = lm.embedding_weight()[self.ids]
        work = torch.empty((len(pairs) * n, *clean.shape[1:]), device=lm.device)
        started = 0
        for k in range(lm.num_layers):
            layer = lm.load_layer(k)
            if started:
                lm.run_layer_batched(layer, work[:started * n], work[:started * n], BATCH)
            while started < len(pairs) and pairs[started][0].layer == k:
                unit, cand = pairs[started]
                view = unit_view(layer, unit)
                original = view.clone()
                view.copy_(fake_quantize(view, [(0, view.shape[1], cand)]))
                lm.run_layer_batched(layer, clean, work[started * n:(started + 1) * n], BATCH)
                view.copy_(original)
                started += 1
            lm.run_layer_batched(layer, clean, clean, BATCH)
            lm.release_layer(k)
        return [self._mean_loss(work[p * n:(p + 1) * n]) for p in range(len(pairs))], self._mean_loss(clean)

    def _mean_loss(self, h: torch.Tensor) -> float:
        total, count = self.reduce(*self.lm.total_loss(h, self.ids, self.norm_w, self.head_w))
        return total / count


def measure_truth(ckpt: Checkpoint, inv: Inventory, ids: torch.Tensor, candidates: list[Candidate],
                  device: str = "auto", track: Tracker = SILENT) -> tuple[np.ndarray, float]:
    """([U, C] loss increase in nats for inv.quantized units inside decoder layers, unquantized loss).

    Units outside the decoder layers (a counted lm_head or embedding) get NaN.
    """
    lm = LayerwiseModel(ckpt, device)
    units = inv.quantized
    truth = np.full((len(units), len(candidates)), np.nan)
    by_layer: dict[int, list[int]] = defaultdict(list)
    for r, u in enumerate(units):
        if u.layer is not None:
            by_layer[u.layer].append(r)
    runner = TruthRunner(lm, ids)
    cells = [(r, j) for i in sorted(by_layer) for r in by_layer[i] for j in range(len(candidates))]
    task = track.task("ground truth (unit x candidate)", len(cells))
    values = runner.measure([(units[r], candidates[j]) for r, j in cells], task.advance)
    for (r, j), v in zip(cells, values):
        truth[r, j] = v
    return truth, runner.base
