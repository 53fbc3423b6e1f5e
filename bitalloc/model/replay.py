"""Every decoder layer's calibration inputs, for a backward sweep, with checkpoints and recomputation.

The sensitivity pass visits layers top-down and needs the exact fp32 input of each. Keeping all
L of them costs (L + 2) x tokens x hidden x 4 bytes of temporary disk (87 GB for a 70B model at
32768 tokens). Instead the forward pass keeps the input of every K-th layer (K = ceil(sqrt(L)),
a "checkpoint", in a memory-mapped :class:`~.layerwise.ActivationStore`), and when the backward
sweep enters a segment of K layers, the segment's other inputs are recomputed from its
checkpoint into K - 1 reusable stores. Disk: ceil(L / K) + K - 1 stores instead of L + 2 (7 instead
of 18 at 16 layers, 17 instead of 82 at 80); cost: one more forward through L - ceil(L / K)
layers. The recomputation repeats the forward's arithmetic (same batches, fp32), so the inputs,
and every score computed from them, are bit-identical to keeping all stores; storing bf16 instead
was measured to move the gradient-family scores by more than 1e-3 relative, and the measured-truth
sample far more (benchmarks/RESULTS.md).

While the forward runs, the current hidden states stay on the compute device (two buffers), and
each layer's LIM (1 - mean cosine of its input and output, ``sensitivity.importance``) is taken
there, so the forward never reads a store back.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from .layerwise import ActivationStore, LayerwiseModel


class LayerInputs:
    """Run the forward once; then :meth:`input` gives layer i's inputs (fp32, on the device), i descending."""

    def __init__(self, lm: LayerwiseModel, ids: torch.Tensor, batch: int, workdir: Optional[str] = None,
                 track=None, lim: Optional[Callable[[torch.Tensor, torch.Tensor], tuple[float, int]]] = None):
        self.lm, self.batch, self.workdir = lm, batch, workdir
        n_seq, seqlen = ids.shape
        self.shape = (n_seq, seqlen, lm.hidden_size)
        self.k = max(1, math.ceil(math.sqrt(lm.num_layers)))
        self.checkpoints: dict[int, ActivationStore] = {}
        self.pool: list[ActivationStore] = []
        self.lim_sums: list[tuple[float, int]] = []
        self._segment: Optional[int] = None
        try:
            self.top = self._forward(ids, track, lim)
        except BaseException:
            self.close()
            raise

    def _forward(self, ids: torch.Tensor, track, lim) -> torch.Tensor:
        lm = self.lm
        cur = lm.embedding_weight()[ids.to(lm.device)]
        nxt = torch.empty_like(cur)
        task = track.task("calibration forward", lm.num_layers) if track is not None else None
        for i in range(lm.num_layers):
            if i % self.k == 0:
                self.checkpoints[i] = self._store()
                self.checkpoints[i].tensor.copy_(cur)
            lm.run_layer_batched(lm.load_layer(i), cur, nxt, self.batch)
            lm.release_layer(i)
            if lim is not None:
                self.lim_sums.append(lim(cur, nxt))
            cur, nxt = nxt, cur
            if task is not None:
                task.advance()
        return cur

    def _store(self) -> ActivationStore:
        return ActivationStore(*self.shape, workdir=self.workdir)

    @property
    def disk_stores(self) -> int:
        """Stores held at the peak of the backward sweep (checkpoints plus the segment pool)."""
        return len(self.checkpoints) + min(self.k, self.lm.num_layers) - 1

    def input(self, i: int) -> torch.Tensor:
        """Layer ``i``'s input for all sequences, fp32 on the device (call with i descending)."""
        start = i - i % self.k
        if i == start:
            return self.checkpoints[i].tensor.to(self.lm.device)
        if self._segment != start:
            self._replay(start, i)
        return self.pool[i - start - 1].tensor.to(self.lm.device)

    def _replay(self, start: int, upto: int) -> None:
        """Recompute the inputs of layers start+1 .. upto of the segment from its checkpoint.

        ``upto`` is the segment's top layer, except when a resumed pass starts inside a segment.
        """
        lm = self.lm
        while len(self.pool) < upto - start:
            self.pool.append(self._store())
        x = self.checkpoints[start].tensor.to(lm.device, copy=True)  # replayed in place: never into the checkpoint
        for j in range(start, upto):
            lm.run_layer_batched(lm.load_layer(j), x, x, self.batch)
            lm.release_layer(j)
            self.pool[j - start].tensor.copy_(x)
        self._segment = start

    def drop_top(self) -> None:
        """Free the device copy of the last layer's output once the loss has been taken from it."""
        self.top = None

    def close(self) -> None:
        for st in list(self.checkpoints.values()) + self.pool:
            st.close()
        self.checkpoints, self.pool, self.top = {}, [], None
