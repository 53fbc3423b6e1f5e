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
from typing import Optional

import numpy as np
import torch

from ..model.checkpoint import Checkpoint
from ..model.inventory import Inventory, Unit
from ..model.layerwise import ActivationStore, LayerwiseModel, unit_view
from ..plan import Candidate
from ..progress import SILENT, Tracker
from ..rounding.rtn import fake_quantize

BATCH = 8


class TruthRunner:
    """Loss increase of single-unit quantizations on the sequences of ``stores`` (inputs of every layer)."""

    def __init__(self, lm: LayerwiseModel, stores: list[ActivationStore], ids: torch.Tensor, n_seq: Optional[int] = None):
        self.lm, self.ids = lm, ids[:n_seq]
        self.inputs = [st.tensor[:n_seq] for st in stores]
        self.norm_w, self.head_w = lm.head_weights()
        total, self.n = lm.total_loss(self.inputs[-1], self.ids, self.norm_w, self.head_w)
        self.base = total / self.n
        self.work = torch.empty_like(self.inputs[0])

    def __call__(self, unit: Unit, cand: Candidate) -> float:
        lm, i = self.lm, unit.layer
        layer = lm.load_layer(i)
        view = unit_view(layer, unit)
        view.copy_(fake_quantize(view, [(0, view.shape[1], cand)]))
        lm.run_layer_batched(layer, self.inputs[i], self.work, BATCH)
        lm.release_layer(i)
        for k in range(i + 1, lm.num_layers):
            lm.run_layer_batched(lm.load_layer(k), self.work, self.work, BATCH)
            lm.release_layer(k)
        return lm.total_loss(self.work, self.ids, self.norm_w, self.head_w)[0] / self.n - self.base


def measure_truth(ckpt: Checkpoint, inv: Inventory, ids: torch.Tensor, candidates: list[Candidate],
                  device: str = "auto", track: Tracker = SILENT, workdir: Optional[str] = None) -> tuple[np.ndarray, float]:
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
    stores = lm.forward_stores(ids.to(lm.device), BATCH, workdir, track)
    try:
        runner = TruthRunner(lm, stores, ids.to(lm.device))
        task = track.task("ground truth (unit x candidate)", sum(map(len, by_layer.values())) * len(candidates))
        for i in sorted(by_layer):
            for r in by_layer[i]:
                for j, c in enumerate(candidates):
                    truth[r, j] = runner(units[r], c)
                    task.advance()
    finally:
        for st in stores:
            st.close()
    return truth, runner.base
