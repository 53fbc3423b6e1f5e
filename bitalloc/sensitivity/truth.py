"""Measured ground truth: how much the calibration loss grows when one tensor alone is quantized.

For every unit and candidate: quantize only that tensor (RTN), run the model from that layer's
stored input to the top, and take the mean next-token loss minus the unquantized loss. This is
what every predictor in the error table tries to estimate; it costs one partial forward pass per
(unit, candidate), so it is a validation and calibration tool (``benchmarks/sensitivity_truth.py``),
not part of ``allocate``. Weights are still materialised one decoder layer at a time.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional

import numpy as np
import torch

from ..model.checkpoint import Checkpoint
from ..model.inventory import Inventory
from ..model.layerwise import LayerwiseModel, unit_view
from ..plan import Candidate
from ..progress import SILENT, Tracker
from ..rounding.rtn import fake_quantize

BATCH = 8


def measure_truth(ckpt: Checkpoint, inv: Inventory, ids: torch.Tensor, candidates: list[Candidate],
                  device: str = "auto", track: Tracker = SILENT, workdir: Optional[str] = None) -> tuple[np.ndarray, float]:
    """([U, C] loss increase in nats for inv.quantized units inside decoder layers, unquantized loss).

    Units outside the decoder layers (a counted lm_head or embedding) get NaN.
    """
    lm = LayerwiseModel(ckpt, device)
    ids = ids.to(lm.device)
    units = inv.quantized
    truth = np.full((len(units), len(candidates)), np.nan)
    by_layer: dict[int, list[int]] = defaultdict(list)
    for r, u in enumerate(units):
        if u.layer is not None:
            by_layer[u.layer].append(r)
    stores = lm.forward_stores(ids, BATCH, workdir, track)
    try:
        norm_w, head_w = lm.head_weights()
        total, n = lm.total_loss(stores[-1].tensor, ids, norm_w, head_w, BATCH)
        base = total / n
        work = torch.empty_like(stores[0].tensor)
        task = track.task("ground truth (unit x candidate)", sum(map(len, by_layer.values())) * len(candidates))
        for i in sorted(by_layer):
            for r in by_layer[i]:
                u = units[r]
                for j, c in enumerate(candidates):
                    layer = lm.load_layer(i)
                    view = unit_view(layer, u)
                    view.copy_(fake_quantize(view, [(0, view.shape[1], c)]))
                    lm.run_layer_batched(layer, stores[i].tensor, work, BATCH)
                    lm.release_layer(i)
                    for k in range(i + 1, lm.num_layers):
                        lm.run_layer_batched(lm.load_layer(k), work, work, BATCH)
                        lm.release_layer(k)
                    truth[r, j] = lm.total_loss(work, ids, norm_w, head_w, BATCH)[0] / n - base
                    task.advance()
    finally:
        for st in stores:
            st.close()
    return truth, base
